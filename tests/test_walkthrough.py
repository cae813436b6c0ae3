"""docs/walkthrough.md followed as a new user would, in a fresh git repository: every `$ aipm ...` line of its
steps 1-5 is run as written, and what it prints (and the task files it shows) must be what the page shows, but
for pids, paths and times. A command, a message or a table that changes fails here until the page does."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
DOC_ROOT = "/home/me/my-repo"


def steps() -> str:
    """Steps 1 to 5: the ones a new project goes through (6 on only describe, and completion edits shell files)."""
    text = WALKTHROUGH.read_text()
    return text[text.index("## 1. "):text.index("## 6. ")]


def sessions(text: str) -> list[tuple[str, list[str]]]:
    """Each `$ command` of the console blocks (continuation lines joined) with the lines the page shows after it."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        command = None
        for line in block.splitlines():
            if command is not None and command.endswith("\\"):
                command = command[:-1] + " " + line.strip()
                out[-1] = (command, [])
            elif line.startswith("$ "):
                command = line[2:]
                out.append((command, []))
            else:
                out[-1][1].append(line)
    return out


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def normal(text: str, root: Path) -> str:
    text = text.replace(str(root), DOC_ROOT)
    text = re.sub(r"pid \d+", "pid N", text)
    return re.sub(r"'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00'", "'TIME'", text)


def test_the_walkthrough_runs_as_written(tmp_path):
    root = tmp_path / "my-repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           # The machine's load (other tests) must not add `defer` lines the page explains apart.
           "AIPM_ENABLE_MONITORING": "false", "COLUMNS": "200"}
    env.pop("AIPM_FAKE_LOAD", None)
    text = steps()
    last = None
    for command, shown in sessions(text):
        if command == "cd my-repo":
            continue
        if command == "echo $?":
            assert shown == [str(last.returncode)], (last.stdout, last.stderr)
            continue
        assert command.startswith("aipm "), command
        last = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        printed = normal(last.stdout + last.stderr, root).splitlines()
        shown = [normal(line, root) for line in shown]
        if not shown:  # the page says what it shows in a comment, not the output
            assert last.returncode == 0, (command, last.stdout, last.stderr)
        elif command.startswith("aipm run"):  # two tasks run side by side: their lines may come in either order
            assert Counter(printed) == Counter(shown), (command, printed)
        else:
            assert printed == shown, (command, printed)
    blocks = yaml_blocks(text)
    written = next(block for block in blocks if block.startswith("# yaml-language-server"))
    task = root / "orders" / "ORDER_001" / "TASK_003.yaml"
    ended = next(block for block in blocks if block.startswith("status: COMPLETED"))
    final = normal(task.read_text(), root)
    assert final.startswith(written.rsplit("status: QUEUED\n", 1)[0]), final
    assert final.endswith(normal(ended, root)), final
