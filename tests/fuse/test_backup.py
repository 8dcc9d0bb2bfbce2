"""snapfs backup / restore through real mounts: two backups of a volume into a bank (the
second sends only its changes), each restored exactly on another site (a second mount with
its own store and cache dir, nothing shared but the bank); the first backup deleted, the
second still restores exactly; bad input refused with one line; a Swift bank."""

import errno
import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest

from snapfs.ctlclient import ctl
from tests.conftest import SNAPFS, Snapfs, refused, sha256
from tests.faultproxy import FaultProxy
from tests.fuse.test_replicate import MiB, write

pytestmark = pytest.mark.fuse


def site(workdir: Path, cleanup, name: str, url: str | None = None, mount=True) -> Snapfs:
    (workdir / name).mkdir()
    fs = Snapfs(workdir / name, cleanup, store_url=url)
    fs.init()
    if mount:
        fs.mount()
    return fs


def backup(fs: Snapfs, vol: str, bank: str, name: str, cache: Path, *extra: str) -> dict:
    args = ("backup", vol, "--bank", bank, "--name", name, "--cache-dir", str(cache), *extra)
    return json.loads(fs.cli("--json", *args).stdout)


def restore(fs: Snapfs, bank: str, name: str, vol: str) -> dict:
    return json.loads(fs.cli("--json", "restore", name, "--bank", bank, "--as", vol).stdout)


def test_backup_twice_restore_each_delete_the_first(snapfs: Snapfs, workdir: Path, cleanup):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "24M", "--block-size", "64K")
    write(fs, "db", 0, os.urandom(12 * MiB))
    write(fs, "db", 20 * MiB, os.urandom(2 * MiB))
    want = {"mon": sha256(fs.vol("db"))}
    bank = site(workdir, cleanup, "bank", mount=False).store_url
    cache = workdir / "bcache"
    first = backup(fs, "db", bank, "mon", cache, "--description", "before the upgrade")
    write(fs, "db", 5 * MiB, os.urandom(MiB))
    want["tue"] = sha256(fs.vol("db"))
    second = backup(fs, "db", bank, "tue", cache)
    print(f"first: {first}\nsecond: {second}")
    assert first["sent_bytes"] >= 14 * MiB
    assert MiB <= second["sent_bytes"] < MiB + 256 * 1024, second
    assert [s["name"] for s in fs.cli_json("snapshot", "list", "db")] == []
    listed = fs.cli_json("backup", "list", "--bank", bank)
    assert [(b["name"], b["state"]) for b in listed] == [("mon", "available"), ("tue", "available")]
    assert listed[0]["description"] == "before the upgrade" and listed[0]["size"] == 24 * MiB
    shown = fs.cli_json("backup", "show", "tue", "--bank", bank)
    assert shown["name"] == "tue" and shown["block_size"] == 64 * 1024
    other = site(workdir, cleanup, "site2")
    got = {n: restore(other, bank, n, f"r{n}") for n in ("mon", "tue")}
    print(f"restored: {got}")
    assert got["tue"]["sent_bytes"] < 2 * MiB  # the second restore copies only the changes
    for n in ("mon", "tue"):
        assert sha256(other.vol(f"r{n}")) == want[n]
    assert other.cli_json("fsck")["clean"]
    fs.cli("backup", "delete", "mon", "--bank", bank, "--grace", "0", "--cache-dir", str(cache))
    assert [b["name"] for b in fs.cli_json("backup", "list", "--bank", bank)] == ["tue"]
    third = site(workdir, cleanup, "site3")
    restore(third, bank, "tue", "db")
    assert sha256(third.vol("db")) == want["tue"]
    assert "no backup named 'mon'" in refused(third, "restore", "mon", "--bank", bank, "--as", "x")
    assert "already exists" in refused(third, "restore", "tue", "--bank", bank, "--as", "db")
    line = refused(fs, "backup", "db", "--bank", bank, "--name", "tue", "--cache-dir", str(cache))
    assert "already exists" in line
    assert fs.cli_json("snapshot", "list", "db") == []  # the refused backup's snapshot went
    missing = f"file://{workdir}/none"
    for bad in (
        ("backup", "db", "--bank", bank, "--name", "../x", "--cache-dir", str(cache)),
        ("backup", "../x", "--bank", bank, "--name", "x", "--cache-dir", str(cache)),
        ("backup", "nope", "--bank", bank, "--name", "x", "--cache-dir", str(cache)),
        ("backup", "db", "--bank", missing, "--name", "x", "--cache-dir", str(cache)),
        ("backup", "db", "--name", "x"),
        ("backup", "show", "nope", "--bank", bank),
        ("backup", "delete", "nope", "--bank", bank, "--cache-dir", str(cache)),
        ("backup", "list", "--bank", missing),
        ("restore", "../x", "--bank", bank, "--as", "y"),
        ("restore", "tue", "--bank", bank, "--as", "../y"),
        ("restore", "tue", "--bank", missing, "--as", "y"),
        ("restore", "nope", "--bank", bank, "--as", "y"),
        ("restore", "tue", "--as", "y"),
    ):
        refused(third if bad[0] == "restore" else fs, *bad)
    assert [v["name"] for v in third.cli_json("volume", "list")] == ["db"]
    assert fs.cli_json("snapshot", "list", "db") == []
    assert third.cli_json("fsck")["clean"]


def test_swift_bank(swift_env, snapfs: Snapfs, workdir: Path, cleanup):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "8M", "--block-size", "64K")
    write(fs, "db", MiB, os.urandom(3 * MiB))
    want = sha256(fs.vol("db"))
    bank = site(workdir, cleanup, "bank", swift_env["new_container_url"](), mount=False)
    done = backup(fs, "db", bank.store_url, "s", workdir / "bcache")
    assert done["sent_bytes"] >= 3 * MiB
    other = site(workdir, cleanup, "site2")
    restore(other, bank.store_url, "s", "db")
    assert sha256(other.vol("db")) == want


def test_restore_shows_its_progress_on_a_terminal_only(snapfs: Snapfs, workdir: Path, cleanup):
    """The restore runs in the mount's daemon (one blocking ctl call): the CLI asks the
    daemon's status for the bytes copied and draws one line on a terminal; on a pipe or
    with --json, nothing."""
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "8M", "--block-size", "64K")
    write(fs, "db", 0, os.urandom(6 * MiB))
    bank = site(workdir, cleanup, "bank", mount=False).store_url
    backup(fs, "db", bank, "b1", workdir / "bcache")
    other = site(workdir, cleanup, "site2")
    master, slave = pty.openpty()
    try:
        cmd = [*SNAPFS, "--mount", str(other.mnt), "restore", "b1", "--bank", bank, "--as", "r"]
        proc = subprocess.run(cmd, stderr=slave, stdout=subprocess.PIPE, timeout=300)
        assert proc.returncode == 0, proc
        os.set_blocking(master, False)
        shown = os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "restore r: 6" in shown and "\r" in shown, shown
    piped = other.cli("restore", "b1", "--bank", bank, "--as", "r2")
    assert "\r" not in piped.stderr and piped.stderr == ""
    assert sha256(other.vol("r")) == sha256(fs.vol("db")) == sha256(other.vol("r2"))


def test_ctrl_c_cancels_a_restore_and_the_next_goes_on(
    swift_env, snapfs: Snapfs, workdir: Path, cleanup
):
    """`snapfs restore` is one ctl call that the daemon answers when the restore ends, and
    a FUSE call does not return on a signal: the call runs in a thread, so Ctrl-C reaches
    the CLI, which sends `cancel restore VOL`. It exits 130 with one line; no volume is
    made; the next restore goes on and is exact. The bank is reached through a proxy that
    delays every request, so the restore is surely under way when the signal comes."""
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "48M", "--block-size", "64K")
    write(fs, "db", 0, os.urandom(40 * MiB))
    want = sha256(fs.vol("db"))
    bank = site(workdir, cleanup, "bank", swift_env["new_container_url"](), mount=False)
    backup(fs, "db", bank.store_url, "b1", workdir / "bcache")
    proxy = FaultProxy(swift_env["port"], seed=5, fault_rate=0.0, delay_rate=1.0, max_delay=0.4)
    port = proxy.start()
    cleanup.push("fault proxy", proxy.stop)  # pushed first: stopped after the daemon's exit
    slow_bank = f"swift://127.0.0.1:{port}/{bank.store_url.rsplit('/', 1)[1]}"
    (workdir / "site2").mkdir()
    other = Snapfs(
        workdir / "site2", cleanup, env={"ST_AUTH": f"http://127.0.0.1:{port}/auth/v1.0"}
    )
    other.init()
    other.mount()
    cmd = [*SNAPFS, "--mount", str(other.mnt), "restore", "b1", "--bank", slow_bank, "--as", "r"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=other.env)
    cleanup.push("restore", lambda: proc.poll() is None and proc.kill())
    for _ in range(600):
        running = ctl(str(other.mnt), "status").get("restores", {})  # type: ignore[union-attr]
        if running.get("r", {}).get("copied_bytes") or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert running.get("r", {}).get("copied_bytes"), f"the restore did not start: {running}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "cancelled" in lines[0] and "run it again" in lines[0], lines
    assert [v["name"] for v in other.cli_json("volume", "list")] == []
    refs = other.cli_json("snapshot", "unmanaged", "list")
    assert [(r["name"], r["state"]) for r in refs] == [("b1", "inbound")], refs
    assert ctl(str(other.mnt), "status").get("restores") == {}  # type: ignore[union-attr]
    # As a shell's `echo LINE > ctl` does (write, close, no read): a command that outlasts
    # its write is waited for by close(), which reports its failure.
    missing = shell_ctl(other, f"restore nope --bank {slow_bank} --as r")
    assert missing is not None and missing.errno == errno.ENOENT, missing
    assert shell_ctl(other, f"restore b1 --bank {slow_bank} --as r") is None
    assert [v["name"] for v in other.cli_json("volume", "list")] == ["r"]
    assert sha256(other.vol("r")) == want
    assert other.cli_json("fsck")["clean"]


def shell_ctl(fs: Snapfs, line: str) -> OSError | None:
    """`echo LINE > MNT/.snapfs/ctl`: write the line, close, read nothing; returns what
    close() failed with (the write must not fail: the command outlasts it)."""
    fd = os.open(fs.mnt / ".snapfs" / "ctl", os.O_WRONLY)
    started = time.monotonic()
    try:
        os.write(fd, (line + "\n").encode())
        assert time.monotonic() - started < 3, "the write waited for the whole command"
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            return exc
    return None
