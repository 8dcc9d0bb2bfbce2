"""The kernel's caches of names and attributes stay true when ctl commands change the
namespace: a volume or snapshot deleted and taken again under the same name is opened at
once (no ENOENT from the dead inode the kernel kept for the entry timeout), a deleted name
is gone at once, a resize or rollback shows its size at once. Commands go straight to the
ctl file (what the CLI writes), so that the next open follows within milliseconds."""

import errno
import os

import pytest

from snapfs.ctlclient import ctl
from tests.conftest import Snapfs

pytestmark = pytest.mark.fuse

KiB, MiB = 1 << 10, 1 << 20
ROUNDS = 20


def _command(fs: Snapfs, line: str):
    return ctl(str(fs.mnt), line)


def _gone(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def test_a_volume_deleted_and_created_again_is_opened_at_once(snapfs: Snapfs):
    fs = snapfs
    vol = fs.vol("x")
    for i in range(ROUNDS):
        first, second = (1 * MiB + i * 64 * KiB), (2 * MiB + i * 64 * KiB)
        _command(fs, f"volume create x --size {first} --block-size 64K")
        data = bytes([i + 1]) * 4096
        with open(vol, "r+b") as f:
            assert os.fstat(f.fileno()).st_size == first
            f.write(data)
            f.seek(0)
            assert f.read(len(data)) == data
        _command(fs, "volume delete x")
        assert _gone(vol), f"round {i}: volumes/x still there after its delete"
        _command(fs, f"volume create x --size {second} --block-size 64K")
        try:
            f = open(vol, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            pytest.fail(f"round {i}: the new x: {errno.errorcode.get(exc.errno)} ({exc})")
        with f:
            assert os.fstat(f.fileno()).st_size == second, f"round {i}"
            assert f.read(len(data)) == bytes(len(data)), f"round {i}: the old x's data"
        assert os.stat(vol).st_size == second
        _command(fs, f"volume resize x --size {second + 64 * KiB}")
        assert os.stat(vol).st_size == second + 64 * KiB, f"round {i}: size before the resize"
        _command(fs, "volume delete x")


def test_a_snapshot_deleted_and_taken_again_is_opened_at_once(snapfs: Snapfs):
    fs = snapfs
    _command(fs, "volume create v --size 1M --block-size 64K")
    snap = fs.snap("v", "s")
    for i in range(ROUNDS):
        size = 1 * MiB + i * 64 * KiB
        old, new = bytes([2 * i + 1]) * 4096, bytes([2 * i + 2]) * 4096
        with open(fs.vol("v"), "r+b") as f:
            f.write(old)
        _command(fs, "snapshot create v@s")
        with open(snap, "rb") as f:
            assert f.read(len(old)) == old
        _command(fs, "snapshot delete v@s")
        assert _gone(snap), f"round {i}: snapshots/v/s still there after its delete"
        _command(fs, f"volume resize v --size {size + 64 * KiB}")
        with open(fs.vol("v"), "r+b") as f:
            f.write(new)
        _command(fs, "snapshot create v@s")
        try:
            f = open(snap, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            pytest.fail(f"round {i}: the new v@s: {errno.errorcode.get(exc.errno)} ({exc})")
        with f:
            assert os.fstat(f.fileno()).st_size == size + 64 * KiB, f"round {i}"
            assert f.read(len(new)) == new, f"round {i}: the old snapshot's data"
        _command(fs, "snapshot delete v@s")
    assert _gone(fs.mnt / "snapshots" / "v")  # its last snapshot went: so did the directory


def test_rollback_shows_the_snapshot_size_at_once(snapfs: Snapfs):
    fs = snapfs
    _command(fs, "volume create r --size 1M --block-size 64K")
    _command(fs, "snapshot create r@small")
    for i in range(5):
        _command(fs, f"volume resize r --size {2 * MiB + i * 64 * KiB}")
        assert os.stat(fs.vol("r")).st_size == 2 * MiB + i * 64 * KiB
        _command(fs, "snapshot rollback r@small")
        assert os.stat(fs.vol("r")).st_size == 1 * MiB, f"round {i}"
