"""Atomic outputs never leave a half-written file under the final name."""

import os

import pytest

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError


def test_success_renames_and_leaves_no_temp(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    with atomic_output(out) as tmp:
        tmp.write_text("x")
        assert not out.exists()
    assert out.read_text() == "x"
    assert os.listdir(out.parent) == ["a.txt"]


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "a.zarr"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "chunk").write_bytes(b"1")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "a.zarr"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(WsisegError, match="exists"):
        with atomic_output(out):
            pass
    with atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"]


def test_output_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WsisegError, match="cannot create output folder") as err:
        with atomic_output(blocker / "x.tif"):
            pass
    assert str(blocker) in str(err.value)


def test_file_gets_umask_permissions(tmp_path):
    out = tmp_path / "m.bin"
    with atomic_output(out) as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
