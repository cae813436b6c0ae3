# Test hook (tests/test_clock_step.py): with AIPM_CLOCK_STEP=N, this process reads /proc/stat's `btime` N seconds
# later, as every process started after the wall clock was stepped N seconds (an NTP step, a VM resumed, `date -s`)
# reads it: the kernel gives btime as the wall clock now minus the time since boot. Nothing else is changed.
import builtins
import io
import os

_step = os.environ.get("AIPM_CLOCK_STEP")
if _step:
    _open = builtins.open

    def open(file, mode="r", *args, **kwargs):
        if file != "/proc/stat":
            return _open(file, mode, *args, **kwargs)
        with _open(file, "rb") as handle:
            lines = [b"btime %d\n" % (int(line.split()[1]) + int(_step)) if line.startswith(b"btime ") else line
                     for line in handle]
        data = b"".join(lines)
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())

    builtins.open = open
