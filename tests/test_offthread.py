"""offthread.fsync_later: a written-ahead file's fsync runs while the run's thread goes on, in a native thread
that never takes the GIL (or, where none can be had, in the "disk" helper thread); its failure reaches the
waiter, and the descriptor is closed once waited for."""

from __future__ import annotations

import errno
import os
import sys
import threading

import pytest

from aipm import offthread


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


@pytest.fixture(params=["native", "helper"])
def way(request, monkeypatch):
    if request.param == "helper":
        monkeypatch.setattr(offthread, "_native", [None, 0])  # as where no native thread can be started
    elif not (sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64")):
        pytest.skip("native fsync threads only on 64-bit x86 and Arm Linux")
    return request.param


def test_a_file_is_synced_and_its_descriptor_closed(tmp_path, way):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"next version\n")
    synced = offthread.fsync_later(fd)
    assert synced.result() is None
    assert _closed(fd)
    assert synced.result() is None  # asked again: no second wait, no second close
    assert (tmp_path / "f").read_bytes() == b"next version\n"


def test_a_failed_fsync_is_raised_to_the_waiter(way):
    read, write = os.pipe()  # fsync(2) of a pipe fails (EINVAL): a failure aipm did not cause on purpose
    try:
        synced = offthread.fsync_later(read)
        with pytest.raises(OSError):
            synced.result()
        with pytest.raises(OSError):
            synced.result()  # still failed when asked again
        assert _closed(read)
    finally:
        os.close(write)


def test_the_native_way_starts_no_python_thread(tmp_path):
    """The point of the native thread: nothing that would want the GIL while the run's thread is busy in Python."""
    if not (sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64")):
        pytest.skip("native fsync threads only on 64-bit x86 and Arm Linux")
    before = {t.ident for t in threading.enumerate()}
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(20)]
    pending = [offthread.fsync_later(fd) for fd in fds]
    # (a "disk" helper another test started would be in `before`: what each call gave says which way it went)
    assert all(isinstance(synced, offthread.NativeFsync) for synced in pending)
    assert {t.ident for t in threading.enumerate()} == before
    for synced in pending:
        synced.result()
    assert all(_closed(fd) for fd in fds)
