"""The CLI surface through a real mount: finding the daemon, show, resize, clone, rollback,
delete rules."""

import os
import sqlite3
from pathlib import Path

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


def test_fsck_prints_each_finding_and_exits_nonzero(snapfs: Snapfs):
    """fsck said `clean False` and exited 0: a script could not tell. Now each finding is
    a line naming the object and the root that needs it, and the exit status is 1 while
    something is wrong; the same online (the mount) and offline (`snapfs fsck STORE_URL`,
    no mount); --verify-data reads every object and names the one whose bytes changed."""
    fs = snapfs
    fs.cli("volume", "create", "v", "--size", "4M", "--block-size", "64K")
    for offset in (0, 2 * MiB):  # two syncs: two packs
        with open(fs.vol("v"), "r+b") as f:
            f.seek(offset)
            f.write(os.urandom(1 * MiB))
            f.flush()
            os.fsync(f.fileno())
        fs.cli("sync")
    for where in ((), (fs.store_url, "--verify-data")):
        ok = fs.cli("fsck", *where, mount=not where)
        assert ok.returncode == 0 and "clean" in ok.stdout and "NOT" not in ok.stdout, ok
    store = Path(fs.store_url.removeprefix("file://"))
    packs = sorted(store.glob("p/*/*"), key=lambda p: p.stat().st_size)
    assert len(packs) >= 2
    with open(packs[-1], "r+b") as f:  # one flipped byte in the first blob of a pack
        f.seek(1)
        byte = f.read(1)
        f.seek(1)
        f.write(bytes([byte[0] ^ 0xFF]))
    plain = fs.cli("fsck", fs.store_url, check=False, mount=False)
    assert plain.returncode == 0, plain  # without --verify-data the bytes are not read
    for where in (("--verify-data",), (fs.store_url, "--verify-data")):
        verified = fs.cli("fsck", *where, check=False, mount=len(where) == 1)
        assert verified.returncode == 1, verified
        corrupt = [line for line in verified.stdout.splitlines() if line.startswith("corrupt: ")]
        assert len(corrupt) == 1 and corrupt[0].startswith("corrupt: c/"), verified.stdout
        assert packs[-1].name in corrupt[0] and "digest" in corrupt[0], corrupt
        assert corrupt[0].endswith(", needed by volume v"), corrupt
    packs[0].unlink()  # a disk error, or a hand that deleted the wrong file
    pack = f"p/{packs[0].parent.name}/{packs[0].name}"
    for where in ((), (fs.store_url,)):
        bad = fs.cli("fsck", *where, check=False, mount=not where)
        assert bad.returncode == 1, bad
        lines = bad.stdout.splitlines()
        missing = [line for line in lines if line.startswith("missing: ")]
        assert missing, bad.stdout
        for line in missing:  # every blob of the pack, with its pack and its root
            assert line.startswith(("missing: c/", "missing: n/")), line
            assert f"missing from the store (its pack {pack})" in line, line
            assert line.endswith(", needed by volume v"), line
        assert "NOT clean" in lines[-1]
    assert fs.cli("--json", "fsck", check=False).returncode == 1


def test_fsck_finds_a_wrong_refcount_and_a_leaked_save_online_only(snapfs: Snapfs):
    """A refcount off by one and a leaked copy-on-write save (a `frozen` row no pending
    snapshot needs) live in the writer's catalog: fsck on the mount names each, with the
    root, and exits 1 (--repair fixes the count, not the save); `snapfs fsck STORE_URL`
    says it does not check them."""
    fs = snapfs
    fs.cli("volume", "create", "v", "--size", "4M", "--block-size", "64K")
    with open(fs.vol("v"), "r+b") as f:
        f.write(os.urandom(1 * MiB))
    fs.cli("sync")
    db = sqlite3.connect(fs.cache_dir / "catalog.sqlite3", timeout=30, isolation_level=None)
    try:
        (vid,) = db.execute("SELECT id FROM volumes WHERE name='v'").fetchone()
        key, count = db.execute(
            "SELECT key, count FROM refs WHERE key > X'63' AND key < X'64' LIMIT 1"
        ).fetchone()
        db.execute("UPDATE refs SET count=count+1 WHERE key=?", (key,))
        db.execute("INSERT INTO frozen VALUES(?, 99, 3, 0)", (vid,))
    finally:
        db.close()
    bad = fs.cli("fsck", check=False)
    assert bad.returncode == 1, bad
    assert bad.stdout.splitlines()[:2] == [
        f"wrong refcount: c/{key[1:].hex()}: counted {count + 1}, referenced {count}, "
        "needed by volume v",
        "inconsistent: volume v: save of block 3, epoch 99, slot 0: leaked (no pending "
        "snapshot needs it)",
    ], bad.stdout
    assert "NOT clean" in bad.stdout.splitlines()[-1]
    offline = fs.cli("fsck", fs.store_url, check=False, mount=False)
    assert offline.returncode == 0, offline
    skipped = [line for line in offline.stdout.splitlines() if line.startswith("not checked: ")]
    assert len(skipped) == 1 and "refcounts" in skipped[0] and "saves" in skipped[0], offline
    repaired = fs.cli("fsck", "--repair", check=False)
    assert repaired.returncode == 1 and "refcounts repaired" in repaired.stdout, repaired
    assert "wrong refcount" not in fs.cli("fsck", check=False).stdout
    db = sqlite3.connect(fs.cache_dir / "catalog.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("DELETE FROM frozen WHERE volume_id=? AND snap_epoch=99", (vid,))
    finally:
        db.close()
    assert fs.cli_json("fsck")["clean"]
