"""The /bin/sh wrapper of a worker (runner.begin), used where the compiled one (wrapper.py) is not: its text, and
which string commands it may run as plain words, without a shell of their own.

Its arguments: $1 the exit file, $2 the time limit it keeps when no owner is left to (runner.LATE), then the
command. It waits for "go" on fd 3 (runner._GO_FD).
"""

from __future__ import annotations

import os
import re
import shlex

SHELL = "/bin/sh"
# Once it has its go, the wrapper outlives a stop signal to its group (caught, so the command starts with the default
# action): the group then lives until the command has ended, within the stopper's grace before its SIGKILL, so a
# command that handles SIGTERM (an agent saving its session, a Ray attempt cancelling its task) gets the time.
# $2 is the time limit (seconds; 0: none) that the wrapper keeps when no owner is left to (see runner.begin()): here
# by a watchdog in the background, only where the compiled wrapper (which keeps it with a timer) is not used. When
# the limit passes, it tells the wrapper (SIGUSR1: its exit file gets wrapper.c's " timed-out"), SIGTERMs the group
# and, 5 s later (stopping.KILL_GRACE), marks the exit file itself if the wrapper has not and SIGKILLs the group. Its
# `sleep` counts the monotonic clock, not the boot clock: time asleep only makes it late, and a live owner keeps the
# limit.
# A shell of its own, named WATCHDOG ($1 the limit, $2 the exit file, $3 the wrapper): a subshell was a second child
# of the wrapper like any, and an `aipm exec` the command ran was lent no slot (slots.py: the wrapper must wait for
# the command alone).
WATCHDOG = "aipm-watchdog"
_WATCHDOG = shlex.quote(
    "trap 'kill $p; exit' TERM; sleep \"$1\" & p=$!; wait $p || exit; trap '' TERM; echo 'aipm-wrapper: time limit "
    "passed with no owner stopping it: sending SIGTERM to the process group' >&2; kill -USR1 $3; kill -TERM 0; kill "
    "-CONT 0; sleep 5 & p=$!; wait $p; [ -e \"$2\" ] || echo 137 timed-out >\"$2\"; kill -KILL 0")
_PRELUDE = ('cd "$AIPM_ROOT" || exit 126; IFS= read -r go <&3 && [ "$go" = go ] || exit 125; exec 3<&-; f=$1; '
            "trap : TERM INT HUP; t= w=; [ \"$2\" = 0 ] || { trap 't=\" timed-out\"' USR1; "
            f'{SHELL} -c {_WATCHDOG} {WATCHDOG} "$2" "$f" $$ & w=$!; }}; shift 2; ')

# "$@" is the command's argv; the exit code goes to the exit file before the wrapper exits with it, or, where its
# directory was removed (the command's `rm -rf` of aipm's state), to the end of the log (workerfiles.exit_code_in_log).
# The watchdog goes with the command; one that stopped it takes the rest of the group along, as wrapper.c does.
# With a limit, its end on the boot clock follows (" @S.CC", wrapper.c): one that ended past its owner's limit, with
# no owner to stop it, is no success (runtime.read_exit).
_WRITE_CODE = ('e=; [ -z "$w" ] || { read -r e _ </proc/uptime; } 2>/dev/null; '
               'echo "$s$t${e:+ @$e}" >"$f" || echo "aipm-wrapper: exit file not written; exit code $s" >&2; '
               '[ -z "$w" ] || kill $w 2>/dev/null; [ -z "$t" ] || kill -KILL 0; exit $s')
WRAP_ARGV = _PRELUDE + '"$@"; s=$?; ' + _WRITE_CODE
# In the shell wrapper (no compiled one), a string command runs in a subshell of it: one fork, no second exec of
# /bin/sh. There $PPID is still the wrapper's parent, aipm itself, so a command's `kill -STOP $PPID` (meaning its own
# shell) stopped the whole run: it is set to the subshell's real parent, the wrapper ($$). A shell where PPID is
# read-only (bash exits on the assignment) starts the command as a new shell instead, one exec more.
_OWN_PARENT = ('PPID=$$; eval "$1"' if os.path.basename(os.path.realpath(SHELL)) in ("dash", "ash", "busybox")
               else f'exec {SHELL} -c "$1" "$0" "$@"')
WRAP_SHELL = _PRELUDE + f'({_OWN_PARENT}); s=$?; ' + _WRITE_CODE

# A string command of plain words means the same as its argv, which runs without that subshell (one fork less
# per task). Anything the shell would interpret keeps it: quotes, expansions, operators, newlines, a keyword or
# a builtin that would act on the wrapper itself (exit, exec, trap, ...) as the first word.
_PLAIN = re.compile(r"[ \t]*[\w./,:@%+-]+(?:[ \t]+[\w./,:@%+-]+)*[ \t]*", re.ASCII)
_SHELL_WORDS = frozenset(
    ". : [ alias bg break cd chdir command continue eval exec exit export fc fg getopts hash jobs kill local read "
    "readonly return set shift times trap type ulimit umask unalias unset wait ! { } case do done elif else esac "
    "fi for function if in select then time until while".split()
)


# Commands /bin/sh runs itself, without starting a program: they keep the shell wrapper (one exec, and the
# builtin's own behaviour, which may differ from the program of that name: dash's echo is not coreutils').
SH_BUILTINS = _SHELL_WORDS | {"true", "false", "echo", "printf", "test", "pwd"}
# The builtins the compiled wrapper runs itself (wrapper.c's builtin()): they only say their exit code.
NATIVE_BUILTINS = frozenset({"true", "false"})


def plain_words(command: str) -> list[str] | None:
    """The argv of a string command made only of plain words, or None when the shell must read it."""
    if not _PLAIN.fullmatch(command):
        return None
    words = command.split()
    return words if words[0] not in _SHELL_WORDS else None
