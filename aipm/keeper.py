"""The keeper: one small process per `run` that starts its workers, holds their exit codes and outlives the run.

Without it, every worker is `/bin/sh` running a wrapper that waits for the "go", forks the command, and writes
its exit code to an exit file (runner.py) — about a millisecond per task spent starting a shell. The keeper does
the wrapper's job for all of a run's workers from one process: it forks a child per task (the keeper is tiny, so
the fork is cheap), the child sets itself up (new session, log, stdin, working directory, the target-lock
descriptors it was handed) and waits for the go; on the go it execs the command itself, so the worker's pid is
the command's. When a worker ends, the keeper (its parent) writes the exit file *before* it reaps the worker —
so anyone who sees the pid gone finds the exit code on disk — and tells the run.

Why this keeps every guarantee of the wrapper:
- No command before its record is durable: the child blocks on its go pipe until the run, after the launch
  round's fsync, says go; a run that dies first closes the keeper's socket, and the keeper closes every go pipe
  not yet used (the child exits 125 without running anything).
- Real exit codes after the run is SIGKILLed: the keeper lives in its own session, keeps waiting for its
  workers, writes their exit files, and exits when the last one has ended. The next owner adopts the workers
  from their records as before (a pid seen gone with no exit file yet is waited for until it is reaped).
- The keeper SIGKILLed: its workers become children of the run (a child subreaper, see subreaper.py), which
  then waits for them itself.

This file is also the keeper's program (`python -S -E keeper.py FD`): standard library only, so it starts in a
few milliseconds and forks from a small address space.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import sys

# Exit codes as the shell wrapper gives them: 125 no go (nothing ran), 126 cannot enter the directory,
# 127 cannot run the program.
NO_GO, NO_DIR, NO_PROGRAM = 125, 126, 127
_MAX_MESSAGE = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD: descriptors one message can carry; a task holding more locks uses the shell wrapper
ANSWER_WAIT = 10.0  # seconds: a keeper that does not answer a spawn by then (stopped, stuck) is given up


class Keeper:
    """The run's side: start the keeper, ask it for workers, hear how they ended."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.set_inheritable(theirs.fileno(), True)
            quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-S", "-E", __file__, str(theirs.fileno())],
                                      os.environ, file_actions=quiet)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self._serial = 0
        self._heard: list[dict] = []  # exits that arrived while we waited for a reply
        self.children: set[int] = set()  # started and not yet reported ended
        self.broken = False

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, log: str, stdin: str | None, exit_file: str,
              fds: list[int]) -> int:
        """A worker that waits for go(); its pid. OSError when the keeper is gone (use the shell wrapper)."""
        self._serial += 1
        message = {"op": "spawn", "id": self._serial, "argv": argv, "env": env, "cwd": cwd, "log": log,
                   "stdin": stdin, "exit_file": exit_file}
        try:
            socket.send_fds(self.sock, [json.dumps(message).encode()], list(fds))
            while True:
                if not select.select([self.sock], [], [], ANSWER_WAIT)[0]:
                    raise OSError("the keeper does not answer")
                reply = self._receive(block=True)
                if reply is None:
                    raise OSError("the keeper is gone")
                if reply["op"] == "spawned" and reply["id"] == self._serial:
                    break
                self._heard.append(reply)
        except OSError:
            self.broken = True  # the run stops using it (its workers so far are waited for by pid)
            raise
        if "error" in reply:
            raise OSError(reply["error"])
        self.children.add(reply["pid"])
        return reply["pid"]

    def go(self, pid: int, ok: bool) -> None:
        """Let the worker run its command (ok), or end it unrun."""
        try:
            self._send({"op": "go" if ok else "cancel", "pid": pid})
        except OSError:
            pass  # the keeper is gone: its children read EOF and run nothing

    def exits(self) -> list[tuple[int, int]]:
        """(pid, exit code) of the workers that ended since the last call."""
        heard, self._heard = self._heard, []
        while (message := self._receive(block=False)) is not None:
            heard.append(message)
        ended = [(m["pid"], m["code"]) for m in heard if m["op"] == "exited"]
        self.children.difference_update(pid for pid, _ in ended)
        return ended

    def _receive(self, block: bool) -> dict | None:
        try:
            data = self.sock.recv(_MAX_MESSAGE, 0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        return json.loads(data) if data else None

    def _send(self, message: dict) -> None:
        self.sock.send(json.dumps(message).encode())

    def close(self) -> None:
        """Hang up: the keeper ends once the workers it still has are gone."""
        self.sock.close()


class _Child:
    def __init__(self, pid: int, go: int, exit_file: str, ident: int):
        self.pid, self.go, self.exit_file, self.ident = pid, go, exit_file, ident
        self.pidfd = os.pidfd_open(pid)
        self.went = False


def _start(spec: dict, fds: list[int], sock: socket.socket) -> _Child:
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker-to-be: nothing here may return into the keeper's loop
        code = NO_PROGRAM
        try:
            os.setsid()
            sock.close()
            os.close(go_write)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it; the command must not inherit that
            stdin = os.open(spec["stdin"] or os.devnull, os.O_RDONLY)
            log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(stdin, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            for fd in (stdin, log):
                if fd > 2:
                    os.close(fd)
            for fd in fds:
                os.set_inheritable(fd, True)
            code = NO_DIR
            os.chdir(spec["cwd"])
            code = NO_GO
            if os.read(go_read, 3) != b"go\n":
                os._exit(NO_GO)
            os.close(go_read)
            code = NO_PROGRAM
            argv = spec["argv"]
            os.execvpe(argv[0], argv, spec["env"])
        except BaseException as exc:  # noqa: BLE001 - report, then leave with the shell's code
            try:
                os.write(2, f"aipm: {exc}\n".encode(errors="replace"))
            finally:
                os._exit(code)
    os.close(go_read)
    for fd in fds:
        os.close(fd)  # the child holds the target locks now
    return _Child(pid, go_write, spec["exit_file"], spec["id"])


def serve(sock: socket.socket) -> None:
    """The keeper's loop: start children on request, say go, report exits; end when the run is gone and the
    last child has been reaped."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    children: dict[int, _Child] = {}
    connected = True
    while connected or children:
        for key, _ in sel.select():
            if key.data is None:
                connected = _request(sock, sel, children)
                if not connected:
                    sel.unregister(sock)
                    for child in children.values():  # the run died before saying go: run nothing
                        if not child.went:
                            _close(child)
            else:
                child = key.data
                _ended(child, sel, children, sock if connected else None)


def _request(sock: socket.socket, sel: selectors.BaseSelector, children: dict[int, _Child]) -> bool:
    try:
        data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, MAX_FDS)
    except OSError:
        return False
    if not data:
        return False
    message = json.loads(data)
    if message["op"] == "spawn":
        try:
            child = _start(message, fds, sock)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"op": "spawned", "id": message["id"], "error": exc.strerror or str(exc)})
            return True
        children[child.pid] = child
        sel.register(child.pidfd, selectors.EVENT_READ, child)
        _send(sock, {"op": "spawned", "id": message["id"], "pid": child.pid})
    elif message["op"] in ("go", "cancel"):
        child = children.get(message["pid"])
        if child is not None and child.go >= 0:
            if message["op"] == "go":
                try:
                    os.write(child.go, b"go\n")
                    child.went = True
                except OSError:
                    pass  # it is gone already (killed): it ran nothing
            _close(child)
    return True


def _close(child: _Child) -> None:
    if child.go >= 0:
        os.close(child.go)
        child.go = -1


def _ended(child: _Child, sel: selectors.BaseSelector, children: dict[int, _Child], sock: socket.socket | None) -> None:
    # Learn the status without reaping, write it down, then reap: whoever sees the pid gone finds the file.
    info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    if info is None:
        return  # not ended after all (a spurious wake-up)
    # As os.waitstatus_to_exitcode gives it to a parent: the exit code, or minus the signal that killed it.
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    if child.went:
        try:
            with open(child.exit_file, "w") as handle:
                handle.write(f"{code}\n")
        except OSError:
            pass  # a full disk: the run hears it below; an adopter finds no code (as with the shell wrapper)
    os.waitpid(child.pid, 0)
    sel.unregister(child.pidfd)
    os.close(child.pidfd)
    _close(child)
    del children[child.pid]
    if sock is not None:
        try:
            _send(sock, {"op": "exited", "pid": child.pid, "code": code, "went": child.went})
        except OSError:
            pass  # the run is gone: the exit file speaks for it


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def main() -> None:
    os.setsid()  # a Ctrl-C or a kill of the run's process group must not take the keeper (and the codes) along
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock)


if __name__ == "__main__":
    main()
