# Test hook (tests/test_clock_step.py): with AIPM_CLOCK_STEP=N this process sees the wall clock stepped N seconds (an
# NTP step, a VM resumed, `date -s`), from its start or, with AIPM_CLOCK_STEP_AT=FILE, from when FILE exists: what
# time.time() says, and /proc/stat's `btime`, which the kernel gives as the wall clock now minus the time since
# boot. Clocks that a step leaves alone (monotonic, boot time) are not touched.
import builtins
import io
import os
import time

_step = int(os.environ.get("AIPM_CLOCK_STEP") or 0)
_at = os.environ.get("AIPM_CLOCK_STEP_AT")


def _stepped() -> int:
    return _step if not _at or os.path.exists(_at) else 0


if _step:
    _open, _time = builtins.open, time.time

    def open(file, mode="r", *args, **kwargs):
        if file != "/proc/stat":
            return _open(file, mode, *args, **kwargs)
        with _open(file, "rb") as handle:
            lines = [b"btime %d\n" % (int(line.split()[1]) + _stepped()) if line.startswith(b"btime ") else line
                     for line in handle]
        data = b"".join(lines)
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())

    builtins.open = open
    time.time = lambda: _time() + _stepped()
