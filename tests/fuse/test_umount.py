"""Unmounting always works: a writer that lost the store, a store that fails or does not
answer, a daemon that was killed. `snapfs umount` then unmounts, keeps the cache dir, exits
3 and says in one line what stayed behind; the next mount of that cache dir uploads it."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SNAPFS, Snapfs, is_mounted, run
from tests.fuse.test_lease import wait_lease_lost

pytestmark = pytest.mark.fuse

MiB = 1 << 20
EXIT_NOT_UPLOADED = 3
KEEP_DIRTY = ("--flush-delay", "3600", "--flush-max-age", "3600")  # only sync uploads


def umount(fs: Snapfs, *extra: str) -> subprocess.CompletedProcess:
    return run([*SNAPFS, "umount", str(fs.mnt), *extra], check=False, env=fs.env, timeout=300)


def not_uploaded_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == EXIT_NOT_UPLOADED, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("snapfs: unmounted ")
    return lines[0]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def write_fsync(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_lost_writer_umount_unmounts_and_keeps_its_cache(workdir: Path, cleanup):
    writer = Snapfs(workdir, cleanup, env={"SNAPFS_LEASE_SECONDS": "3"})
    writer.init()
    writer.mount(extra=KEEP_DIRTY)
    writer.cli("volume", "create", "v", "--size", "16M")
    writer.cli("sync")
    old = random.Random(3).randbytes(2 * MiB)
    write_fsync(writer.vol("v"), 0, old)  # fsynced, never uploaded

    second = Snapfs(workdir / "second", cleanup, store_url=writer.store_url, env=writer.env)
    second.mount(extra=("--takeover",))
    writer.cli("sync", check=False)  # the writer notices at its publish
    wait_lease_lost(writer)
    pid = writer.pid
    assert pid is not None

    line = not_uploaded_line(umount(writer))
    assert "lost the store" in line and str(writer.cache_dir) in line, line
    assert "2M" in line and "still in the cache dir" in line, line
    assert not is_mounted(str(writer.mnt))
    assert gone(pid)
    # The cache dir is kept, with what was fsynced and never uploaded.
    cached = list(writer.cache_dir.glob("vol-*.cache"))
    assert len(cached) == 1
    assert read_at(cached[0], 0, len(old)) == old
    assert (writer.cache_dir / "catalog.sqlite3").exists()
    # The store is the second writer's, untouched by the lost one.
    assert read_at(second.vol("v"), 0, len(old)) == bytes(len(old))
    assert second.cli_json("fsck")["clean"]


def test_umount_with_a_failing_store_keeps_the_cache_and_the_next_mount_uploads(
    workdir: Path, cleanup
):
    fs = Snapfs(workdir, cleanup)
    fs.init()
    fs.mount(extra=KEEP_DIRTY)
    fs.cli("volume", "create", "v", "--size", "16M")
    data = random.Random(4).randbytes(4 * MiB)
    write_fsync(fs.vol("v"), MiB, data)
    store = workdir / "store"
    # The store turns read-only under the daemon (a read-only bind mount over it).
    run(["mount", "--bind", str(store), str(store)])
    cleanup.push("ro bind", lambda: subprocess.run(["umount", str(store)], capture_output=True))
    run(["mount", "-o", "remount,bind,ro", str(store)])
    pid = fs.pid
    assert pid is not None

    line = not_uploaded_line(umount(fs, "--timeout", "20"))
    assert "without uploading" in line and "Read-only file system" in line, line
    assert str(fs.cache_dir) in line and "goes up at the next mount" in line, line
    assert "4M" in line, line
    assert not is_mounted(str(fs.mnt))
    assert gone(pid)
    log = (fs.cache_dir / "daemon.log").read_text()
    assert "keeping the cache" in log and "clean shutdown" in log, log[-2000:]

    run(["umount", str(store)])  # the store is back: the next mount uploads the rest
    fs.mount()
    assert read_at(fs.vol("v"), MiB, len(data)) == data
    fs.cli("sync")
    assert fs.stats()["dirty_bytes"] == 0
    fs.umount()
    fs.mount(cache_dir=workdir / "fresh-cache")  # store-only restore
    assert read_at(fs.vol("v"), MiB, len(data)) == data
    assert fs.cli_json("fsck")["clean"]


def test_umount_after_the_daemon_was_killed(workdir: Path, cleanup):
    fs = Snapfs(workdir, cleanup)
    fs.init()
    fs.mount(extra=KEEP_DIRTY)
    fs.cli("volume", "create", "v", "--size", "16M")
    data = random.Random(5).randbytes(MiB)
    write_fsync(fs.vol("v"), 0, data)
    assert fs.pid is not None
    os.kill(fs.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not gone(fs.pid) and time.monotonic() < deadline:
        time.sleep(0.1)

    line = not_uploaded_line(umount(fs))
    assert "daemon was not running" in line and "--cache-dir" in line, line
    assert not is_mounted(str(fs.mnt))
    fs.mount()
    assert read_at(fs.vol("v"), 0, len(data)) == data
    fs.cli("sync")
    res = umount(fs)
    assert res.returncode == 0 and res.stdout.strip() == f"unmounted {fs.mnt}", res


@pytest.mark.swift
def test_umount_with_a_frozen_swift_is_bounded(swift_env, workdir: Path, cleanup):
    from tests.fuse.test_swift import SwiftProxy

    env = {"SNAPFS_LEASE_SECONDS": "600"}  # the lease outlives the outage: not lost
    fs = Snapfs(workdir, cleanup, store_url=swift_env["new_container_url"](), env=env)
    fs.init()
    fs.mount(extra=KEEP_DIRTY)
    fs.cli("volume", "create", "v", "--size", "16M")
    fs.cli("sync")
    data = random.Random(6).randbytes(2 * MiB)
    pid = fs.pid
    assert pid is not None
    proxy = SwiftProxy(swift_env["dir"])
    try:
        proxy.freeze()  # connections are accepted, requests never answered
        write_fsync(fs.vol("v"), 0, data)
        started = time.monotonic()
        res = umount(fs, "--timeout", "3")
        elapsed = time.monotonic() - started
    finally:
        proxy.restore()
    line = not_uploaded_line(res)
    # The timeout cancels the sync; a PUT already in flight ends first (its socket times out).
    assert "did not answer within 3s" in line or "timed out" in line, line
    assert "goes up at the next mount" in line and "2M" in line, line
    assert not is_mounted(str(fs.mnt))
    assert gone(pid)
    # --timeout, plus at most the store's socket timeout for calls already in flight.
    assert elapsed < 90, elapsed

    fs.mount()
    assert read_at(fs.vol("v"), 0, len(data)) == data
    fs.cli("sync")
    fs.umount()
    fs.mount(cache_dir=workdir / "fresh-cache")
    assert read_at(fs.vol("v"), 0, len(data)) == data
