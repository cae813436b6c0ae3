"""newfile.create_whole: a file that appears under its name only with its content (aipm/newfile.py)."""

from __future__ import annotations

import os
import stat

import pytest

from aipm.newfile import create_whole


def test_a_whole_file_is_opened_by_its_name_with_its_content(tmp_path):
    path = tmp_path / "x.lock"
    fd = create_whole(str(path), b"a/b.txt")
    try:
        assert path.read_bytes() == b"a/b.txt" and stat.S_IMODE(path.stat().st_mode) == 0o600
        # Its descriptor names the file (lockholders.py reads them), not the nameless one it was made as.
        assert os.readlink(f"/proc/self/fd/{fd}") == str(path) and os.fstat(fd).st_ino == path.stat().st_ino
    finally:
        os.close(fd)


def test_an_existing_file_is_never_replaced_and_a_missing_directory_is_said(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        create_whole(str(path), b"ours")
    assert path.read_bytes() == b"theirs"
    with pytest.raises(FileNotFoundError):
        create_whole(str(tmp_path / "gone" / "x.lock"), b"ours")
    assert sorted(os.listdir(tmp_path)) == ["x.lock"]
