# Test hook (tests/test_pid_reuse.py): with AIPM_REUSE_PID set, the first worker spawn of this process that can get
# that pid gets it (ns_last_pid written right before the spawn; only inside a private pid namespace). It stands for
# the kernel handing out a pid again after wrap-around.
import os

_want = os.environ.get("AIPM_REUSE_PID")
if _want:
    import aipm.posix_spawn as _spawning

    _prepared, _done = _spawning.prepared, []

    def prepared(*args, **kwargs):
        call = _prepared(*args, **kwargs)

        def spawn():
            if not _done:
                with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
                    handle.write(str(int(_want) - 1))
            pid = call()
            if pid == int(_want):
                _done.append(pid)
            return pid
        return spawn

    _spawning.prepared = prepared
