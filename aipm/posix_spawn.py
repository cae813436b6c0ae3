"""posix_spawn(3) without holding the GIL, to be run in a helper thread (offthread.py).

Starting a process costs the parent about half a millisecond here, nearly all of it waiting for the vfork'd child
to reach exec. `os.posix_spawn` waits with the GIL held, so nothing else in the process moves meanwhile; the same
call through ctypes releases it (and only it: the setup calls keep the GIL, see _load). A launch therefore starts
a worker's wrapper in the helper thread (it waits for its go, so starting it early runs nothing) while the main
thread writes the task's status, and joins before the go: the two waits overlap instead of adding up. Where libc
has no posix_spawn, os.posix_spawn does the work.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

# posix_spawnattr flags, as glibc and musl number them (other systems differ: Linux only, see _load)
_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80
_STATE_BYTES = 1024  # room for posix_spawn_file_actions_t / posix_spawnattr_t (80 and 336 bytes on x86-64 glibc)
# Python ignores these; a child gets them back at their default, as subprocess gives them (`yes | head` ends quietly).
# SIGCHLD too: ignored by whoever started aipm, it would be ignored in the wrapper, whose wait4 then sees no child.
_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)


def _load() -> tuple[Any, Any]:
    """libc twice: the posix_spawn call itself through CDLL (the GIL let go while the child starts), every setup
    call through PyDLL (microseconds each: letting go of the GIL around each would hand it to the other thread and
    wait for it back, a switch interval a call, in the helper thread that a spawn runs in)."""
    if sys.platform != "linux":
        return None, None
    try:
        waits, quick = ctypes.CDLL(None, use_errno=True), ctypes.PyDLL(None, use_errno=True)
        waits.posix_spawn, quick.posix_spawn  # noqa: B018 - both present, or neither is used
    except (OSError, AttributeError):
        return None, None
    c_p, c_int = ctypes.c_void_p, ctypes.c_int
    waits.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, c_p, c_p, c_p, c_p]
    quick.posix_spawn_file_actions_addopen.argtypes = [c_p, c_int, ctypes.c_char_p, c_int, ctypes.c_uint]
    quick.posix_spawn_file_actions_adddup2.argtypes = [c_p, c_int, c_int]
    quick.posix_spawnattr_setflags.argtypes = [c_p, ctypes.c_short]
    quick.sigaddset.argtypes = [c_p, c_int]
    for name in ("posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy", "posix_spawnattr_init",
                 "posix_spawnattr_destroy", "sigemptyset"):
        getattr(quick, name).argtypes = [c_p]
    for name in ("posix_spawnattr_setsigmask", "posix_spawnattr_setsigdefault"):
        getattr(quick, name).argtypes = [c_p, c_p]
    return waits, quick


_libc, _quick = _load()


def spawn(path: str, argv: Sequence[str], env: Mapping[str, str], file_actions: Sequence[tuple],
          setsid: bool = False) -> int:
    """os.posix_spawn(path, argv, env, file_actions=..., setsid=...) that lets other threads run while it waits.
    Takes the POSIX_SPAWN_OPEN and POSIX_SPAWN_DUP2 actions of os.posix_spawn; raises OSError as it does. The
    child starts with no signal blocked (whatever the calling thread blocks) and SIGPIPE and SIGXFSZ at default."""
    return prepared(path, argv, env, file_actions, setsid)()


def prepared(path: str, argv: Sequence[str], env: Mapping[str, str], file_actions: Sequence[tuple],
             setsid: bool = False) -> Callable[[], int]:
    """spawn()'s arguments made ready in the calling thread; the returned call spawns (once) and gives the pid. A
    helper thread that gets only the call runs almost no Python: where it built the arguments itself, it held the
    GIL the while and the run's thread, writing the status meanwhile, waited for it (futex waits: 0.38 ms of a B2
    hand-over under ftrace)."""
    if _libc is None:
        return lambda: os.posix_spawn(path, argv, env, file_actions=file_actions, setsid=setsid, setsigmask=(),
                                      setsigdef=_RESTORED)
    fsenc, libc = os.fsencode, _quick
    args = (ctypes.c_char_p * (len(argv) + 1))(*map(fsenc, argv), None)
    envp = (ctypes.c_char_p * (len(env) + 1))(*map(_variable, env.items()), None)
    actions = ctypes.create_string_buffer(_STATE_BYTES)
    attr = _attributes(setsid)
    keep = []  # the paths of open actions: libc keeps pointers to them until the spawn
    program = fsenc(path)
    _check(libc.posix_spawn_file_actions_init(actions))
    try:
        for action in file_actions:
            if action[0] == os.POSIX_SPAWN_OPEN:
                _, fd, name, flags, mode = action
                keep.append(fsenc(name))
                _check(libc.posix_spawn_file_actions_addopen(actions, fd, keep[-1], flags, mode))
            elif action[0] == os.POSIX_SPAWN_DUP2:
                _check(libc.posix_spawn_file_actions_adddup2(actions, action[1], action[2]))
            else:
                raise ValueError(f"unsupported spawn action {action!r}")
    except BaseException:
        libc.posix_spawn_file_actions_destroy(actions)
        raise

    def call() -> int:
        try:
            pid = ctypes.c_int()
            _check(_libc.posix_spawn(ctypes.byref(pid), program, actions, attr, args, envp))
            return pid.value
        finally:
            keep.clear()
            libc.posix_spawn_file_actions_destroy(actions)
    return call


@lru_cache(maxsize=2)
def _attributes(setsid: bool) -> ctypes.Array:
    """The spawn attributes (no signal blocked, _RESTORED at default, a session of its own if `setsid`): the same
    for every spawn, made once and only read by posix_spawn, in whichever thread spawns (never destroyed)."""
    libc = _quick
    attr = ctypes.create_string_buffer(_STATE_BYTES)
    _check(libc.posix_spawnattr_init(attr))
    none, restored = ctypes.create_string_buffer(_STATE_BYTES), ctypes.create_string_buffer(_STATE_BYTES)
    _check(libc.sigemptyset(none) and ctypes.get_errno())
    _check(libc.sigemptyset(restored) and ctypes.get_errno())
    for signum in _RESTORED:
        _check(libc.sigaddset(restored, signum) and ctypes.get_errno())
    _check(libc.posix_spawnattr_setsigmask(attr, none))
    _check(libc.posix_spawnattr_setsigdefault(attr, restored))
    _check(libc.posix_spawnattr_setflags(attr, _SETSIGMASK | _SETSIGDEF | (_SETSID if setsid else 0)))
    return attr


@lru_cache(maxsize=1024)
def _variable(item: tuple[str, str]) -> bytes:
    """`NAME=value` as the child's environment holds it. Remembered: a worker's environment is the same forty-odd
    variables each time but for a few of aipm's, and encoding them all again was a tenth of a spawn's Python."""
    return os.fsencode(item[0]) + b"=" + os.fsencode(item[1])


def _check(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))
