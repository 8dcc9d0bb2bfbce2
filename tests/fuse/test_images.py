"""`snapfs export` and `snapfs import` through the real mount: sparse and exact raw exports,
qcow2 by qemu-img, imports of any format qemu-img reads, atomic imports (kill -9, Ctrl-C),
dedup against the store, and one-line errors."""

import os
import pty
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SNAPFS, Snapfs, run, sha256, write_random

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def make_image(path: Path, size: int, seed: int, pieces: int = 6) -> str:
    """A raw image of `size` bytes: holes, a few random 256K pieces, one all-zero written
    piece; returns its sha256."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            f.seek(rng.randrange(0, size - 256 * 1024) & ~4095)
            f.write(bytes(256 * 1024) if i == 0 else rng.randbytes(256 * 1024))
    return sha256(path)


def one_line_error(res) -> str:
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: "), res.stderr
    return lines[0]


def qemu_convert(src: Path, dst: Path, out_fmt: str, in_fmt: str = "raw") -> None:
    run(["qemu-img", "convert", "-f", in_fmt, "-O", out_fmt, str(src), str(dst)])


@pytest.fixture
def snap(snapfs: Snapfs) -> Snapfs:
    """Volume `db` (64M) with data at a few places, an all-zero written block, a tail write,
    snapshotted as db@s1."""
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "64M")
    rng = random.Random(7)
    with open(fs.vol("db"), "r+b") as f:
        for offset in (0, 5 * MiB + 4096, 33 * MiB, 64 * MiB - 1000):
            f.seek(offset)
            f.write(rng.randbytes(min(MiB, 64 * MiB - offset)))
        f.seek(20 * MiB)
        f.write(bytes(MiB))  # written zeros: holes in the export
    fs.cli("snapshot", "create", "db@s1")
    return fs


def test_export_raw_is_sparse_and_exact(snap: Snapfs, workdir: Path):
    out = workdir / "db.img"
    res = snap.cli("export", "db@s1", str(out))
    assert "exported db@s1" in res.stdout and res.stderr == ""  # no progress on a pipe
    assert sha256(out) == sha256(snap.snap("db", "s1"))
    st = os.stat(out)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 <= 6 * MiB  # 4 pieces of about 1M, not 64M
    assert not [p for p in os.listdir(workdir) if p.startswith(".db.img")]  # no temp left


def test_export_qcow2_is_equal_by_qemu_img_compare(snap: Snapfs, workdir: Path):
    out = workdir / "db.qcow2"
    res = snap.cli("--json", "export", "db@s1", str(out))
    assert '"format": "qcow2"' in res.stdout
    assert "file format: qcow2" in run(["qemu-img", "info", str(out)]).stdout
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(snap.snap("db", "s1")), str(out)])
    raw = workdir / "forced.qcow2"  # --format wins over the suffix
    snap.cli("export", "db@s1", str(raw), "--format", "raw")
    assert "file format: raw" in run(["qemu-img", "info", "-f", "raw", str(raw)]).stdout
    assert sha256(raw) == sha256(snap.snap("db", "s1"))


def test_export_from_the_store_without_a_mount(snap: Snapfs, workdir: Path):
    snap.cli("sync")
    out = workdir / "offline.img"
    res = snap.cli("export", "--store", snap.store_url, "db@s1", str(out), mount=False)
    assert "exported db@s1" in res.stdout
    assert sha256(out) == sha256(snap.snap("db", "s1"))
    assert os.stat(out).st_blocks * 512 <= 6 * MiB


def test_import_qcow2_exact_sparse_and_snapshotted(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    raw = workdir / "src.raw"
    digest = make_image(raw, 48 * MiB, seed=1)
    qcow = workdir / "src.qcow2"
    qemu_convert(raw, qcow, "qcow2")
    res = fs.cli("import", str(qcow), "im@base")
    assert "imported" in res.stdout and res.stderr == ""
    assert sha256(fs.vol("im")) == digest
    info = fs.cli_json("volume", "show", "im")
    assert info["size"] == 48 * MiB and info["allocated"] <= 2 * MiB  # zeros stay holes
    assert sha256(fs.snap("im", "base")) == digest
    assert [s["name"] for s in fs.cli_json("snapshot", "list", "im")] == ["base"]


def test_import_rounds_up_to_the_block_size_and_reads_vmdk(snapfs: Snapfs, workdir: Path):
    raw = workdir / "odd.raw"
    make_image(raw, 10 * MiB + 4096, seed=2)
    vmdk = workdir / "odd.vmdk"
    qemu_convert(raw, vmdk, "vmdk")
    snapfs.cli("import", str(vmdk), "odd", "--format", "vmdk")
    vol = snapfs.vol("odd")
    assert os.stat(vol).st_size == 10 * MiB + 128 * 1024
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(vol)])
    with open(vol, "rb") as f:
        f.seek(10 * MiB + 4096)
        assert f.read() == bytes(128 * 1024 - 4096)


def test_existing_volume_refused_unless_into(snap: Snapfs, workdir: Path):
    raw = workdir / "small.raw"
    digest = make_image(raw, 64 * MiB, seed=3)
    line = one_line_error(snap.cli("import", str(raw), "db", check=False))
    assert "already exists" in line and "--into" in line
    assert sha256(snap.snap("db", "s1")) != digest
    snap.cli("import", str(raw), "db@after", "--into")
    assert sha256(snap.vol("db")) == digest  # old data under the image's holes is gone
    assert sha256(snap.snap("db", "after")) == digest


def test_blocks_the_store_has_are_not_uploaded_again(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    raw = workdir / "dup.raw"
    make_image(raw, 32 * MiB, seed=4)
    fs.cli("import", str(raw), "one")
    before = fs.cli_json("sync")
    fs.cli("import", str(raw), "two")
    after = fs.cli_json("sync")
    blocks = 5 * 3  # five 256K random pieces: 2 or 3 blocks of 128K each, at most
    assert after["deduplicated_blocks"] - before["deduplicated_blocks"] >= 10
    assert after["uploaded_bytes"] - before["uploaded_bytes"] < blocks * 128 * 1024 // 4
    assert sha256(fs.vol("two")) == sha256(raw)


def _start_slow_import(fs: Snapfs, src: Path, name: str) -> subprocess.Popen:
    """An import paced at 2M/s by qemu-img's rate limit, once it has written something."""
    env = {**fs.env, "SNAPFS_TEST_IMPORT_RATE": str(2 * MiB)}
    cmd = [*SNAPFS, "--mount", str(fs.mnt), "import", str(src), name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fs.cleanup.push("slow import", lambda: proc.poll() is None and proc.kill())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _hidden(fs) and fs.stats()["dirty_bytes"] > 0:
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the import wrote nothing in 30 s")


def _wait_no_process_reads(path: Path) -> None:
    deadline = time.monotonic() + 3
    while run(["pgrep", "-f", str(path)], check=False).returncode == 0:
        assert time.monotonic() < deadline, "a process still reads " + str(path)
        time.sleep(0.05)


def _hidden(fs: Snapfs) -> int:
    """Volumes the daemon has but does not list: imports in progress or left behind."""
    return fs.stats()["volumes"] - len(fs.cli_json("volume", "list"))


def _nothing_visible(fs: Snapfs, name: str) -> None:
    assert name not in [v["name"] for v in fs.cli_json("volume", "list")]
    assert not [n for n in os.listdir(fs.mnt / "volumes") if name in n]
    assert not fs.vol(name).exists()


def test_killed_import_leaves_nothing_visible_and_a_rerun_succeeds(snapfs: Snapfs, workdir):
    fs = snapfs
    src = workdir / "big.raw"
    digest = write_random(src, 16 * MiB, seed=5)
    proc = _start_slow_import(fs, src, "big")
    proc.kill()
    proc.wait()
    _wait_no_process_reads(src)  # qemu-img died with it: nothing writes on
    _nothing_visible(fs, "big")
    assert _hidden(fs) == 1  # the half import, under its hidden name
    fs.cli("import", str(src), "big@done")  # the leftover is deleted, the import restarts
    assert sha256(fs.vol("big")) == digest
    assert _hidden(fs) == 0
    assert fs.cli_json("fsck")["clean"]


def test_interrupted_import_cleans_up_after_itself(snapfs: Snapfs, workdir: Path):
    fs = snapfs
    src = workdir / "int.raw"
    write_random(src, 16 * MiB, seed=6)
    proc = _start_slow_import(fs, src, "int")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err
    _nothing_visible(fs, "int")
    assert _hidden(fs) == 0  # deleted, not only hidden


def test_progress_on_a_terminal_only(snap: Snapfs, workdir: Path):
    master, slave = pty.openpty()
    try:
        cmd = [*SNAPFS, "--mount", str(snap.mnt), "export", "db@s1", str(workdir / "p.img")]
        proc = subprocess.run(cmd, stderr=slave, stdout=subprocess.PIPE, timeout=120)
        assert proc.returncode == 0
        os.set_blocking(master, False)
        shown = os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "export db@s1" in shown and "(100%)" in shown and "\r" in shown


def test_bad_input_gets_one_line(snap: Snapfs, workdir: Path):
    fs = snap
    garbage = workdir / "garbage.qcow2"
    garbage.write_bytes(os.urandom(70000))
    image = workdir / "ok.raw"
    make_image(image, 8 * MiB, seed=8)
    cases = [
        (("import", str(workdir / "missing.qcow2"), "x"), "no such file"),
        (("import", str(image), "x", "--format", "nosuch"), "nosuch"),
        (("import", str(garbage), "x", "--format", "qcow2"), "qcow2"),
        (("import", str(workdir), "x"), "directory"),
        (("import", str(image), "../x"), "invalid volume name"),
        (("import", str(image), "x@../y"), "invalid"),
        (("import", str(image), "x", "--size", "12Q"), "invalid size"),
        (("import", str(image), "x", "--size", "1M"), "smaller than the image"),
        (("import", str(image), "x", "--bogus"), "unknown option"),
        (("import", str(image)), "usage"),
        (("import", str(image), "nosuchvol", "--into"), "not found"),
        (("export", "db@s1", str(workdir / "x.vmdk"), "--format", "vmdk"), "raw or qcow2"),
        (("export", "db@nope", str(workdir / "x.img")), "not found"),
        (("export", "db", str(workdir / "x.img")), "VOLUME@SNAPSHOT"),
        (("export", "db@s1", str(workdir / "no" / "dir.img")), "no such directory"),
        (("export", "db@s1", str(workdir)), "not a regular file"),
    ]
    for args, expected in cases:
        line = one_line_error(fs.cli(*args, check=False))
        assert expected in line, (args, line)
    assert [v["name"] for v in fs.cli_json("volume", "list")] == ["db"]
    assert not [p for p in os.listdir(workdir) if p.startswith(".x.")]
