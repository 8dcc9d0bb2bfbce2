"""The cache dir on a small file system (a 64 MiB tmpfs): mount refuses a --cache-size
that does not fit, and a write that meets ENOSPC in the cache dir fails alone: the daemon
goes on serving, and once there is room again writes and sync work."""

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SNAPFS, Cleanup, Snapfs, force_unmount, is_mounted, run
from tests.fuse.test_bad_input import one_line_error

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def small_fs(where: Path, cleanup: Cleanup, size: str = "64m") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)])
    cleanup.push(f"tmpfs {where}", lambda: _umount(where))
    return where


def _umount(where: Path) -> None:
    if is_mounted(str(where)):
        res = subprocess.run(["umount", str(where)], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> int:
    """Write `path` until the file system is full; returns the bytes written."""
    chunk = b"\xaa" * MiB
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
            written += n
            if n < len(chunk):
                break
    # Fill the last pages too (a 1 MiB write may have stopped short of them).
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                if not f.write(b"\xaa" * 4096):
                    break
            except OSError:
                break
    return written


def test_mount_refuses_a_cache_size_the_cache_dir_cannot_hold(workdir: Path, cleanup):
    small = small_fs(workdir / "small", cleanup)
    fs = Snapfs(workdir, cleanup)
    fs.init()
    cleanup.push("a mount that should not be", lambda: force_unmount(str(fs.mnt)))
    cmd = [*SNAPFS, "mount", fs.store_url, str(fs.mnt), "--cache-dir", str(small / "cache")]
    line = one_line_error(run([*cmd, "--cache-size", "128M"], check=False))
    assert "--cache-size 128M" in line and str(small / "cache") in line, line
    assert not is_mounted(str(fs.mnt))
    # What the cache files already hold counts as room: a cache that filled the disk
    # itself can be mounted again.
    fs.cache_dir = small / "cache"
    fs.mount(extra=("--cache-size", "48M"))
    fs.cli("volume", "create", "v", "--size", "40M")
    data = random.Random(1).randbytes(40 * MiB)
    with open(fs.vol("v"), "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < 48 * MiB
    fs.umount()
    fs.mount(extra=("--cache-size", "48M"))
    with open(fs.vol("v"), "rb") as f:
        assert f.read() == data
    fs.umount()
    # The cache files go (their blocks are in the store) and someone else's file takes
    # the room: refused again.
    for cached in (small / "cache").glob("vol-*.cache"):
        cached.unlink()
    (small / "other").write_bytes(b"x" * 30 * MiB)
    one_line_error(run([*cmd, "--cache-size", "48M"], check=False))
    assert not is_mounted(str(fs.mnt))


def test_enospc_in_the_cache_dir_fails_one_write_and_the_daemon_goes_on(workdir: Path, cleanup):
    small = small_fs(workdir / "small", cleanup)
    fs = Snapfs(workdir, cleanup)
    fs.cache_dir = small / "cache"
    fs.init()
    fs.mount(extra=("--cache-size", "40M"))
    fs.cli("volume", "create", "v", "--size", "32M")
    rng = random.Random(7)
    first, second = rng.randbytes(MiB), rng.randbytes(4 * MiB)
    fd = os.open(fs.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, first, 0)
        os.fsync(fd)
        filler = small / "filler"
        fill(filler)
        with pytest.raises(OSError) as info:
            os.pwrite(fd, second, 8 * MiB)  # new blocks: the cache file must grow
            os.fsync(fd)
        assert info.value.errno in (errno.ENOSPC, errno.EIO), info.value
        # The daemon is alive and serves: status, reads, the ctl file.
        status = fs.cli_json("status")
        assert status["pid"] == fs.pid
        assert os.pread(fd, MiB, 0) == first
        fs.cli("volume", "list")
        log = (fs.cache_dir / "daemon.log").read_text()
        assert "write failed, answered ENOSPC" in log and "Traceback" in log, log[-3000:]

        filler.unlink()  # room again: writes and sync work
        assert os.pwrite(fd, second, 8 * MiB) == len(second)
        os.fsync(fd)
    finally:
        os.close(fd)
    fs.cli("sync")
    with open(fs.vol("v"), "rb") as f:
        assert f.read(MiB) == first
        f.seek(8 * MiB)
        assert f.read(len(second)) == second
    assert fs.cli_json("fsck")["clean"]
    assert fs.cli_json("status")["pid"] == fs.pid
