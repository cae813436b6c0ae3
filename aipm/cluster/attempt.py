"""`python -m aipm.cluster.attempt`: one attempt's command, run on a Ray cluster; this process waits for it.

It is the local worker process of a `--runner ray` attempt, so it holds the attempt's target-file locks and is
what the supervisor watches, times out and adopts. It exits with the remote command's exit code. SIGTERM, SIGINT
or SIGHUP (a timeout, `aipm cancel`, Ctrl-C of `run`) cancels the Ray task, and this process waits until the
command has ended on the node (the guard's grace at most: it TERMs the command's group, KILLs what is left) before
it exits with 128+N, so the locks are not freed while the command may still write. If this process is SIGKILLed,
Ray fate-shares the task with its driver and the guard ends the tree the same way, but nothing waits for it.

Signals and Ray: `ray.init()` puts its own SIGTERM handler in place (sys.exit), and the core worker it starts puts
absl's failure handler over it (prints "*** SIGTERM received ...", then calls the handler it replaced). So Ray is
started in a thread of its own with the stop signals blocked (the threads Ray starts inherit the mask and never take
them; off the main thread ray.init puts no handler in place), while the main thread stays free to take a stop;
our handler is put back after `ray.init`, and it only notes the signal (it raises nothing through Ray's C++ code):
the main thread waits in short slices (a join, then `ray.wait`) and looks at the note between them. The wrapper
that leads this process's group outlives these signals (runner.py) and waits for us: a wrapper that died at once
would get the group SIGKILLed before the cancel is done.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from aipm.cluster import AWAITED, ENDED, LOST, NOT_SUBMITTED, UNREACHED, host_port
from aipm.outcome import exited
from aipm.workerfiles import note_reason

# A stop must be over before the supervisor's SIGKILL of this process's group (stopping.KILL_GRACE, 5 s): the
# guard's grace on the node (guard.GRACE, 3 s) plus Ray's round trips fit in CANCEL_WAIT; a task still running
# then is force-cancelled (its Ray worker killed; the guard's keeper ends the tree by itself).
CANCEL_WAIT = 4.0
FORCE_WAIT = 0.5  # seconds for Ray to confirm a force-cancelled task is gone
SLICE = 0.5  # seconds of each ray.wait: between slices the main thread sees a stop signal
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PROBE_TIMEOUT = 5.0  # seconds for the cluster's port to answer before ray.init is asked


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(signum)


_received: list[int] = []


def _note(signum, frame):
    _received.append(signum)


def _wait_for(proc: subprocess.Popen) -> int:
    """The guard's exit code; Python code runs between polls, so Ray's KeyboardInterrupt (a cancel) gets in."""
    while proc.poll() is None:
        time.sleep(0.1)
    return proc.returncode


def ray_task_env() -> dict[str, str | None]:
    """The variables Ray sets in its worker for this task (as its execute_task does), by their value there (None:
    unset there): the visible-devices variable of each accelerator (CUDA_VISIBLE_DEVICES, ...) and OMP_NUM_THREADS.
    Every accelerator's, not only those assigned the task: a task that asks for none sees the node's, or with
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 there Ray's empty one, never the submitter's (devices of another machine).
    Only these: the rest of the worker's environment is the node's, where the command gets the attempt's."""
    import ray
    from ray._private.accelerators import get_accelerator_manager_for_resource

    names = ["OMP_NUM_THREADS"]
    for resource in ray.get_runtime_context().get_accelerator_ids():
        names.append(get_accelerator_manager_for_resource(resource).get_visible_accelerator_ids_env_var())
    return {name: os.environ.get(name) for name in names if name}  # Apple's MPS has no name


def run_on_node(spec: dict) -> dict:
    """The Ray task: run the guard (which runs the command) on this node and report how it ended."""
    # The GPUs Ray gave this task, not the submitter's; and this worker's pid, for the guard to check it is alive.
    env = {name: value for name, value in {**spec["env"], **ray_task_env()}.items() if value is not None}
    spec = dict(spec, env=env, parent=os.getpid())
    proc = subprocess.Popen([sys.executable, "-m", "aipm.cluster.guard"], stdin=subprocess.PIPE,
                            env=spec["env"], cwd=spec["cwd"])
    import json

    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    try:
        code = _wait_for(proc)
    except KeyboardInterrupt:  # ray.cancel without force: stop the command and return only once it has ended
        proc.send_signal(signal.SIGTERM)  # the guard TERMs the command's group, KILLs what is left after its grace
        while True:
            try:
                code = _wait_for(proc)
                break
            except KeyboardInterrupt:  # Ray repeats a cancel it sees no answer to
                continue
        return {"code": code, "host": socket.gethostname(), "guard_pid": proc.pid, "cancelled": True}
    return {"code": code, "host": socket.gethostname(), "guard_pid": proc.pid}


def resolved(address: str) -> str:
    """The cluster ray.init will connect to for `address`: for "auto", as Ray resolves it (RAY_ADDRESS, a Ray
    cluster running on this machine, else the one `ray start` last wrote in Ray's temp directory, RAY_TMPDIR's).
    Raises ConnectionError (Ray's words) when there is none."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address  # starts no thread: signals are not blocked yet

    return canonicalize_bootstrap_address(address) or address


def unreachable(address: str) -> str | None:
    """Why nothing answers at `address` (host:port or ray://host:port), else None. ray.init retries an address
    where nothing listens for some 14 minutes, holding the attempt's place and locks, deaf to signals: a refused
    or silent port ends the attempt at once instead. Forms not host:port are left to Ray."""
    place = host_port(address)
    if place is None:
        return None
    try:
        socket.create_connection(place, timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def no_cluster(address: str) -> str | None:
    """Why the port at `address` (which answers) is no Ray cluster's, or this machine no node of it, else None:
    another service's port (a web server, a database, a raylet's gRPC port) passes the probe, and ray.init would
    retry it as a GCS for some 12 minutes. Ray's own GCS client asks it once (about PROBE_TIMEOUT plus Ray's 10 s of
    connection attempts). A driver joins the cluster through a raylet of its own machine, found as ray.init finds
    it (a raylet process here that is a live node of the cluster): without one, ray.init waits a minute for it and
    fails. Ray starts threads here: called where ray.init is, signals blocked. ray:// (a Ray Client server, which
    needs no node here) is left to Ray."""
    if address.startswith("ray://") or host_port(address) is None:
        return None
    from ray._private.services import find_node_ids
    from ray._raylet import InnerGcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        gcs = InnerGcsClient.standalone(address, None, int(PROBE_TIMEOUT * 1000))
        nodes = gcs.get_all_node_info(PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - Ray's RpcError (or whatever else it raises): not a cluster we can use
        return f"no Ray cluster answers at this port ({_first_line(exc)})"
    here = set(find_node_ids())
    if not any(node.hex() in here and info.state == GcsNodeInfo.GcsNodeState.ALIVE for node, info in nodes.items()):
        return f"this machine is no node of it (a Ray driver needs one: `ray start --address={address}` here)"
    return None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _connect(target: str, init: bool) -> str | None:
    """Why the port at `target` is no Ray cluster's (no_cluster), else None, and with `init` this process then a
    driver of that cluster. Both can take long, deaf to signals (Ray's GCS check some 15 s; ray.init a minute where
    this machine is no node of the cluster), so they run in a thread of their own with the stop signals blocked,
    as every thread Ray starts from it inherits: this main thread takes a stop meanwhile, and the attempt ends at
    once (a stop waited for them, and the supervisor SIGKILLed the group after its grace). Off the main thread
    ray.init puts no handler of its own in place; the core worker's (absl's: it logs the signal, then calls ours)
    is replaced by ours once it is done."""
    outcome = ["ended without a word"]  # this thread reads it only once the other has ended

    def reach() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            import ray

            outcome[0] = no_cluster(target)
            if outcome[0] is None and init:
                logging.getLogger("ray").setLevel(logging.ERROR)  # its warning that it sets no SIGTERM handler
                # Logs to the driver: the autoscaler's events among them (see _watch_autoscaler)
                ray.init(address=target, log_to_driver=True, logging_level="ERROR", configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is one line in the log
            outcome[0] = _first_line(exc)

    for sig in STOPS:
        signal.signal(sig, _note)  # Python code only between the slices: nothing to raise through
    thread = threading.Thread(target=reach, daemon=True)  # left to os._exit if we are stopped
    thread.start()
    while thread.is_alive() and not _received:
        thread.join(SLICE)
    for sig in STOPS:
        signal.signal(sig, _note)
    return outcome[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aipm.cluster.attempt")
    parser.add_argument("--address")
    parser.add_argument("--exit-file")  # none for --check
    parser.add_argument("--cpus", type=float)
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("--gpus", type=float)
    parser.add_argument("--stdin")
    parser.add_argument("--shell")
    parser.add_argument("--check", action="store_true", help="only reach the cluster, as an attempt would; no task")
    parser.add_argument("argv", nargs="*")
    args = parser.parse_args(argv)
    for sig in STOPS:
        signal.signal(sig, _stop)
    if not os.environ.get("RAY_ADDRESS", "-").strip():
        del os.environ["RAY_ADDRESS"]  # blank: unset for aipm's settings, so for Ray too (it would fail to parse it)
    spec = {"env": dict(os.environ), "cwd": os.getcwd(), "shell": args.shell, "argv": args.argv,
            "stdin": args.stdin, "log": os.environ.get("AIPM_LOG")}
    address = target = args.address or "auto"  # the ray.address setting, which RAY_ADDRESS sets too
    try:
        target = resolved(address)  # what is probed is what ray.init is given
        why = unreachable(target) or _connect(target, init=not args.check)
    except _Stopped as stop:
        _received.append(stop.args[0])
    except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is one line in the log
        why = _first_line(exc)
    if _received:
        why = f"stopped by signal {_received[0]} while reaching the Ray cluster: {NOT_SUBMITTED}"
        return _lost(args.exit_file, why, 128 + _received[0])
    if why is not None:
        shown = address if target == address else f"{address}: {target}"
        return _lost(args.exit_file, f"{UNREACHED} ({shown}): {why}")
    if args.check:
        return 0
    import ray  # (imported by _connect)

    options = {"max_retries": 0, "num_cpus": args.cpus if args.cpus is not None else 1}
    if args.memory_mb:
        options["memory"] = args.memory_mb * 1024 * 1024
    if args.gpus:
        options["num_gpus"] = args.gpus
    shape = {name: float(options[key]) for name, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"),
                                                          ("memory", "memory")) if options.get(key)}
    _watch_autoscaler(shape)
    _say_why(args.exit_file, AWAITED)  # (before the submit: a driver ended just after it is covered too)
    ref = ray.remote(run_on_node).options(**options).remote(spec)
    while not ray.wait([ref], timeout=SLICE)[0]:
        if _received:
            return _cancel(ray, ref, _received[0], args.exit_file)
        if _unplaceable.is_set():
            ray.cancel(ref)  # still in Ray's queue; were it placed meanwhile, its command is stopped as on a stop
            ray.wait([ref], timeout=CANCEL_WAIT)
            asks = ", ".join(f"{name}: {value:g}" for name, value in (("cpus", options["num_cpus"]), (
                "memory_mb", args.memory_mb), ("gpus", args.gpus)) if value)
            return _lost(args.exit_file, f"Ray cannot place the attempt: no node of the cluster can hold resources "
                                         f"{{{asks}}}, and its autoscaler can add none")
    try:
        result = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - a lost worker or node
        return _lost(args.exit_file, f"{ENDED}: {type(exc).__name__}: {_first_line(exc)}")
    _say_why(args.exit_file, "")  # back: the code is the command's
    code = result["code"]  # negative: the command died of that signal (the guard died of it too)
    print(f"[aipm] ran on Ray node {result['host']} (guard pid {result['guard_pid']}), {exited(code)}", flush=True)
    return 128 - code if code < 0 else code  # as a shell's $? says it, and the wrapper writes it


_unplaceable = threading.Event()  # Ray's autoscaler said no node type can hold this attempt's request
_INFEASIBLE = "No available node types can fulfill resource request"  # Ray's autoscaler, v1 ("request {...}") and v2
# ("requests {...}*N, {...}*M")


def _watch_autoscaler(shape: dict[str, float]) -> None:
    """Note when Ray's autoscaler says no node type of the cluster can ever hold `shape` (the request of this
    attempt's task): it would wait in Ray's queue until its timeout, its log silent. The autoscaler knows the
    node types it may add (on a cluster started by hand, those of its nodes), so a request a new node would meet
    is not among them. Its events come with the driver's logs; Ray's printing of those logs is taken out."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as logs

    def read(data: dict) -> None:
        if data.get("pid") != "autoscaler":
            return
        for line in data.get("lines", ()):
            if _INFEASIBLE in line and shape in _requests(line):
                _unplaceable.set()

    logs.remove_handler("ray_print_logs")
    logs.add_handler("aipm_autoscaler", read)


def _requests(line: str) -> list[dict]:
    """The resource requests an autoscaler line names ({'CPU': 4.0} each)."""
    found = []
    for text in re.findall(r"\{[^{}]*\}", line):
        with contextlib.suppress(ValueError, SyntaxError):
            found.append(ast.literal_eval(text))
    return found


def _lost(exit_file: str | None, why: str, code: int = LOST) -> int:
    """The attempt ends LOST (or `code`: stopped): why, in the log for the person and beside the exit file for the
    task's reason and its cost (the command writes the log too, and may exit 75 itself)."""
    print(f"[aipm] {why}", flush=True)
    _say_why(exit_file, why)
    return code


def _say_why(exit_file: str | None, why: str) -> None:
    """`why` beside the exit file (none for --check); "" takes back what was noted there."""
    if exit_file:
        note_reason(exit_file, why)


def _cancel(ray, ref, signum: int, exit_file: str | None) -> int:
    """Cancel the Ray task and wait (CANCEL_WAIT at most) until the command has ended on the node: a cancel
    without force raises KeyboardInterrupt in run_on_node, which stops the guard and returns once it has ended.
    Past CANCEL_WAIT (or a task stuck in Ray) the task is force-cancelled: its Ray worker is killed, and the
    guard's keeper ends the command's tree by itself, unwatched."""
    how = "the command has ended on the node"
    try:
        ray.cancel(ref, force=False)
        if not ray.wait([ref], timeout=CANCEL_WAIT)[0]:
            ray.cancel(ref, force=True)
            ray.wait([ref], timeout=FORCE_WAIT)
            how = (f"force-cancelled after {CANCEL_WAIT:g} s without an end; the node's guard ends what is left")
    except Exception as exc:  # noqa: BLE001 - Ray lost the task meanwhile: the guard ends the tree
        how = f"{type(exc).__name__} while cancelling; the node's guard ends what is left"
    print(f"[aipm] stopped by signal {signum}: Ray task cancelled, {how}", flush=True)
    _say_why(exit_file, "")  # the stop's end, not a loss: a driver killed before this line is left to gone()
    return 128 + signum


if __name__ == "__main__":
    code = main()
    # Not through Ray's atexit shutdown: with the cluster's GCS gone it waits for it, the locks held, until Ray's own
    # timeout for it (60 s from its loss) ends the process with exit 1 in place of ours. Nothing is left to shut
    # down: the task has ended or been cancelled.
    sys.stdout.flush()
    os._exit(code)
