"""`python -m aipm.cluster.attempt`: one attempt's command, run on a Ray cluster; this process waits for it.

It is the local worker process of a `--runner ray` attempt, so it holds the attempt's target-file locks and is
what the supervisor watches, times out and adopts. It exits with the remote command's exit code. SIGTERM (a
timeout, `aipm cancel`, Ctrl-C of `run`) cancels the Ray task; the node's guard then ends the command's whole
process tree. If this process is SIGKILLed, Ray fate-shares the task with its driver and the guard does the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

# Ray calls these when the attempt's Ray worker cannot be had or is lost: a failed attempt like any other.
LOST = 75  # EX_TEMPFAIL
CANCEL_WAIT = 10.0  # seconds to wait for Ray to confirm a cancelled task is gone
PROBE_TIMEOUT = 5.0  # seconds for the cluster's port to answer before ray.init is asked


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(signum)


def run_on_node(spec: dict) -> dict:
    """The Ray task: run the guard (which runs the command) on this node and report how it ended."""
    proc = subprocess.Popen([sys.executable, "-m", "aipm.cluster.guard"], stdin=subprocess.PIPE,
                            env=spec["env"], cwd=spec["cwd"])
    import json

    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    code = proc.wait()
    return {"code": code, "host": socket.gethostname(), "guard_pid": proc.pid}


def unreachable(address: str) -> str | None:
    """Why nothing answers at `address` (host:port or ray://host:port), else None. ray.init retries an address
    where nothing listens for some 14 minutes, holding the attempt's place and locks, deaf to signals: a refused
    or silent port ends the attempt at once instead. "auto" and forms not host:port are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aipm.cluster.attempt")
    parser.add_argument("--address")
    parser.add_argument("--cpus", type=float)
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("--gpus", type=float)
    parser.add_argument("--stdin")
    parser.add_argument("--shell")
    parser.add_argument("argv", nargs="*")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    spec = {"env": dict(os.environ), "cwd": os.getcwd(), "shell": args.shell, "argv": args.argv,
            "stdin": args.stdin, "log": os.environ.get("AIPM_LOG")}
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        why = unreachable(address)
        if why is None:
            import ray

            ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except _Stopped as stop:
        return 128 + stop.args[0]
    except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is one line in the log
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if why is not None:
        print(f"[aipm] cannot reach the Ray cluster ({address}): {why}", flush=True)
        return LOST
    options = {"max_retries": 0, "num_cpus": args.cpus if args.cpus is not None else 1}
    if args.memory_mb:
        options["memory"] = args.memory_mb * 1024 * 1024
    if args.gpus:
        options["num_gpus"] = args.gpus
    ref = ray.remote(run_on_node).options(**options).remote(spec)
    try:
        result = ray.get(ref)
    except _Stopped as stop:
        ray.cancel(ref, force=True)
        try:
            ray.get(ref, timeout=CANCEL_WAIT)
        except Exception:  # noqa: BLE001 - cancelled or crashed: either way the task is gone
            pass
        print(f"[aipm] stopped by signal {stop.args[0]}: Ray task cancelled", flush=True)
        return 128 + stop.args[0]
    except Exception as exc:  # noqa: BLE001 - a lost worker or node
        print(f"[aipm] Ray ended the attempt: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              flush=True)
        return LOST
    code = result["code"]
    print(f"[aipm] ran on Ray node {result['host']} (guard pid {result['guard_pid']}), exit {code}", flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
