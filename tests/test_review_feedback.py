"""What a rejected review leaves the next attempt: its output as feedback (the prompt's last section,
`AIPM_REVIEW_FEEDBACK`), of a size an agent's context can take, and the reason's first line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from conftest import write_task

DOCS = Path(__file__).resolve().parents[1] / "docs"
KEPT = 48 << 10  # the most of a review's output given to the next attempt, as the docs say


def _template_project(project, review, max_rework: int = 1) -> Path:
    """One agent-like task (the worker template, its prompt kept as `.prompt.md`) with `review`."""
    (project.root / "aipm.yaml").write_text(yaml.safe_dump({"worker": {"command": ["true", "{prompt_file}"]}}))
    return write_task(project.order(), "T", prompt="Do the thing.", review=review, max_rework=max_rework,
                      target_files=["t.txt"])


def test_a_large_review_output_is_cut_to_its_head_and_tail_for_the_next_attempt(project):
    # Some 2 MiB (over the 1 MiB once kept whole): the first error on the first line, a summary on the last.
    (project.root / "review.py").write_text(
        "import sys\n"
        "sys.stdout.write('xxxx first error\\n' + ''.join(f'line {i:06d} ' + 'y' * 88 + '\\n' for i in range(20000))"
        " + 'SUMMARY: 3 failed\\n')\n"
        "sys.exit(1)\n")
    path = _template_project(project, [sys.executable, "review.py"])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "finish   T → QUEUED (review rejected: xxxx first error)" in proc.stdout, proc.stdout
    assert yaml.safe_load(path.read_text())["reason"] == "review rejected: xxxx first error"

    logs = project.root / ".aipm/logs/ORD"
    whole = (logs / "T.2.review.log").read_bytes()
    feedback = (project.root / ".aipm/feedback/ORD/T.txt").read_bytes()  # the second review's, as the first's
    marker = re.search(rb"\naipm: ([0-9,]+) bytes of the review's output cut here; all of it is in (\S+)\n\n", feedback)
    assert marker, feedback[:200]
    assert marker[2].decode() == str(logs / "T.2.review.log")
    kept = feedback[: marker.start()] + feedback[marker.end():]
    assert len(kept) <= KEPT
    # Head and tail at line ends, and the count is what lies between them.
    assert whole.startswith(feedback[: marker.start()]) and whole.endswith(feedback[marker.end():])
    assert kept.startswith(b"xxxx first error\nline 000000 ") and kept.endswith(b"\nSUMMARY: 3 failed\n")
    assert feedback[marker.end():].startswith(b"line ")
    assert int(marker[1].replace(b",", b"")) == len(whole) - len(kept)

    prompt = (logs / "T.2.prompt.md").read_bytes()
    assert prompt.startswith(b"Do the thing.\n\n## Review feedback from the previous attempt\n\nxxxx first error\n")
    assert len(prompt) < KEPT + 1024
    assert "48 KiB" in (DOCS / "workers.md").read_text() and "48 KiB" in (DOCS / "locks-review-recovery.md").read_text()


def test_a_review_output_within_the_limit_is_kept_whole(project):
    _template_project(project, "printf 'E501 line too long\\n\\nsecond\\n'; exit 1", max_rework=0)
    assert project.aipm("run", "ORD").returncode == 1
    assert (project.root / ".aipm/feedback/ORD/T.txt").read_bytes() == b"E501 line too long\n\nsecond\n"


def test_a_review_that_printed_nothing_says_so_in_the_feedback(project):
    # An empty feedback section told the agent nothing of why it was sent back: it is told the command and its code.
    path = _template_project(project, "exit 4")
    assert project.aipm("run", "ORD").returncode == 1
    assert yaml.safe_load(path.read_text())["reason"] == "review rejected (exit 4)"
    said = "the review command `exit 4` exited 4 and printed nothing\n"
    assert (project.root / ".aipm/feedback/ORD/T.txt").read_text() == said
    prompt = (project.root / ".aipm/logs/ORD/T.2.prompt.md").read_text()
    assert prompt.endswith("## Review feedback from the previous attempt\n\n" + said)



def test_a_silent_review_that_timed_out_says_both(project):
    # It exits 0 on the SIGTERM (no wrapper's line of a signal), and its shell's messages go nowhere.
    path = _template_project(project, "trap 'exit 0' TERM; exec 2>/dev/null; while :; do sleep 1; done", max_rework=0)
    path.write_text(path.read_text() + "timeout: 2\n")
    assert project.aipm("run", "ORD").returncode == 1
    assert yaml.safe_load(path.read_text())["reason"] == "review timed out after 2 s"
    command = yaml.safe_load(path.read_text())["review"]
    assert (project.root / ".aipm/feedback/ORD/T.txt").read_text() == \
        f"the review command `{command}` printed nothing\nreview timed out after 2 s\n"
