"""Helpers shared by the benchmark scripts (generation of projects, timing, tables, peer checks).

Each benchmark is run as `python benchmarks/<name>.py`; Python puts `benchmarks/` on sys.path, so
`import _common` works without installing anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "apt-get install make ninja-build parallel hyperfine"


def aipm_cmd() -> list[str]:
    """The aipm next to this interpreter (the venv's console script), else `python -m aipm`."""
    exe = Path(sys.executable).with_name("aipm")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "aipm"]


def require_peers(*tools: str) -> None:
    """Exit 0 with a message when a peer tool is missing (a skip, not a failure)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"SKIP: peer tool(s) not found: {', '.join(missing)}")
        print(f"      install them with: {INSTALL_HINT}")
        sys.exit(0)


def require_module(name: str, install: str) -> None:
    """Exit 0 with a message when a Python module a script needs is missing (a skip, not a failure)."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        print(f"SKIP: {name} is needed: {install}")
        sys.exit(0)


def require_aipm() -> None:
    try:
        subprocess.run(aipm_cmd() + ["--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    except (OSError, subprocess.CalledProcessError):
        print("SKIP: aipm is not runnable from this interpreter; install it: pip install -e .")
        sys.exit(0)
    compile_bytecode()


def compile_bytecode() -> None:
    """Give aipm's modules their bytecode, as `pip install` does: an editable install run where
    PYTHONDONTWRITEBYTECODE is set (this sandbox sets it) compiles every module from source at every start
    (~70 ms here), a cost no installed copy pays. Writes only __pycache__/ (ignored by git)."""
    import compileall

    import aipm

    compileall.compile_dir(str(Path(aipm.__file__).parent), quiet=1)


def temp_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"aipm-bench-{tag}-"))


def make_project(root: Path, order: str, max_workers: int) -> Path:
    """An aipm project root with `aipm.yaml` and an empty order directory; returns the order directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "aipm.yaml").write_text(f"max_workers: {max_workers}\n")
    odir = root / "orders" / order
    odir.mkdir(parents=True, exist_ok=True)
    return odir


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def task_text(
    tid: str,
    command: str,
    depends_on: list[str] | None = None,
    targets: list[str] | None = None,
    status: str | None = None,
    priority: str | None = None,
) -> str:
    """A task file as plain text (much faster than yaml.dump when writing 100k of them).

    `command` is written double-quoted; it must not contain `"` or `\\`.
    """
    lines = [f"id: {tid}"]
    if status:
        lines.append(f"status: {status}")
    if priority:
        lines.append(f"priority: {priority}")
    lines.append(f'command: "{command}"')
    if depends_on:
        lines.append(f"depends_on: {_flow(depends_on)}")
    if targets:
        lines.append("target_files: " + _flow([f'"{t}"' for t in targets]))
    return "\n".join(lines) + "\n"


def write_tasks(odir: Path, texts: dict[str, str]) -> None:
    for tid, text in texts.items():
        with open(odir / f"{tid}.yaml", "w") as fh:
            fh.write(text)


def timed(cmd: list[str], cwd: Path | None = None, log: Path | None = None, env: dict | None = None) -> tuple[float, int]:
    """Run `cmd` to the end; (wall seconds, exit code). Output goes to `log` (or is discarded)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        return time.perf_counter() - t0, rc
    finally:
        if log:
            out.close()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def statuses(odir: Path) -> dict[str, str]:
    """Task id → status as written in its file (a plain line scan; QUEUED when absent)."""
    out = {}
    for f in odir.glob("*.yaml"):
        if f.name == "order.yaml":
            continue
        status = "QUEUED"
        for line in f.read_text().splitlines():
            if line.startswith("status:"):
                status = line.split(":", 1)[1].strip().strip("'\"")
                break
        out[f.stem] = status
    return out


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def aipm_revision() -> str:
    """The git commit of the aipm being measured, with "+dirty" when its package has uncommitted changes."""
    try:
        import aipm

        pkg = Path(aipm.__file__).resolve().parent
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head or "?") + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def machine() -> str:
    import platform

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.node()} · {os.cpu_count()} CPUs · load {load} · Python {platform.python_version()} · "
            f"aipm {aipm_revision()} · {time.strftime('%Y-%m-%d %H:%M')}")


def keep_or_remove(path: Path) -> None:
    """Remove the generated work unless BENCH_KEEP=1. Only once a script has measured everything: on ext4
    without a journal (this machine's disk) every file created within 60 s of many deletions in its block group
    scans the freed inodes first, so a run that follows the removal of the previous run's trees pays for them
    (B2 measured at 3.3-3.6 ms/edge after a quiet minute, 6-7 ms right after removing a few thousand files)."""
    if os.environ.get("BENCH_KEEP") == "1":
        print(f"(kept {path})")
    else:
        remove_project(path)


def remove_project(path: Path) -> None:
    """A generated tree and the state directories (`/tmp/aipm-<uid>/...`, outside the tree) of the aipm projects in
    it: left behind, every run of a benchmark added one of up to 4 MB (a lock file per task) that nothing removed."""
    try:
        from aipm.statedir import state_dir
    except ImportError:  # an interpreter without aipm: there is no state directory of its making to find
        state_dir = None
    for root in [path, *path.glob("*/"), *path.glob("*/*/")] if state_dir else []:
        if (root / "aipm.yaml").is_file() or (root / ".aipm").is_dir():
            with contextlib.suppress(OSError):
                shutil.rmtree(state_dir(root))
    shutil.rmtree(path, ignore_errors=True)


def build_floor(work: Path) -> Path | None:
    """`floor.c` (the contract's durable status writes and the commands' starts, nothing else) built with `cc`
    into `work`; None (the row is left out, with a note) when there is no compiler or the build fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    out = work / "floor"
    if cc is None or subprocess.run([cc, "-O2", "-o", str(out), str(Path(__file__).with_name("floor.c"))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        print("(no floor row: cc is missing or could not build benchmarks/floor.c)")
        return None
    return out


def run_floor(floor: Path | None, mode: str, n: int, root: Path, order: str, command: list[str]) -> float | None:
    """Wall seconds of `floor MODE N ORDER_DIR COMMAND...` in the project `root` (None without a floor)."""
    if floor is None:
        return None
    t, rc = timed([str(floor), mode, str(n), str(root / "orders" / order), *command], cwd=root)
    if rc != 0:
        raise SystemExit(f"floor exited {rc}")
    return t


def durable_write_ms(directory: Path, count: int = 50) -> float:
    """Median cost of one durable atomic write on this disk (temp file, write, fsync, rename, directory
    fsync): the floor under every status aipm records. Shown next to the figures it explains."""
    directory.mkdir(parents=True, exist_ok=True)
    times = []
    dfd = os.open(directory, os.O_RDONLY)
    try:
        for i in range(count):
            t0 = time.perf_counter()
            tmp = directory / f".probe{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, b"id: T0\nstatus: DONE\n" * 4)
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, directory / "probe.yaml")
            os.fsync(dfd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(dfd)
    times.sort()
    return times[len(times) // 2] * 1000
