"""Test seams: AIPM_TEST_KILL_AT=POINT makes the process that reaches POINT SIGKILL itself there, so tests can
crash aipm exactly between two steps whose order matters (the chaos suite kills at random instead).

Points: prepare, merge:N, cleanup (workspace), early-go (runloop: a task sure to end DONE has let its
successor go, and its own outcome is not written yet)."""

from __future__ import annotations

import os
import signal


def reached(point: str) -> None:
    if os.environ.get("AIPM_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
