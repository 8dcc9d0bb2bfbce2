"""The CLI surface through a real mount: finding the daemon, show, resize, clone, rollback,
delete rules."""

import os

import pytest

from tests.conftest import SNAPFS, Snapfs, run

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_the_daemon_is_found_from_the_current_directory(snapfs: Snapfs, workdir):
    res = run([*SNAPFS, "volume", "create", "here", "--size", "4M"], cwd=snapfs.mnt / "volumes")
    assert "here" in res.stdout
    # Outside any mount, with exactly one snapfs mount on the machine, that one is used; with
    # several (another test run, a benchmark), the CLI names them all and asks for --mount.
    res = run([*SNAPFS, "volume", "list"], cwd=workdir, check=False)
    if _snapfs_mounts() == 1:
        assert res.returncode == 0 and "here" in res.stdout
    else:
        assert res.returncode == 1 and str(snapfs.mnt) in res.stderr
        assert "--mount" in res.stderr and len(res.stderr.splitlines()) == 1


def _snapfs_mounts() -> int:
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[2] == "fuse.snapfs")


def test_show_resize_clone_rollback_delete(snapfs: Snapfs):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "8M", "--block-size", "64K")
    with open(fs.vol("db"), "r+b") as f:
        f.write(b"v1" * 1000)
    fs.cli("snapshot", "create", "db@one")
    shown = fs.cli_json("snapshot", "show", "db@one")
    assert (shown["volume"], shown["name"], shown["size"]) == ("db", "one", 8 * MiB)
    assert "SNAPSHOT" in fs.cli("snapshot", "list").stdout

    fs.cli("volume", "resize", "db", "--size", "16M")
    assert os.stat(fs.vol("db")).st_size == 16 * MiB
    res = fs.cli("volume", "resize", "db", "--size", "4M", check=False)
    assert res.returncode == 1 and "shrinking" in res.stderr

    fs.cli("volume", "create", "copy", "--from", "db@one", "--size", "32M")
    assert os.stat(fs.vol("copy")).st_size == 32 * MiB
    with open(fs.vol("copy"), "rb") as f:
        assert f.read(2000) == b"v1" * 1000
    assert fs.cli_json("volume", "show", "copy")["parent"] == "db@one"

    with open(fs.vol("db"), "r+b") as f:
        f.write(b"v2" * 1000)
        f.flush()
        res = fs.cli("snapshot", "rollback", "db@one", check=False)
        assert res.returncode == 1 and "open" in res.stderr  # refused while in use
    fs.cli("snapshot", "rollback", "db@one")
    with open(fs.vol("db"), "rb") as f:
        assert f.read(2000) == b"v1" * 1000
    assert os.stat(fs.vol("db")).st_size == 8 * MiB

    res = fs.cli("volume", "delete", "db", check=False)
    assert res.returncode == 1 and "--recursive" in res.stderr
    fs.cli("snapshot", "delete", "db@one")  # the clone keeps its data: no pending-delete
    with open(fs.vol("copy"), "rb") as f:
        assert f.read(2000) == b"v1" * 1000
    fs.cli("snapshot", "create", "db@two")
    fs.cli("volume", "delete", "db", "--recursive")
    assert not fs.vol("db").exists()
    assert fs.cli_json("fsck")["clean"]
