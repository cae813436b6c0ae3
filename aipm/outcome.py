"""Why an attempt ended the way it did, in a few words: the `reason` aipm keeps in the task file.

Every ending has one constructor here, so events, `status` and `why` word it the same way in every process
and in later invocations. A reason is one short line (it is a YAML scalar on one line of the task file); a new
kind of ending is one more function that returns such a line.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable

MAX_LENGTH = 160  # a reason sits in a table cell and on an event line; the log has the rest


_COLOUR = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # a terminal's escape sequence (colours: linters print them)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ufffe\uffff]")  # what a YAML file cannot hold as it is


def one_line(text: str) -> str:
    """Whitespace runs (newlines included) become one space; overlong text ends in an ellipsis. A byte of a file
    name that is not UTF-8 (decoded as a surrogate) is shown as "?": a task file is UTF-8 text. Colour codes go,
    and any other control character is a "?": a reviewer's first line in red had its task's outcome unwritable."""
    text = re.sub(r"\s+", " ", _COLOUR.sub("", text)).strip().encode(errors="replace").decode()
    text = _UNPRINTABLE.sub("?", text)
    if len(text) <= MAX_LENGTH:
        return text
    cut = text[: MAX_LENGTH - 1]
    space = cut.rfind(" ")
    # At the last whole word, unless that drops much (a long path or URL is cut where it must be): "(t…" said nothing.
    return (cut[:space] if space >= MAX_LENGTH - 40 else cut).rstrip(" ,;:(") + "…"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exited(code: int) -> str:
    """"exit 3"; a negative code (the process died of a signal) is "killed by SIGKILL"; a shell's 128+N code
    names the signal too ("exit 137 (SIGKILL)")."""
    if code < 0:
        return killed(-code)
    if code > 128:
        try:
            return f"exit {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit {code}"


def agent_error(reason: str, error: str) -> str:
    """An attempt whose agent reported an error: how its process ended, and the agent's word for it."""
    return one_line(f"{reason}; the agent reported an error: {error}")


def at_cap(reason: str, cap: str) -> str:
    """An attempt its agent stopped at the cap aipm gave it: the budget's doing, not counted as a try."""
    return one_line(f"{reason}; stopped at the cap aipm gave it ({cap}, --max-budget-usd), what the budget left it; "
                    "attempt not counted")


def killed(number: int) -> str:
    return f"killed by {signal_name(number)}"


def lost() -> str:
    """A watched worker that ended without its wrapper writing an exit code: something killed it."""
    return "killed from outside (no exit code)"


def timed_out(seconds: int | None) -> str:
    return f"timed out after {seconds} s"


def review_timed_out(seconds: int | None) -> str:
    return "review " + timed_out(seconds)


def not_merged(reason: str) -> str:
    """The reason of a task whose merge left ignored files of its targets behind: DONE alone read as all merged."""
    return f"{reason}; ignored files in its targets not merged back, kept aside (its log says where)"


def stashed(reason: str) -> str:
    """The reason of a task whose worker left changes in the repository's stash: DONE alone read as all merged."""
    return f"{reason}; the worker left changes in the repository's stash, not merged (its log names the entry)"


def undone_by_review(reason: str) -> str:
    """The reason of a task whose approving review put files the task changed back: COMPLETED alone read as merged."""
    return f"{reason}; the review put back some of the task's changes, not merged (its log names the patch)"


def review_approved() -> str:
    return "review approved"


def unreviewed() -> str:
    """A stopped review not run again: no review command now (`--no-review`); its work exited 0."""
    return "exit 0; stopped review not run again: no review command now"


def review_rejected(output: str, code: int) -> str:
    """"review rejected: <the first line the reviewer printed>" (its exit code when it printed nothing)."""
    first = next((line for line in output.splitlines() if line.strip()), "")
    return one_line(f"review rejected: {first}" if first else f"review rejected (exit {code})")


def scope(paths: Iterable[str]) -> str:
    return one_line("scope: wrote " + ", ".join(paths))


def cancelled() -> str:
    return "cancelled"


LAUNCH_FAILED = "launch failed: "


def launch_failed(error: str) -> str:
    """A start that failed before any attempt (a missing worker program): the task stays QUEUED, and this says why
    and how to fix it until an attempt starts."""
    return one_line(LAUNCH_FAILED + error)


def interrupted(why: str) -> str:
    return one_line(f"interrupted: {why}")
