"""Discard through the kernel: fallocate on a volume file, fstrim and `mount -o discard` on
ext4 over a loop device, and the space coming back in the catalog and in the store."""

import ctypes
import errno
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Cleanup, Snapfs, run, sha256, write_random

pytestmark = pytest.mark.fuse

MiB = 1 << 20
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with a mode (os.posix_fallocate has none): 0 or the errno."""
    res = _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length))
    return 0 if res == 0 else ctypes.get_errno()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def wait_allocated_below(path: Path, limit: int, timeout: float = 10.0) -> int:
    """st_blocks as the kernel reports it (its attribute cache lives up to a second)."""
    deadline = time.monotonic() + timeout
    while True:
        got = allocated(path)
        if got <= limit or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def store_bytes(fs: Snapfs) -> int:
    store = Path(fs.store_url.removeprefix("file://"))
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


@pytest.fixture
def snapfs(workdir: Path, cleanup: Cleanup) -> Snapfs:
    """These tests check that the store gives space back after gc: no grace period."""
    fs = Snapfs(workdir, cleanup)
    fs.init()
    fs.mount(extra=("--grace", "0"))
    return fs


def test_punch_hole_and_the_other_modes(snapfs: Snapfs):
    fs = snapfs
    fs.cli("volume", "create", "v", "--size", "8M", "--block-size", "64K")
    data = os.urandom(4 * MiB)
    with open(fs.vol("v"), "r+b") as f:
        f.write(data)
    fs.cli("sync")
    fs.cli("snapshot", "create", "v@before")
    full = allocated(fs.vol("v"))
    assert full >= 4 * MiB

    start, end = 64 * 1024 + 100, 2 * MiB + 5  # partial blocks at both edges
    fd = os.open(fs.vol("v"), os.O_RDWR)
    try:
        assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, start, end - start) == 0
        expected = data[:start] + bytes(end - start) + data[end:]
        assert os.pread(fd, 4 * MiB, 0) == expected
        # Whole blocks are holes at once: the edges' two blocks stay allocated.
        assert wait_allocated_below(fs.vol("v"), full - 1920 * 1024) <= full - 1920 * 1024

        # Plain allocation inside the size succeeds and changes nothing.
        assert fallocate(fd, 0, 0, 8 * MiB) == 0
        assert fallocate(fd, KEEP_SIZE, 0, 16 * MiB) == 0
        # Growing a volume, collapsing, inserting: EOPNOTSUPP, never silence.
        assert fallocate(fd, 0, 0, 16 * MiB) == errno.EOPNOTSUPP
        assert fallocate(fd, COLLAPSE_RANGE, 0, 64 * 1024) == errno.EOPNOTSUPP
        assert fallocate(fd, INSERT_RANGE, 0, 64 * 1024) == errno.EOPNOTSUPP
        assert fallocate(fd, PUNCH_HOLE, 0, 64 * 1024) == errno.EOPNOTSUPP  # needs KEEP_SIZE
        assert os.fstat(fd).st_size == 8 * MiB
        # ZERO_RANGE zeroes too.
        assert fallocate(fd, ZERO_RANGE | KEEP_SIZE, 3 * MiB, MiB) == 0
        expected = expected[: 3 * MiB] + bytes(MiB)
        assert os.pread(fd, 4 * MiB, 0) == expected
    finally:
        os.close(fd)

    # The snapshot taken before still reads the old data, also from the store alone.
    with open(fs.snap("v", "before"), "rb") as f:
        assert f.read(4 * MiB) == data
    fs.cli("sync")
    fs.cli("evict")
    with open(fs.vol("v"), "rb") as f:
        assert f.read(4 * MiB) == expected
    with open(fs.snap("v", "before"), "rb") as f:
        assert f.read(4 * MiB) == data
    shown = fs.cli_json("volume", "show", "v")
    assert shown["size"] == 8 * MiB
    assert shown["allocated"] == allocated(fs.vol("v")) < 4 * MiB - 2 * MiB
    # A snapshot file is read-only: the kernel refuses before we are asked.
    fd = os.open(fs.snap("v", "before"), os.O_RDONLY)
    try:
        assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, MiB) == errno.EBADF
    finally:
        os.close(fd)


def test_fstrim_gives_the_space_back(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "512M")
    dev = fs.losetup(fs.vol("db"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    ext = fs.mount_fs(dev, workdir / "ext4")
    write_random(ext / "big", 200 * MiB, seed=7)
    run(["sync"])
    os.setxattr(fs.vol("db"), "user.snapfs.snapshot", b"full")
    fs.cli("sync")
    head_sum = sha256(fs.snap("db", "full"))
    blocks_full = allocated(fs.vol("db"))
    before = fs.stats()
    bytes_before = store_bytes(fs)

    os.unlink(ext / "big")
    run(["sync"])
    run(["fstrim", str(ext)])
    dropped = blocks_full - wait_allocated_below(fs.vol("db"), blocks_full - 190 * MiB)
    assert dropped >= 190 * MiB, dropped
    assert fs.stats()["discarded_bytes"] >= 190 * MiB
    # The snapshot still reads back exact, from the cache and from the store alone.
    assert sha256(fs.snap("db", "full")) == head_sum
    fs.cli("sync")
    fs.cli("evict")
    assert sha256(fs.snap("db", "full")) == head_sum
    assert fs.stats()["stored_data_bytes"] >= before["stored_data_bytes"] - MiB

    fs.cli("snapshot", "delete", "db@full")
    fs.cli("sync")
    fs.cli("gc", "--threshold", "0.5")
    after = fs.stats()
    assert before["stored_data_bytes"] - after["stored_data_bytes"] >= 190 * MiB
    assert bytes_before - store_bytes(fs) >= 190 * MiB
    listed = fs.cli_json("volume", "list")
    entry = next(v for v in listed if v["name"] == "db")
    assert entry["size"] == 512 * MiB and entry["allocated"] < 20 * MiB
    fsck = run(["fsck", "-fn", dev], check=False)
    assert fsck.returncode in (0, 4), fsck.stdout  # mounted: fsck can only warn


def test_mount_o_discard(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "256M")
    dev = fs.losetup(fs.vol("db"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    where = workdir / "ext4"
    where.mkdir()
    run(["mount", "-o", "discard", dev, str(where)])
    fs.cleanup.push(f"mount {where}", lambda: run(["umount", str(where)], check=False))
    write_random(where / "f", 64 * MiB, seed=3)
    run(["sync"])
    os.setxattr(fs.vol("db"), "user.snapfs.snapshot", b"full")
    fs.cli("sync")
    full = allocated(fs.vol("db"))
    before = fs.stats()
    snap_sum = sha256(fs.snap("db", "full"))
    os.unlink(where / "f")
    run(["sync"])
    got = wait_allocated_below(fs.vol("db"), full - 60 * MiB)
    assert full - got >= 60 * MiB, (full, got)
    assert sha256(fs.snap("db", "full")) == snap_sum  # the snapshot keeps the file
    fs.cli("snapshot", "delete", "db@full")
    fs.cli("sync")
    fs.cli("gc", "--threshold", "0.5")
    assert before["stored_data_bytes"] - fs.stats()["stored_data_bytes"] >= 60 * MiB
    run(["umount", str(where)])
    fsck = run(["e2fsck", "-fn", dev], check=False)
    assert fsck.returncode == 0, fsck.stdout
