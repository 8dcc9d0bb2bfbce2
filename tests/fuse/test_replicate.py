"""snapfs replicate through the real mount: a snapshot and a later one go to another store
(the second sends only its changes), a mount of that store adopts them (sha256 exact); a
replicate killed mid-way resumes, sends nothing twice and ends exact; a target with a live
writer and bad input are refused with one line; local → Swift → Swift → local."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SNAPFS, Snapfs, refused, sha256

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def write(fs: Snapfs, vol: str, offset: int, data: bytes) -> None:
    with open(fs.vol(vol), "r+b") as f:
        f.seek(offset)
        f.write(data)


def replicate(fs: Snapfs, ref: str, to: str, cache: Path, *extra: str) -> dict:
    out = fs.cli("--json", "replicate", ref, "--to", to, "--cache-dir", str(cache), *extra)
    return json.loads(out.stdout)


def target_store(workdir: Path, cleanup, name: str, url: str | None = None) -> Snapfs:
    (workdir / name).mkdir()
    fs = Snapfs(workdir / name, cleanup, store_url=url)
    fs.init()
    return fs


def adopt(target: Snapfs, refs: dict[str, str], size: str, want: dict[str, str], bs="64K"):
    """Mount the target, manage each reference into one new volume, compare, fsck."""
    target.mount()
    listed = {r["id"]: r["state"] for r in target.cli_json("snapshot", "unmanaged", "list")}
    assert {listed[i] for i in refs.values()} == {"available"}
    target.cli("volume", "create", "copy", "--size", size, "--block-size", bs)
    for name, rid in refs.items():
        target.cli("snapshot", "manage", "copy", rid, "--name", name)
        assert sha256(target.snap("copy", name)) == want[name]
    assert target.cli_json("fsck")["clean"]


def test_full_then_incremental_sends_only_changes(snapfs: Snapfs, workdir: Path, cleanup):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "40M", "--block-size", "64K")
    write(fs, "db", 0, os.urandom(16 * MiB))
    write(fs, "db", 30 * MiB, os.urandom(4 * MiB))
    fs.cli("snapshot", "create", "db@one")
    write(fs, "db", 5 * MiB, os.urandom(MiB))
    fs.cli("snapshot", "create", "db@two")
    want = {n: sha256(fs.snap("db", n)) for n in ("one", "two")}
    target = target_store(workdir, cleanup, "b")
    cache = workdir / "rcache"
    first = replicate(fs, "db@one", target.store_url, cache)
    second = replicate(fs, "db@two", target.store_url, cache, "--name", "later")
    print(f"first: {first}\nsecond: {second}")
    assert first["sent_bytes"] >= 20 * MiB and first["state"] == "available"
    assert MiB <= second["sent_bytes"] < MiB + 256 * 1024, second
    assert replicate(fs, "db@two", target.store_url, cache)["sent_objects"] == 0
    refs = {"one": first["reference"], "two": second["reference"]}
    adopt(target, refs, "40M", want)
    line = refused(fs, "replicate", "db@one", "--to", target.store_url, "--cache-dir", str(cache))
    assert "live writer" in line
    for bad in (
        ("replicate", "db@nope", "--to", target.store_url, "--cache-dir", str(cache)),
        ("replicate", "../x", "--to", target.store_url),
        ("replicate", "db@one"),
        ("replicate", "db@one", "--to", "ftp://nowhere"),
        ("replicate", "db@one", "--to", fs.store_url, "--cache-dir", str(cache)),
        ("replicate", "db@one", "--to", f"file://{workdir}/none", "--cache-dir", str(cache)),
    ):
        refused(fs, *bad)


def test_killed_replicate_resumes_and_ends_exact(snapfs: Snapfs, workdir: Path, cleanup):
    """Killed (-9) once its second batch is uploaded and before that batch commits: the
    rerun sends neither the first batch (committed) nor the second (its packs are adopted
    where they are): nothing twice."""
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "24M", "--block-size", "16K")
    write(fs, "db", 0, os.urandom(24 * MiB))  # 6 leaves of 4 MiB
    fs.cli("snapshot", "create", "db@full")
    want = {"full": sha256(fs.snap("db", "full"))}
    fs.cli("sync")
    target = target_store(workdir, cleanup, "b")
    cache = workdir / "rcache"
    env = {**fs.env, "SNAPFS_TEST_REPLICATE_BATCH": "1", "SNAPFS_TEST_REPLICATE_PAUSE": "4"}
    cmd = [*SNAPFS, "--mount", str(fs.mnt), "replicate", "db@full", "--to", target.store_url]
    proc = subprocess.Popen([*cmd, "--cache-dir", str(cache)], env=env, start_new_session=True)
    cleanup.push("replicate", lambda: proc.kill())
    root = Path(target.store_url.removeprefix("file://"))
    # catalogs: the fence, the inbound reference, one batch (a leaf and its chunks); then
    # the next batch's index fragment (one per batch): it is uploaded and pausing for 4 s
    wait_for(proc, lambda: count(root / "catalog") >= 3 and count(root / "i") >= 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert count(root / "catalog") == 3, "the second batch committed before the kill"
    rest = replicate(fs, "db@full", target.store_url, cache)
    print(f"after the kill: {rest}")
    # 6 * 257 + 1 objects: a leaf and its 256 chunks committed, one more uploaded
    assert rest["sent_objects"] == 6 * 257 + 1 - 2 * 257, rest  # without adoption: - 257
    assert rest["adopted_objects"] == 257
    adopt(target, {"full": rest["reference"]}, "24M", want, "16K")
    assert target.cli_json("snapshot", "unmanaged", "list") == []


def count(path: Path) -> int:
    """Objects under `path` (in subdirectories; not the temporary files of a put)."""
    return sum(".tmp-" not in f for _dir, _dirs, files in os.walk(path) for f in files)


def wait_for(proc: subprocess.Popen, done) -> None:
    deadline = time.monotonic() + 120
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_local_to_swift_to_swift_to_local(swift_env, snapfs: Snapfs, workdir: Path, cleanup):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "8M", "--block-size", "64K")
    write(fs, "db", MiB, os.urandom(3 * MiB))
    fs.cli("snapshot", "create", "db@s")
    want = {"s": sha256(fs.snap("db", "s"))}
    swift_a = target_store(workdir, cleanup, "a", swift_env["new_container_url"]())
    swift_b = target_store(workdir, cleanup, "b", swift_env["new_container_url"]())
    local_c = target_store(workdir, cleanup, "c")
    hops = [(None, swift_a), (swift_a, swift_b), (swift_b, local_c)]
    what = "db@s"
    for i, (source, target) in enumerate(hops):
        extra = () if source is None else ("--from-store", source.store_url)
        done = replicate(fs, what, target.store_url, workdir / f"cache{i}", *extra)
        assert done["state"] == "available" and done["sent_bytes"] >= 3 * MiB
        what = done["reference"]  # the next hop reads this reference of that store
    adopt(local_c, {"s": done["reference"]}, "8M", want)
