"""One writer per store: the lease, read-only mounts beside a writer, takeover."""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from snapfs import codec
from tests.conftest import SNAPFS, Snapfs, run

pytestmark = pytest.mark.fuse


def store_files(fs: Snapfs) -> dict[str, int]:
    root = fs.root / "store"
    files = {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    files.pop("lease", None)  # the writer renews it
    return files


def latest_catalog(fs: Snapfs) -> dict:
    keys = sorted((fs.root / "store" / "catalog").iterdir())
    return codec.unpack(keys[-1].read_bytes())


@pytest.fixture
def writer(workdir: Path, cleanup) -> Snapfs:
    fs = Snapfs(workdir, cleanup, env={"SNAPFS_LEASE_SECONDS": "3"})
    fs.init()
    fs.mount()
    fs.cli("volume", "create", "v", "--size", "16M")
    with open(fs.vol("v"), "r+b") as f:
        f.write(b"one" * 1000)
    fs.cli("snapshot", "create", "v@one")
    fs.cli("sync")
    return fs


def test_second_writer_is_refused_and_store_untouched(writer: Snapfs, workdir: Path):
    other = workdir / "mnt2"
    other.mkdir()
    before = store_files(writer)
    res = run(
        [*SNAPFS, "mount", writer.store_url, str(other), "--cache-dir", str(workdir / "cache2")],
        check=False,
        env=writer.env,
    )
    assert res.returncode != 0
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"pid {writer.pid}" in line and socket.gethostname() in line
    assert "expires" in line and "--takeover" in line
    assert store_files(writer) == before
    assert not os.path.ismount(other)


def test_read_only_mount_beside_the_writer(writer: Snapfs, workdir: Path):
    ro = workdir / "ro"
    ro.mkdir()
    writer.mount(cache_dir=workdir / "ro-cache", extra=("--read-only", "--refresh", "1"), mnt=ro)
    assert os.listdir(ro / "volumes") == []
    with open(ro / "snapshots" / "v" / "one", "rb") as f:
        assert f.read(3000) == b"one" * 1000
    # The writer goes on; the reader follows it within its refresh interval.
    writer.cli("snapshot", "create", "v@two")
    writer.cli("sync")
    deadline = time.monotonic() + 10
    while sorted(os.listdir(ro / "snapshots" / "v")) != ["one", "two"]:
        assert time.monotonic() < deadline, os.listdir(ro / "snapshots" / "v")
        time.sleep(0.2)
    res = run([*SNAPFS, "--mount", str(ro), "snapshot", "create", "v@x"], check=False)
    assert res.returncode != 0 and "read-only" in res.stderr


def test_kill_9_then_same_host_takes_over_at_once(writer: Snapfs):
    with open(writer.vol("v"), "r+b") as f:
        f.write(b"two" * 1000)
        f.flush()
        os.fsync(f.fileno())
    os.kill(writer.pid, signal.SIGKILL)
    time.sleep(0.3)
    subprocess.run(["fusermount3", "-uz", str(writer.mnt)], capture_output=True)
    writer.mount()  # the lease names a dead pid on this host: no waiting
    with open(writer.vol("v"), "rb") as f:
        assert f.read(3000) == b"two" * 1000
    writer.cli("sync")
    assert writer.cli_json("fsck")["clean"]


def test_expired_lease_of_another_host_is_taken(writer: Snapfs, workdir: Path):
    writer.umount()
    lease = {
        "token": "x",
        "host": "elsewhere",
        "pid": 1,
        "mounted": time.time() - 100,
        "expires": time.time() + 3600,
        "cache_dir": "/c",
    }
    (writer.root / "store" / "lease").write_bytes(codec.pack(lease))
    res = run(
        [*SNAPFS, "mount", writer.store_url, str(writer.mnt), "--cache-dir", str(writer.cache_dir)],
        check=False,
    )
    assert res.returncode != 0 and "elsewhere" in res.stderr
    lease["expires"] = time.time() - 1
    (writer.root / "store" / "lease").write_bytes(codec.pack(lease))
    writer.mount()
    assert writer.cli_json("status")["pid"] == writer.pid


def test_forced_takeover_the_old_writer_never_overwrites(writer: Snapfs, workdir: Path):
    second = Snapfs(workdir / "second", writer.cleanup, store_url=writer.store_url, env=writer.env)
    second.mount(extra=("--takeover",))
    with open(second.vol("v"), "r+b") as f:
        f.write(b"new" * 1000)
    second.cli("snapshot", "create", "v@from-second")
    second.cli("sync")
    published = latest_catalog(writer)
    assert {s["name"] for s in published["snapshots"]} == {"one", "from-second"}

    # The old writer publishes nothing any more; once it knows (its lease renewal or its
    # next publish tells it), writes fail with EROFS.
    with contextlib.suppress(OSError), open(writer.vol("v"), "r+b") as f:
        f.write(b"old" * 1000)
    writer.cli("sync", check=False)
    wait_lease_lost(writer)
    with pytest.raises(OSError) as err, open(writer.vol("v"), "r+b") as f:
        f.write(b"old" * 1000)
    assert err.value.errno == errno.EROFS
    res = writer.cli("snapshot", "create", "v@old-writer", check=False)
    assert res.returncode != 0 and "lost" in res.stderr
    assert latest_catalog(writer)["seq"] == published["seq"]
    assert {s["name"] for s in latest_catalog(writer)["snapshots"]} == {"one", "from-second"}
    with open(writer.vol("v"), "rb") as f:  # its local cache is kept, readable
        assert f.read(3000) in (b"old" * 1000, b"one" * 1000)
    with open(second.snap("v", "from-second"), "rb") as f:
        assert f.read(3000) == b"new" * 1000
    assert json.loads(second.cli("--json", "fsck").stdout)["clean"]


def wait_lease_lost(fs: Snapfs, timeout: float = 30.0) -> None:
    """The old writer notices the takeover at its next publish or lease renewal."""
    deadline = time.monotonic() + timeout
    while not fs.stats()["lease_lost"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert fs.stats()["lease_lost"]
