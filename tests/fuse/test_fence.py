"""Fencing through the kernel: a read-only mount beside a writer that deletes and collects,
a read-only cache dir reused, and a writer stopped mid-sync while another takes over."""

import errno
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SNAPFS, Snapfs, sha256
from tests.fuse.test_lease import wait_lease_lost

pytestmark = pytest.mark.fuse

MiB = 1 << 20
ENV = {"SNAPFS_LEASE_SECONDS": "3"}


def sha256_cold(path: Path) -> str:
    """sha256 of a file read from the daemon, not from the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return sha256(path)


def fill(path: Path, size: int, seed: int) -> str:
    """Overwrite the start of a volume file with pseudo-random bytes; their sha256."""
    import random

    data = random.Random(seed).randbytes(size)
    with open(path, "r+b") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def packs(fs: Snapfs) -> set[str]:
    return {p.name for p in (fs.root / "store" / "p").rglob("*") if p.is_file()}


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def writer(workdir: Path, cleanup) -> Snapfs:
    fs = Snapfs(workdir, cleanup, env=ENV)
    fs.init()
    fs.mount(extra=("--grace", "2"))
    fs.cli("volume", "create", "v", "--size", "32M", "--block-size", "64K")
    return fs


def test_a_read_only_mount_reads_on_while_the_writer_deletes_and_collects(
    writer: Snapfs, workdir: Path
):
    fill(writer.vol("v"), 32 * MiB, seed=1)
    writer.cli("snapshot", "create", "v@a")
    writer.cli("sync")
    with open(writer.vol("v"), "r+b") as f:  # every other block: each pack of a is half b's
        for blk in range(0, 512, 2):
            f.seek(blk * 64 * 1024)
            f.write(os.urandom(64 * 1024))
    writer.cli("snapshot", "create", "v@b")
    writer.cli("sync")
    b = sha256(writer.snap("v", "b"))

    ro = workdir / "ro"
    ro.mkdir()
    writer.mount(cache_dir=workdir / "ro-cache", extra=("--read-only", "--refresh", "1"), mnt=ro)
    assert sha256_cold(ro / "snapshots" / "v" / "b") == b

    before = packs(writer)
    writer.cli("snapshot", "delete", "v@a")
    result = writer.cli_json("gc", "--threshold", "0.99")  # b's blobs move to new packs
    assert result["rewritten_packs"] > 0, result
    assert sha256_cold(ro / "snapshots" / "v" / "b") == b  # within the grace period
    time.sleep(2.5)
    writer.cli("sync")  # the grace period is over: the old packs go
    assert before - packs(writer), "gc deleted no pack"
    assert sha256_cold(ro / "snapshots" / "v" / "b") == b

    with open(writer.vol("v"), "r+b") as f:
        f.write(b"c" * MiB)
    writer.cli("snapshot", "create", "v@c")
    writer.cli("sync")
    wait_for(lambda: sorted(os.listdir(ro / "snapshots" / "v")) == ["b", "c"], 10)
    assert sha256_cold(ro / "snapshots" / "v" / "c") == sha256(writer.snap("v", "c"))
    assert sha256_cold(ro / "snapshots" / "v" / "b") == b
    assert writer.cli_json("fsck")["clean"]


def test_a_read_only_remount_of_its_cache_dir_shows_what_was_published_since(
    writer: Snapfs, workdir: Path
):
    with open(writer.vol("v"), "r+b") as f:
        f.write(b"one" * 1000)
    writer.cli("snapshot", "create", "v@one")
    writer.cli("sync")
    ro = workdir / "ro"
    ro.mkdir()
    ro_cache = workdir / "ro-cache"
    extra = ("--read-only", "--refresh", "3600")  # only the open may catch up
    writer.mount(cache_dir=ro_cache, extra=extra, mnt=ro)
    assert os.listdir(ro / "snapshots" / "v") == ["one"]
    subprocess.run([*SNAPFS, "umount", str(ro)], check=True, capture_output=True)
    with open(writer.vol("v"), "r+b") as f:
        f.write(b"two" * 1000)
    writer.cli("snapshot", "create", "v@two")
    writer.cli("snapshot", "delete", "v@one")
    writer.cli("sync")
    writer.mount(cache_dir=ro_cache, extra=extra, mnt=ro)
    assert os.listdir(ro / "snapshots" / "v") == ["two"]
    with open(ro / "snapshots" / "v" / "two", "rb") as f:
        assert f.read(3000) == b"two" * 1000


def test_a_writer_stopped_mid_sync_and_taken_over_never_publishes_again(workdir: Path, cleanup):
    # A long lease: the stopped writer resumes and publishes before a renewal could tell
    # it that it was taken over; only the fence stops it.
    env = {"SNAPFS_LEASE_SECONDS": "60"}
    first = Snapfs(workdir, cleanup, env=env)
    first.init()
    first.mount()
    first.cli("volume", "create", "v", "--size", "32M", "--block-size", "64K")
    fill(first.vol("v"), 32 * MiB, seed=2)
    first.cli("snapshot", "create", "v@base")
    first.cli("sync")
    base = sha256(first.snap("v", "base"))
    pid = first.pid
    cleanup.push("SIGCONT", lambda: os.kill(pid, signal.SIGCONT))
    for seed in range(3, 10):  # stop the daemon while `snapfs sync` runs on it
        fill(first.vol("v"), 32 * MiB, seed=seed)
        sync = subprocess.Popen(
            [*SNAPFS, "--mount", str(first.mnt), "sync"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=first.env,
        )
        time.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)
        if sync.poll() is None:
            break
        os.kill(pid, signal.SIGCONT)
    else:
        pytest.fail("snapfs sync always finished within 0.2 s")

    # The second writer takes over and collects: the first one's uploads are garbage to
    # it. Nothing is deleted before its fence catalog is out, and only after its grace.
    second = Snapfs(workdir / "second", cleanup, store_url=first.store_url, env=env)
    second.mount(extra=("--takeover", "--grace", "1"))
    assert sha256(second.snap("v", "base")) == base
    time.sleep(1.5)
    second.cli("gc", "--threshold", "0.99")
    os.kill(pid, signal.SIGCONT)
    try:
        sync.wait(timeout=120)
    finally:
        sync.kill()

    # A fresh cache dir restores the store exactly.
    fresh = workdir / "fresh"
    fresh.mkdir()
    second.mount(cache_dir=workdir / "fresh-cache", extra=("--read-only",), mnt=fresh)
    assert os.listdir(fresh / "snapshots" / "v") == ["base"]
    assert sha256_cold(fresh / "snapshots" / "v" / "base") == base
    subprocess.run([*SNAPFS, "umount", str(fresh)], check=True, capture_output=True)

    # The first writer publishes nothing any more, and says it lost the store.
    assert sync.returncode != 0, sync.stdout
    assert first.cli("sync", check=False).returncode != 0
    wait_lease_lost(first)
    with pytest.raises(OSError) as err, open(first.vol("v"), "r+b") as f:
        f.write(b"late" * 1000)
    assert err.value.errno == errno.EROFS
    res = first.cli("snapshot", "create", "v@late", check=False)
    assert res.returncode != 0 and "lost" in res.stderr

    # The second goes on; fsck is clean, and a fresh cache dir sees what it published.
    second_head = fill(second.vol("v"), 8 * MiB, seed=20)
    second.cli("snapshot", "create", "v@from-second")
    second.cli("sync")
    assert second.cli_json("fsck")["clean"]
    second.mount(cache_dir=workdir / "fresh-cache-2", extra=("--read-only",), mnt=fresh)
    assert sorted(os.listdir(fresh / "snapshots" / "v")) == ["base", "from-second"]
    with open(fresh / "snapshots" / "v" / "from-second", "rb") as f:
        assert hashlib.sha256(f.read(8 * MiB)).hexdigest() == second_head
