"""Where workers run: on this machine (`local`) or on a Ray cluster (`ray`).

A Ray attempt is still started, watched, timed out and adopted exactly like a local one: the local worker
process (holding the target-file locks, recorded among the worker records, in its own process group) runs
`python -m aipm.cluster.attempt`, a Ray driver that submits the command to the cluster and waits for it. So
locks, statuses, records, timeouts and adoption after a killed `aipm run` stay in aipm, unchanged; only the
command's own process tree lives on a Ray node, under a guard (`aipm.cluster.guard`) that ends that whole tree
when the attempt ends, is cancelled, or loses its Ray worker.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Sequence

from aipm.errors import UserError
from aipm.model import Resources
from aipm.workerfiles import reason

# The attempt's exit code when its Ray worker cannot be had or is lost: a failed attempt like any other.
LOST = 75  # EX_TEMPFAIL
# The driver's reasons (attempt.main), beside the exit file: before its Ray task was submitted (see ran_nothing),
# and once it was, lost by Ray (see unseen).
UNREACHED = "cannot reach the Ray cluster"  # its line in the log is the check's, said as the run's error
NOT_SUBMITTED = "no Ray task was submitted"  # the end of a stop's while it reached the cluster
ENDED = "Ray ended the attempt"
# Noted while the attempt's Ray task runs, replaced once its result (or a stop's end) is back. Left behind, the
# driver ended without its result and without a word of its own: Ray's own exit 1 when the cluster's GCS is gone a
# minute ("Failed to connect to GCS within 60 seconds"), which may come before its task is found lost (see gone).
AWAITED = "its Ray task was submitted; no result came back"


# The oldest Ray with every internal the attempt uses: ray._private.services.find_node_ids came in 2.54
# (InnerGcsClient in 2.41-2.44), read from the wheels of each release. pyproject.toml's `ray` extra says the same.
MIN_RAY = (2, 54)


def require_ray() -> None:
    """One clear line when `--runner ray` is asked for without Ray installed, or with a Ray older than MIN_RAY (each
    attempt's reach of the cluster failed on an import, said as "cannot reach the Ray cluster")."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None: an import of it is blocked
        found = False
    if not found:
        raise UserError("runner ray: the `ray` package is not installed; install it with `pip install 'aipm[ray]'`")
    from importlib import metadata  # (only here: its import costs every other command's start)

    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return  # a Ray built from source without its metadata: let it try
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    if numbers < list(MIN_RAY):
        least = ".".join(map(str, MIN_RAY))
        raise UserError(f"runner ray: Ray {version} is too old (aipm needs Ray {least} or later); upgrade it with "
                        f"`pip install 'ray>={least}'`")


def check(address: str, source: str = "default") -> None:
    """Reach the cluster at `address` (the ray.address setting, from `source`) once (reached), before a run's first
    launch. An address of no form Ray reads, or a cluster that cannot be reached, is no Ray cluster, or has no node on
    this machine, is a UserError (one line, exit 2, nothing changed): each attempt would find it so only once
    started, each spending one of its task's attempts."""
    check_form(address, source)
    why = reached(address)
    if why is not None:
        raise UserError(f"runner ray: {why}")


def check_form(address: str, source: str = "default") -> None:
    """An address of no form Ray reads is a UserError naming where it came from (RAY_ADDRESS or aipm.yaml)."""
    if address != "auto" and host_port(address) is None:
        where = "RAY_ADDRESS" if source.startswith("env ") else f"{source}: ray.address"
        raise UserError(f"{where}: {address!r} is not a Ray cluster address; use HOST:PORT (the head's GCS port: 6379 "
                        "unless its `ray start --port` said another), ray://HOST:PORT or auto")


def host_port(address: str) -> tuple[str, int] | None:
    """`address`'s host and port (host:port or ray://host:port); None for other forms ("auto" unresolved)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def reached(address: str) -> str | None:
    """Why the cluster at `address` cannot be used from here, found as an attempt finds it before it submits its task
    (`auto` resolved, the port probed, its GCS asked, a raylet of it looked for here); None when it can."""
    proc = subprocess.run([sys.executable, "-m", "aipm.cluster.attempt", "--address", address, "--check"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.returncode == 0:
        return None
    said = [line.removeprefix("[aipm] ") for line in proc.stdout.splitlines()
            if line.startswith(f"[aipm] {UNREACHED}")]
    return said[-1] if said else f"{UNREACHED} ({address})"


def gone(exit_file: str, command: Sequence[str], code: int | None) -> str | None:
    """Why the Ray cluster itself is gone, when an attempt Ray lost (failure) ended so because its cluster cannot be
    reached now, else None: not the loss of one node of a cluster that lives on, which is a failed attempt like any
    other. Such an attempt is no failure of its task, and every other attempt would be lost the same way."""
    if failure(exit_file, command, code) is None and not (is_attempt(command) and reason(exit_file) == AWAITED):
        return None
    return reached(command[command.index("--address") + 1])


def wrap(command: str | Sequence[str], *, address: str, resources: Resources | None,
         stdin: str | None, exit_file: str) -> list[str]:
    """The local worker's argv that runs `command` on the Ray cluster at `address` (`auto`: one on this machine).

    The command's stdin (an agent's prompt file) is opened on the node, so it must be on the shared filesystem,
    as the project is.
    """
    argv = [sys.executable, "-m", "aipm.cluster.attempt", "--address", address, "--exit-file", exit_file]
    if resources is not None:
        for flag, value in (("--cpus", resources.cpus), ("--memory-mb", resources.memory_mb),
                            ("--gpus", resources.gpus)):
            if value is not None:
                argv += [flag, str(value)]
    if stdin:
        argv += ["--stdin", stdin]
    if isinstance(command, str):
        return argv + ["--shell", command]
    return argv + ["--", *command]


def failure(exit_file: str, command: Sequence[str], code: int | None) -> str | None:
    """Why Ray lost an attempt (exit LOST), as its driver noted it (`cannot reach the Ray cluster (ADDR):
    Connection refused`), for the task's reason in place of a bare "exit 75"; None for any other attempt or exit,
    the command's own exit 75 included."""
    if code != LOST or not is_attempt(command):
        return None
    return reason(exit_file)


def is_attempt(command: Sequence[str]) -> bool:
    """Whether a worker's command (its record's) is a Ray attempt's driver (wrap), whose command runs on a node."""
    return "aipm.cluster.attempt" in command[:3]


def unseen(exit_file: str, command: Sequence[str], code: int | None) -> bool:
    """Whether Ray lost the attempt once its task was submitted (its worker or node died, the cluster went): the
    command may have run on the node, and what it did there may never have reached the log (an agent's first event
    too), so it did not end by itself and its cost is unseen."""
    return (failure(exit_file, command, code) or "").startswith(ENDED)


def ran_nothing(exit_file: str, command: Sequence[str]) -> bool:
    """Whether the attempt ended before its Ray task was submitted (the cluster not reached, or a timeout, cancel or
    Ctrl-C while it reached it): its command never ran, so an agent's cap is not spent, however the attempt ended."""
    why = (reason(exit_file) or "") if is_attempt(command) else ""
    return why.startswith(UNREACHED) or why.endswith(NOT_SUBMITTED)
