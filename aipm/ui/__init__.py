"""`aipm ui`: a live web dashboard of the project (Starlette app, served by uvicorn on 127.0.0.1).

It reads what `status` and `logs` read (aipm.board, aipm.logbook) and calls what `cancel` and `retry` call
(aipm.steering): no logic of its own. Updates are pushed by server-sent events, woken by inotify.
"""
