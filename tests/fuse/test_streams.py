"""snapfs send / receive through the real kernel: a full stream and three incrementals
rebuild every snapshot exactly on a second store (its own mount, cache dir and store), and
damaged, cut or mismatched streams are refused with one line, changing nothing."""

import os
import subprocess
from pathlib import Path

import pytest

from snapfs.stream import ZEROS, StreamReader
from tests.conftest import SNAPFS, Snapfs, refused, sha256

pytestmark = pytest.mark.fuse

MiB = 1 << 20
KiB = 1 << 10


def write(fs: Snapfs, vol: str, offset: int, data: bytes) -> None:
    with open(fs.vol(vol), "r+b") as f:
        f.seek(offset)
        f.write(data)


def snapshots(fs: Snapfs, vol: str) -> dict[str, str]:
    return {s["name"]: s["guid"] for s in fs.cli_json("snapshot", "list", vol)}


def kinds(path: Path) -> set[bytes]:
    with open(path, "rb") as f:
        return {r.kind for r in StreamReader(f).records()}


def make_history(fs: Snapfs, vol: str, seed: int) -> list[str]:
    """Four snapshots: data, then rewrites, zeros over data, a resize, a sparse tail."""
    fs.cli("volume", "create", vol, "--size", "8M", "--block-size", "64K")
    rnd = __import__("random").Random(seed)
    write(fs, vol, 0, rnd.randbytes(MiB))
    write(fs, vol, 5 * MiB + 1000, rnd.randbytes(300 * KiB))
    fs.cli("snapshot", "create", f"{vol}@s0")
    write(fs, vol, 64 * KiB, rnd.randbytes(100 * KiB))
    write(fs, vol, 512 * KiB, bytes(256 * KiB))  # zeros over data: holes again
    fs.cli("snapshot", "create", f"{vol}@s1")
    fs.cli("volume", "resize", vol, "--size", "12M")
    write(fs, vol, 11 * MiB, rnd.randbytes(MiB))
    fs.cli("snapshot", "create", f"{vol}@s2")
    write(fs, vol, 3 * MiB, rnd.randbytes(10))
    write(fs, vol, 0, bytes(64 * KiB))
    fs.cli("snapshot", "create", f"{vol}@s3")
    return ["s0", "s1", "s2", "s3"]


def test_a_full_stream_and_three_incrementals_rebuild_every_snapshot_on_a_second_store(
    snapfs: Snapfs, workdir: Path, cleanup
):
    fs = snapfs
    second = Snapfs(workdir / "second", cleanup)
    second.init()
    second.mount()
    names = make_history(fs, "db", seed=1)
    streams = workdir / "streams"
    streams.mkdir()
    base = None
    for name in names[:3]:
        out = streams / name
        fs.cli("send", f"db@{name}", *(["--from", f"db@{base}"] if base else []), "-o", str(out))
        second.cli("receive", "db", "-i", str(out))
        base = name
    # The last one through a pipe both ways: send to stdout, receive from stdin.
    with open(streams / "s3", "wb") as out:
        subprocess.run(
            [*SNAPFS, "--mount", str(fs.mnt), "send", "db@s3", "--from", "db@s2"],
            stdout=out,
            check=True,
        )
    with open(streams / "s3", "rb") as src:
        res = subprocess.run(
            [*SNAPFS, "--mount", str(second.mnt), "--json", "receive", "db"],
            stdin=src,
            capture_output=True,
            text=True,
        )
    assert res.returncode == 0, res.stderr
    assert snapshots(second, "db") == snapshots(fs, "db")  # same names, same guids
    for name in names:
        assert sha256(second.snap("db", name)) == sha256(fs.snap("db", name)), name
    assert os.path.getsize(streams / "s3") < 2 * MiB  # only the changes went
    assert kinds(streams / "s0") == {b"D"}  # a full stream: data only
    assert ZEROS in kinds(streams / "s1")  # zeros over data travel as zero records
    # A full stream under another name, on the same second mount.
    second.cli("receive", "copy@first", "-i", str(streams / "s0"))
    assert sha256(second.snap("copy", "first")) == sha256(fs.snap("db", "s0"))
    second.cli("sync")
    assert second.cli_json("fsck")["clean"]


def test_damaged_cut_and_mismatched_streams_are_refused_and_change_nothing(
    snapfs: Snapfs, workdir: Path
):
    fs = snapfs
    make_history(fs, "db", seed=2)
    full, incr = workdir / "full", workdir / "incr"
    fs.cli("send", "db@s0", "-o", str(full))
    fs.cli("send", "db@s1", "--from", "db@s0", "-o", str(incr))
    fs.cli("receive", "copy", "-i", str(full))  # another volume of the same mount
    before = (snapshots(fs, "copy"), sha256(fs.vol("copy")))

    data = incr.read_bytes()
    flipped, cut = workdir / "flipped", workdir / "cut"
    flipped.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    cut.write_bytes(data[: len(data) - 100])
    assert "damaged" in refused(fs, "receive", "copy", "-i", str(flipped))
    assert "cut short" in refused(fs, "receive", "copy", "-i", str(cut))
    assert "base" in refused(fs, "receive", "db", "-i", str(incr))  # db's newest is s3
    assert "exists" in refused(fs, "receive", "copy", "-i", str(full))
    full_flipped = workdir / "full-flipped"
    raw = full.read_bytes()
    full_flipped.write_bytes(raw[:-40] + bytes([raw[-40] ^ 0x80]) + raw[-39:])
    refused(fs, "receive", "new", "-i", str(full_flipped))
    assert "new" not in {v["name"] for v in fs.cli_json("volume", "list")}
    assert (snapshots(fs, "copy"), sha256(fs.vol("copy"))) == before

    write(fs, "copy", 7 * MiB, b"changed since s0")
    assert "--force" in refused(fs, "receive", "copy", "-i", str(incr))
    fs.cli("receive", "copy", "-i", str(incr), "--force")
    assert sha256(fs.snap("copy", "s1")) == sha256(fs.snap("db", "s1"))
    assert sha256(fs.vol("copy")) == sha256(fs.snap("db", "s1"))


def test_bad_input_is_one_line(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "1M")
    fs.cli("snapshot", "create", "db@a")
    garbage = workdir / "garbage"
    garbage.write_bytes(b"not a stream\n" * 100)
    refused(fs, "send", "../x@a", "-o", str(workdir / "o"))
    refused(fs, "send", "db@nope", "-o", str(workdir / "o"))
    refused(fs, "send", "db@a", "--from", "other@a", "-o", str(workdir / "o"))
    refused(fs, "send", "db@a", "-o", str(workdir / "no-such-dir" / "o"))
    refused(fs, "send", "db@a", "--bogus")
    refused(fs, "send")
    assert "magic" in refused(fs, "receive", "x", "-i", str(garbage))
    refused(fs, "receive", "x", "-i", str(workdir / "missing"))
    refused(fs, "receive", "../x", "-i", str(garbage))
    refused(fs, "receive", "x@../y", "-i", str(garbage))
    empty = workdir / "empty"
    empty.write_bytes(b"")
    assert "cut short" in refused(fs, "receive", "x", "-i", str(empty))
    assert not os.path.exists(workdir / "o")
    assert [v["name"] for v in fs.cli_json("volume", "list")] == ["db"]
