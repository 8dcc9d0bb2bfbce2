"""The whole path through the kernel: FUSE mount, loop devices, ext4, snapshots, restore."""

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyfuse3
import pytest

from tests.conftest import Snapfs, run, sha256, write_random
from tests.fuse.test_discard import fallocate

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def snapshot_ext4_checks(fs: Snapfs, vol: str, snap: str, expected: dict[str, str], where):
    """Attach a snapshot file read-only, e2fsck it, mount it, compare every file's hash."""
    dev = fs.losetup(fs.snap(vol, snap), read_only=True)
    fsck = run(["e2fsck", "-fn", dev], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mnt = fs.mount_fs(dev, where, read_only=True)
    found = {name: sha256(mnt / name) for name in os.listdir(mnt) if name != "lost+found"}
    assert found == expected
    run(["umount", str(mnt)])
    run(["losetup", "-d", dev])


def test_ext4_snapshots_and_store_only_restore(snapfs: Snapfs, workdir):
    ext4_snapshots_and_store_only_restore(snapfs, workdir)


def ext4_snapshots_and_store_only_restore(
    fs: Snapfs, workdir: Path, second_by: str = "ctl"
) -> None:
    """ext4 on a loop device on a volume, snapshots by xattr and by the ctl file (or, with
    second_by="cli", by `snapfs snapshot create`), each snapshot checked read-only (e2fsck,
    hashes), then a store-only restore: unmount, mount the same store with an empty cache
    dir, every snapshot and the head read back exact. Shared with the Swift tests
    (tests/fuse/test_swift.py), which pass a Snapfs on a Swift store."""
    fs.cli("volume", "create", "db", "--size", "1G")
    dev = fs.losetup(fs.vol("db"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    ext = fs.mount_fs(dev, workdir / "ext4")

    hashes: dict[str, dict[str, str]] = {}
    for i in range(3):
        write_random(ext / f"file{i}", (5 + 7 * i) * MiB, seed=i)
    run(["sync"])
    hashes["first"] = {f"file{i}": sha256(ext / f"file{i}") for i in range(3)}
    # Snapshot through the xattr.
    os.setxattr(fs.vol("db"), "user.snapfs.snapshot", b"first")

    write_random(ext / "file0", 9 * MiB, seed=100)  # change
    os.unlink(ext / "file1")  # delete
    write_random(ext / "file3", 3 * MiB, seed=3)  # add
    run(["sync"])
    hashes["second"] = {n: sha256(ext / n) for n in ("file0", "file2", "file3")}
    if second_by == "cli":
        assert fs.cli_json("snapshot", "create", "db@second")["name"] == "second"
    else:
        # Snapshot through the ctl file.
        fd = os.open(fs.mnt / ".snapfs" / "ctl", os.O_RDWR)
        try:
            os.write(fd, b"snapshot create db@second\n")
            reply = json.loads(os.pread(fd, 65536, 0))
        finally:
            os.close(fd)
        assert reply["ok"] and reply["result"]["name"] == "second"

    write_random(ext / "file2", 4 * MiB, seed=200)  # change again
    os.unlink(ext / "file3")
    run(["sync"])
    head = {n: sha256(ext / n) for n in ("file0", "file2")}
    names = os.getxattr(fs.vol("db"), "user.snapfs.snapshots").decode().split("\n")
    assert names == ["first", "second"]
    info = json.loads(os.getxattr(fs.vol("db"), "user.snapfs.info"))
    assert info["size"] == 1 << 30 and info["block_size"] == 128 << 10

    fs.cli("sync")
    listing = fs.cli_json("snapshot", "list", "db")
    assert [(s["name"], s["state"]) for s in listing] == [
        ("first", "available"),
        ("second", "available"),
    ]
    for snap in ("first", "second"):
        snapshot_ext4_checks(fs, "db", snap, hashes[snap], workdir / f"ro-{snap}")

    # Store-only restore: unmount, then mount the store with a new, empty cache dir.
    run(["umount", str(ext)])
    run(["losetup", "-d", dev])
    fs.umount()
    fs.mount(cache_dir=workdir / "fresh-cache")
    for snap in ("first", "second"):
        snapshot_ext4_checks(fs, "db", snap, hashes[snap], workdir / f"restored-{snap}")
    dev = fs.losetup(fs.vol("db"))
    assert run(["e2fsck", "-fn", dev], check=False).returncode == 0
    ext = fs.mount_fs(dev, workdir / "ext4-restored")
    assert {n: sha256(ext / n) for n in ("file0", "file2")} == head
    assert sorted(os.listdir(ext)) == ["file0", "file2", "lost+found"]
    report = fs.cli_json("fsck")
    assert report["clean"], report


def test_crash_after_fsync_loses_nothing(snapfs: Snapfs, workdir):
    fs = snapfs
    fs.cli("volume", "create", "v", "--size", "256M", "--block-size", "64K")
    data = os.urandom(24 * MiB)
    fd = os.open(fs.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB + 123)
        os.fsync(fd)
        fs.cli("snapshot", "create", "v@before-crash")
        os.pwrite(fd, b"after" * 1000, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    # The snapshot kicked the flusher: kill the daemon while it uploads.
    time.sleep(0.05)
    os.kill(fs.pid, signal.SIGKILL)
    time.sleep(0.2)
    subprocess.run(["fusermount3", "-uz", str(fs.mnt)], capture_output=True)
    assert fs.cli("status", check=False).returncode != 0

    fs.mount()  # same cache dir: recovery
    with open(fs.vol("v"), "rb") as f:
        assert f.read(5000) == b"after" * 1000
        f.seek(3 * MiB + 123)
        assert f.read(len(data)) == data
    fs.cli("sync")
    snaps = fs.cli_json("snapshot", "list", "v")
    assert [(s["name"], s["state"]) for s in snaps] == [("before-crash", "available")]
    with open(fs.snap("v", "before-crash"), "rb") as f:
        assert f.read(5000) == bytes(5000)
        f.seek(3 * MiB + 123)
        assert f.read(len(data)) == data
    assert fs.cli_json("fsck")["clean"]


def test_delete_middle_snapshot_frees_exactly_its_data(snapfs: Snapfs):
    fs = snapfs
    bs = 64 << 10
    fs.cli("volume", "create", "v", "--size", "64M", "--block-size", "64K")
    region = 4 * MiB  # 64 blocks
    contents = {}
    with open(fs.vol("v"), "r+b") as f:
        f.seek(8 * MiB)
        f.write(os.urandom(2 * MiB))  # shared by every snapshot
        for name in ("a", "b", "c"):
            contents[name] = os.urandom(region)
            f.seek(16 * MiB)
            f.write(contents[name])
            f.flush()
            os.fsync(f.fileno())
            fs.cli("snapshot", "create", f"v@{name}")
        f.seek(16 * MiB)
        f.write(os.urandom(region))  # the head has its own data too
    fs.cli("sync")
    before = fs.stats()
    fs.cli("snapshot", "delete", "v@b")
    after = fs.stats()
    unique = region // bs
    assert before["stored_data_bytes"] - after["stored_data_bytes"] == unique * (bs + 1)
    # Its blocks are dead in their packs at once; gc gives the space back.
    assert before["live_bytes"] - after["live_bytes"] >= unique * (bs + 1)
    result = fs.cli_json("gc", "--threshold", "0.8")
    assert result["store_bytes_after"] <= result["live_bytes"] / 0.8 + result["packs"] * 4096
    assert before["pack_bytes"] - result["store_bytes_after"] >= unique * bs
    for name in ("a", "c"):
        with open(fs.snap("v", name), "rb") as f:
            f.seek(16 * MiB)
            assert f.read(region) == contents[name]
    assert not fs.snap("v", "b").exists()
    assert fs.cli_json("fsck")["clean"]


def test_two_volumes_with_the_same_data_store_it_once(snapfs: Snapfs):
    fs = snapfs
    data = os.urandom(8 * MiB)
    for name in ("one", "two"):
        fs.cli("volume", "create", name, "--size", "32M")
    with open(fs.vol("one"), "r+b") as f:
        f.write(data)
    fs.cli("sync")
    stored = fs.stats()["stored_data_bytes"]
    with open(fs.vol("two"), "r+b") as f:
        f.seek(1 * MiB)  # block-aligned (128K), so the blocks are identical
        f.write(data)
    fs.cli("sync")
    stats = fs.stats()
    assert stats["stored_data_bytes"] == stored
    assert stats["deduplicated_blocks"] >= len(data) // (128 << 10)
    with open(fs.vol("two"), "rb") as f:
        f.seek(1 * MiB)
        assert f.read(len(data)) == data


def test_holes_and_zero_blocks(snapfs: Snapfs):
    fs = snapfs
    fs.cli("volume", "create", "z", "--size", "1G")
    assert os.stat(fs.vol("z")).st_blocks == 0
    with open(fs.vol("z"), "r+b") as f:
        f.seek(100 * MiB)
        f.write(os.urandom(4 * MiB))
    fs.cli("sync")
    assert os.stat(fs.vol("z")).st_blocks * 512 == 4 * MiB
    with open(fs.vol("z"), "r+b") as f:
        f.seek(100 * MiB)
        f.write(bytes(2 * MiB))  # all-zero blocks become holes again
        f.seek(0)
        assert f.read(MiB) == bytes(MiB)
    fs.cli("sync")
    assert os.stat(fs.vol("z")).st_blocks * 512 == 2 * MiB
    shown = fs.cli_json("volume", "show", "z")
    assert (shown["size"], shown["allocated"]) == (1 << 30, 2 * MiB)
    assert "ALLOCATED" in fs.cli("volume", "list").stdout


def test_volumes_are_direct_io_files(snapfs: Snapfs):
    """Volumes are opened with FOPEN_DIRECT_IO: every read and write reaches the daemon (no
    stale page cache between file descriptors, unaligned O_DIRECT is fine), private mmap
    reads the data, and shared mmap is refused with ENODEV (FUSE cannot keep it coherent)."""
    fs = snapfs
    fs.cli("volume", "create", "d", "--size", "16M")
    data = os.urandom(3 * MiB + 123)
    reader = os.open(fs.vol("d"), os.O_RDONLY)
    writer = os.open(fs.vol("d"), os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pread(reader, 4096, 0) == bytes(4096)  # read once, before the write
        assert os.pwrite(writer, data, 5) == len(data)  # unaligned, through O_DIRECT
        assert os.pread(reader, len(data), 5) == data
        with mmap.mmap(reader, 4 * MiB, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            assert m[5 : 5 + len(data)] == data
        with pytest.raises(OSError) as exc:
            mmap.mmap(writer, 4 * MiB, mmap.MAP_SHARED)
        assert exc.value.errno == errno.ENODEV
    finally:
        os.close(reader)
        os.close(writer)
    fs.cli("sync")
    assert fs.cli_json("volume", "show", "d")["allocated"] >= 3 * MiB


def test_spliced_reads_match_a_model_under_mixed_io(snapfs: Snapfs):
    """Reads of cached blocks are spliced from the cache file (the patched pyfuse3 that
    scripts/setup builds); random unaligned writes, discards and reads, through the kernel,
    against an in-memory model of the volume."""
    assert getattr(pyfuse3, "SNAPFS_SPLICE", False), "run scripts/pyfuse3-patch.py"
    fs = snapfs
    size = 8 * MiB
    fs.cli("volume", "create", "m", "--size", "8M", "--block-size", "64K")
    model = bytearray(size)
    rng = random.Random(7)
    fd = os.open(fs.vol("m"), os.O_RDWR)
    try:
        for step in range(300):
            off = rng.randrange(size)
            n = min(rng.choice([1, 100, 4096, 65536, 300_000, MiB]), size - off)
            kind = rng.random()
            if kind < 0.45:
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off : off + n] = data
            elif kind < 0.5:
                assert fallocate(fd, 0x02 | 0x01, off, n) == 0  # PUNCH_HOLE | KEEP_SIZE
                model[off : off + n] = bytes(n)
            else:
                assert os.pread(fd, n, off) == model[off : off + n], f"step {step}"
            if step % 100 == 99:
                fs.cli("sync")
        assert os.pread(fd, size, 0) == model
    finally:
        os.close(fd)


def test_snapshot_files_are_read_ahead_by_the_kernel(snapfs: Snapfs):
    """Snapshot files keep the page cache, and the daemon raises the kernel's read-ahead
    for its mount from FUSE's 128 KiB to 4 MiB (several requests in flight for cp or dd)."""
    fs = snapfs
    dev = os.stat(fs.mnt).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    deadline = time.monotonic() + 10
    while knob.read_text().strip() != "4096" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert knob.read_text().strip() == "4096"
    fs.cli("volume", "create", "r", "--size", "32M")
    data = os.urandom(20 * MiB)
    with open(fs.vol("r"), "r+b") as f:
        f.write(data)
    fs.cli("snapshot", "create", "r@s")
    with open(fs.snap("r", "s"), "rb") as f:
        assert f.read(len(data)) == data
        assert f.read() == bytes(12 * MiB)
