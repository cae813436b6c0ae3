"""aipm: run tasks from YAML order files in parallel, safely."""

__version__ = "0.1.0"

# Stop signals that came before a command's own handler took over (see main). Each also raised KeyboardInterrupt,
# but one raised where Python swallows it (in a finalizer: "Exception ignored in ...") stopped nothing; run's Stop
# finds it here.
EARLY: list[int] = []


def _early(signum, frame) -> None:
    EARLY.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """The `aipm` command: the installed script and `python -m aipm` start here, ahead of aipm.cli's imports (most
    of a `run`'s start-up, where nothing caught an interrupt: a traceback, or death by SIGTERM).

    Until a command puts its own handler in place (run's Stop, the dashboard's server), SIGTERM and SIGHUP raise
    KeyboardInterrupt as Ctrl-C does, so a write under way is undone as on Ctrl-C (writer.atomic_write), and the
    interrupt ends the command with exit 130 and no traceback. A signal ignored when we started (SIGHUP under nohup,
    SIGINT in a background job) stays ignored."""
    import os
    import signal
    import sys

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in stops:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _early)
    sys.unraisablehook = _unraisable
    try:
        from aipm.cli import main as cli

        cli()
    except (KeyboardInterrupt, RuntimeError, ImportError) as exc:
        # An interrupt inside a class being built or a module being imported arrives wrapped ("Error calling
        # __set_name__ ...": its cause is the KeyboardInterrupt); anything else is no interrupt of ours.
        if not _interrupted(exc):
            raise
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # another one would only break into the exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # its reader is gone (a hang-up): what it did not take is lost either way
        # Not sys.exit: under `python -m`, an interrupt raised in code made by exec (a dataclass's methods, built
        # as its module is imported) makes the interpreter kill itself with SIGINT at exit, caught or not.
        os._exit(130)


def _unraisable(unraisable) -> None:
    """Python's report of an exception it could not raise, but for our early stop's KeyboardInterrupt: landed in a
    callback (importlib's module-lock cleanup, a finalizer), it printed "Exception ignored in ... Traceback" before
    the interrupt's quiet exit 130. EARLY keeps the stop: the command ends at its next look."""
    import sys

    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and EARLY):
        sys.__unraisablehook__(unraisable)


def _interrupted(exc: BaseException | None) -> bool:
    """Whether `exc` is a KeyboardInterrupt, or was raised because of one (its cause or context, at any depth)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
