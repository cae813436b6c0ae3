"""The dashboard's web app: one page, a board snapshot, a task's log, the event stream, cancel and retry.

Every request must carry the token printed with the URL (query `token`, or header X-Aipm-Token; POSTs only
the header, so a form on another site cannot post even if the token leaked into its hands through a link) and
name this server in its Host header (a DNS-rebinding page names its own host). Anything else gets 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import re
import threading
from contextlib import asynccontextmanager, suppress
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from aipm import parsecache, steering
from aipm.board import project_board
from aipm.changes import ProjectWatch
from aipm.errors import UserError
from aipm.launcher import Launcher, Options
from aipm.liveness import LOOK_AFTER
from aipm.logbook import attempt_logs, no_log
from aipm.project import Project
from aipm.settings import Settings
from aipm.store import load_task, order_meta, task_names
from aipm.ui.stream import LIVE_BYTES, Hub, LiveLog, Stream, as_json, board_patch, sse
from aipm.workerfiles import reading

TOKEN_HEADER = b"x-aipm-token"
LINGER = 0.05  # seconds a woken stream waits for the rest of a burst of changes
LOG_BYTES = 256 * 1024  # of each attempt's log shown for one task: the end, where the news is
# Of all of one task's logs together, newest attempt first: a worker can leave any number of files named like its
# attempts' logs (sparse ones cost no disk), and one click must not read them all into memory.
LOG_TOTAL = 4 * LOG_BYTES
LIVE_LINES = 2000  # of the merged log the page keeps (page.html's MAX_LINES): no message carries more
MIN_SHARE = 8 * 1024  # bytes of each grown log a burst may read, however many grew: its last lines at least
MAX_BODY = 4096  # bytes of a cancel's or retry's request: {"order": ..., "task": ...}
PAGE = resources.files("aipm.ui").joinpath("page.html").read_text(encoding="utf-8")


def _script_hash(page: str) -> bytes:
    """The CSP source of the page's one inline script. Only it may run: were a title or a log line ever put in
    as markup, an onerror= or <script> in it would run nothing ('unsafe-inline' would have run it)."""
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    return b"'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()) + b"'"


SECURITY_HEADERS = [
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; script-src " + _script_hash(PAGE) + b"; "
                                 b"style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                                 b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]


class JSON(JSONResponse):
    """Starlette's encodes to UTF-8, which a directory named in other bytes (surrogates) made a 500 for the whole
    board."""

    def render(self, content) -> bytes:
        return as_json(content).encode()


class Guard:
    """ASGI middleware: the token and the Host header, checked before any route runs."""

    def __init__(self, app, token: str, hosts: set[str], any_ip_host: bool = False):
        self.app = app
        self.stop = lambda: None  # ends the open event streams (create_app sets it)
        self.token = token.encode()
        self.hosts = hosts
        self.any_ip_host = any_ip_host  # --host 0.0.0.0: the page is reached by whatever address the machine has

    def allowed(self, scope) -> bool:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if host not in self.hosts and not (self.any_ip_host and _is_ip(host)):
            return False
        given = headers.get(TOKEN_HEADER)
        if given is None and scope["method"] != "POST":
            given = (parse_qs(scope["query_string"].decode("latin-1")).get("token") or [""])[0].encode()
        return given is not None and hmac.compare_digest(given, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if not self.allowed(scope):
            await PlainTextResponse("forbidden: this dashboard needs the token from its URL\n", 403)(
                scope, receive, secured)
            return
        await self.app(scope, receive, secured)


def _is_ip(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def create_app(project: Project, settings: Settings, orders: list[Path] | None, token: str, hosts: set[str],
               any_ip_host: bool = False) -> Guard:
    """The app for `project`; `orders` None shows every order under orders_dir (and new ones as they appear)."""
    # Reads only, as `status` and `detect` do: a dry-run launcher takes no lock and writes nothing.
    looker = Launcher(project, settings, Options(dry_run=True), monitor=None)
    parsecache.in_memory()  # each change reads the board again: only the files that changed are parsed
    hub = Hub(ProjectWatch.open(project, orders), looker.runtime)

    def order_dirs() -> list[Path]:
        return list(orders) if orders is not None else project.order_dirs()

    def board() -> dict:
        return project_board(looker, order_dirs())

    def find(order_id: str, task_id: str) -> tuple[Path, str]:
        """The order directory and task a request names; only tasks of the orders on the board. Only order.yaml
        and the file names are read: a task file being edited must not make other tasks unreachable. The page
        names an order by its id: the directory whose order.yaml gives it, before one merely named so (an order
        `AA` in orders/CC was unreachable beside a directory orders/AA of another id); and as the CLI does, an id
        two orders give is refused (cancel and retry through the page went to the first of them)."""
        by_id, named = [], []
        for directory in order_dirs():
            try:
                given = order_meta(directory)[0]
            except (UserError, OSError):
                continue  # a broken order.yaml or a vanished directory: its row on the board says so
            (by_id if given == order_id else named if directory.name == order_id else []).append(directory)
        for directory in by_id[:1] or named[:1]:
            try:
                if f"{task_id}.yaml" in task_names(directory):  # a listed name: no path from the request
                    return project.check_unique(directory), task_id
            except OSError:
                pass
        raise UserError(f"no task {order_id}/{task_id} on this board")

    async def page(request: Request):
        return HTMLResponse(PAGE)  # the text SECURITY_HEADERS hashed

    async def board_json(request: Request):
        return JSON(await run_in_threadpool(board))

    def task_log(order_id: str, task_id: str) -> dict:
        order_dir, task_id = find(order_id, task_id)
        order_id = order_meta(order_dir)[0]
        attempts, budget, omitted = [], LOG_TOTAL, 0
        mine = sorted((log for log in attempt_logs(looker.runtime, order_id) if log.task == task_id),
                      key=lambda log: (log.attempt, log.review), reverse=True)  # newest first, to the budget
        for path in (log.path for log in mine):
            if budget <= 0:
                omitted += 1
                continue
            try:
                handle = reading(path)
            except OSError:
                continue  # the worker replaced its log with what is no file (a FIFO would block for ever)
            with handle:
                size = handle.seek(0, 2)
                keep = min(size, LOG_BYTES, budget)
                handle.seek(size - keep)
                attempts.append({"name": path.name, "text": handle.read(keep).decode(errors="replace"),
                                 "truncated": size > keep})
                budget -= keep
        shown = {"order": order_id, "task": task_id, "logs": attempts[::-1], "omitted": omitted}
        if not attempts:  # what the page says instead
            shown["none"] = no_log_of(order_dir, order_id, task_id) if not mine else \
                "its logs cannot be read: what is there is no file (its worker replaced them)"
        return shown

    def no_log_of(order_dir: Path, order_id: str, task_id: str) -> str:
        """logbook.no_log: whether the task ran, as its file says (only this one file read, and only now)."""
        try:
            return no_log(order_id, load_task(order_dir / f"{task_id}.yaml", project.root))
        except (UserError, OSError):
            return f"no log for {order_id}/{task_id} yet"

    async def log_json(request: Request):
        try:
            return JSON(await run_in_threadpool(
                task_log, request.query_params.get("order", ""), request.query_params.get("task", "")))
        except UserError as exc:
            return JSON({"error": str(exc)}, 404)

    def steer(action, verb: str):
        async def endpoint(request: Request):
            try:
                raw = b""
                async for chunk in request.stream():  # a cap, not the whole body first: {"order", "task"} is small
                    raw += chunk
                    if len(raw) > MAX_BODY:
                        raise ValueError("too long")
                body = json.loads(raw)
                order_dir, task_id = await run_in_threadpool(find, str(body["order"]), str(body["task"]))
                work = _in_daemon_thread(action, project, order_dir, task_id)
                holder = await _held_up(work, looker.runtime)
                if holder:
                    return JSON({"ok": False, "note": f"not done yet: waiting for the launch lock, held by {holder}; "
                                                      f"the {verb} is made once it goes on (if this "
                                                      "dashboard still runs)"}, 202)
                said = work.result()
            except (ValueError, KeyError, TypeError, RecursionError):
                return JSON({"error": "expected JSON {\"order\": ..., \"task\": ...}"}, 400)
            except UserError as exc:
                return JSON({"error": str(exc)}, 409)
            notes = said.notes() if isinstance(said, steering.Cancelled) else said if isinstance(said, list) else []
            return JSON({"ok": True, **({"note": "; ".join(notes)} if notes else {})})
        return endpoint

    async def events(request: Request):
        stream = Stream()
        live = LiveLog()
        # The page asks for patches after the first board; a script following /events gets whole boards as before.
        patches = request.query_params.get("patches") == "1"

        async def messages():
            hub.streams.add(stream)
            try:
                sent = None
                records = await run_in_threadpool(looker.runtime.records)
                stream.logs.clear()  # what the backlog reads next covers these
                lines = await run_in_threadpool(live.backlog, records)
                while True:
                    if stream.board:
                        stream.board = False
                        # A page's first board is read for it: what no change signals (a lock taken outside aipm)
                        # shows on a reload.
                        current = await (hub.board(lambda: run_in_threadpool(board)) if sent is not None
                                         else run_in_threadpool(board))
                        if current != sent:
                            yield (sse("patch", board_patch(sent, current)) if patches and sent is not None
                                   else sse("board", current))
                            sent = current
                    if lines:
                        yield sse("log", _page_full(lines))
                    lines = []
                    if not await hub.wait(stream):
                        yield ": keep-alive\n\n"
                        continue
                    if hub.stopping:
                        return
                    await asyncio.sleep(LINGER)  # let a burst of writes land: one message, not hundreds
                    grown, stream.logs = stream.logs, set()
                    lines = await run_in_threadpool(_grown, live, grown)
            finally:
                hub.streams.discard(stream)

        return StreamingResponse(messages(), media_type="text/event-stream")

    @asynccontextmanager
    async def lifespan(app):
        hub.start()
        try:
            yield
        finally:
            hub.close()

    app = Starlette(routes=[
        Route("/", page),
        Route("/api/board", board_json),
        Route("/api/log", log_json),
        Route("/api/cancel", steer(steering.cancel, "cancel"), methods=["POST"]),
        Route("/api/retry", steer(_retry, "retry"), methods=["POST"]),
        Route("/events", events),
    ], lifespan=lifespan)
    guard = Guard(app, token, hosts, any_ip_host)
    guard.stop = hub.stop
    return guard


def _retry(project: Project, order_dir: Path, task_id: str) -> list[str]:
    """`aipm retry`, and what it says besides (what the lost attempt it replaces had come to), as its notes."""
    said: list[str] = []
    steering.retry(project, order_dir, task_id, None, said)
    return said


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """fn(*args) in a thread of its own that does not keep the process alive: a cancel held up by a stopped round
    (see _held_up) waits for the launch lock as long as that round stays stopped, and in the server's thread pool
    it kept Ctrl-C of `aipm ui` from ending the process until then. One still waiting for the lock at the exit has
    changed nothing, as an `aipm cancel` stopped by Ctrl-C there."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, as run_in_threadpool does
            outcome = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with suppress(RuntimeError):  # the loop is closed: the server has ended, nobody waits for it
            loop.call_soon_threadsafe(lambda: future.done() or outcome[0](outcome[1]))

    threading.Thread(target=run, daemon=True).start()
    return future


async def _held_up(work: asyncio.Future, rt) -> str | None:
    """Wait for a cancel's or retry's `work`, or until it waits for the launch lock that a stopped process holds (an
    `aipm run` stopped by Ctrl-Z inside a round): then who that is, and the work goes on once it does. The page's
    request hung until then, and what held it up was said only on the server's stderr."""
    while not (await asyncio.wait({work}, timeout=LOOK_AFTER))[0]:
        holder = await run_in_threadpool(rt.launch_lock_holder)
        if holder:
            work.add_done_callback(lambda done: done.cancelled() or done.exception())  # its error is nobody's now
            return holder
    return None


def _page_full(lines: list[dict]) -> list[dict]:
    """At most the lines the page keeps: of a burst beyond them (an agent printing megabytes at once) only the
    end goes out, after a line saying how many were left out."""
    if len(lines) <= LIVE_LINES:
        return lines
    cut = len(lines) - LIVE_LINES + 1
    note = f"[aipm ui] {cut} lines not shown here: each task's own log has them"
    return [{"order": "", "task": "aipm", "line": note}, *lines[cut:]]


def _grown(live: LiveLog, paths: set[Path]) -> list[dict]:
    """New lines of the logs that grew since the stream last looked, oldest change first: LIVE_BYTES in all,
    shared among them (forty logs that each grew by a megabyte at once were 10 MiB read for one message whose
    page keeps LIVE_LINES lines)."""
    share = max(LIVE_BYTES // max(len(paths), 1), MIN_SHARE)
    out = []
    for path in sorted(paths, key=_changed_at):
        out += live.read(path, skip=share)
    return out


def _changed_at(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed since it changed (its attempt's log swept): nothing to read, no reason to stop
        return 0
