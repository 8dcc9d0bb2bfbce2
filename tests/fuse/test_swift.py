"""snapfs on a real loopback OpenStack Swift (scripts/swift-saio), through the kernel: the
end-to-end test, the proxy going away mid-upload, a faulty network, bad credentials and
endpoints, and kill -9 during an upload."""

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from snapfs.store import open_store
from snapfs.volume import publish
from tests.conftest import SNAPFS, Snapfs, force_unmount, run
from tests.faultproxy import FAULTS, FaultProxy
from tests.fuse.test_discard import KEEP_SIZE, PUNCH_HOLE, fallocate
from tests.fuse.test_end_to_end import ext4_snapshots_and_store_only_restore
from tests.fuse.test_lease import wait_lease_lost
from tests.swift_fixtures import SAIO

pytestmark = [pytest.mark.fuse, pytest.mark.swift]

MiB = 1 << 20
SECRET = "Zq9-never-show-this-key-7Xw"


# ---------------------------------------------------------------- helpers


def ctl(fs: Snapfs, line: str):
    """One command through the ctl file, in this process (no CLI start-up: for tight polls)."""
    fd = os.open(fs.mnt / ".snapfs" / "ctl", os.O_RDWR)
    try:
        os.write(fd, (line + "\n").encode())
        reply = json.loads(os.pread(fd, 1 << 20, 0))
    finally:
        os.close(fd)
    assert reply["ok"], reply
    return reply["result"]


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float,
    step: float = 0.2,
    fs: Snapfs | None = None,
):
    """Poll `check` until it returns something true; fail naming `what` at the deadline
    (with the tail of `fs`'s daemon log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n".join(daemon_log(fs.cache_dir).splitlines()[-30:]) if fs else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(step)


def snapshot_states(fs: Snapfs, vol: str) -> dict[str, str]:
    return {s["name"]: s["state"] for s in fs.cli_json("snapshot", "list", vol)}


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes, timeout: float = 60) -> None:
    """pwrite + fsync, failing (instead of hanging the test) if they do not return."""
    error: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the caller
            error.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"write+fsync of {len(data)} bytes blocked for {timeout}s"
    if error:
        raise error[0]


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


class SwiftProxy:
    """The proxy server of the session's Swift, to freeze (SIGSTOP: connections are accepted
    by the kernel, requests get no answer) and kill from a test. The Swift is shared by the
    whole session: call `restore()` in a `finally`, it leaves the proxy running."""

    def __init__(self, saio_dir: str) -> None:
        self.dir = saio_dir
        self.pid = int(Path(saio_dir, "run", "proxy.pid").read_text())
        assert self._ours(), f"pid {self.pid} is not the proxy of {saio_dir}"

    def _ours(self) -> bool:  # never signal a recycled pid
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_text()
        except FileNotFoundError:
            return False
        return f"{Path(self.dir).resolve()}/" in cmdline and not pid_gone(self.pid)

    def _signal(self, sig: signal.Signals) -> None:
        if self._ours():
            os.kill(self.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL: every request in flight is cut, new connections are refused."""
        self._signal(signal.SIGKILL)
        saio("stop-proxy", self.dir)  # waits until it is gone, drops the pid file

    def restore(self) -> None:
        self._signal(signal.SIGCONT)
        saio("start-proxy", self.dir)  # nothing to do if it runs


def published_snapshots(url: str) -> list[str]:
    """VOL@SNAP of every snapshot in the store's newest catalog, read from the store."""

    async def read() -> list[str]:
        store = open_store(url)
        try:
            doc = await publish.latest_catalog(store)
        finally:
            await store.aclose()
        return [f"{s['volume']}@{s['name']}" for s in (doc or {}).get("snapshots", [])]

    return trio.run(read)


def saio(cmd: str, saio_dir: str) -> None:
    res = subprocess.run([str(SAIO), cmd, saio_dir], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"swift-saio {cmd} failed: {res.stderr.strip()}"


def swift_fs(
    swift_env, workdir: Path, cleanup, url: str | None = None, env: dict | None = None
) -> Snapfs:
    fs = Snapfs(workdir, cleanup, store_url=url or swift_env["new_container_url"](), env=env)
    fs.init()
    fs.mount()
    return fs


@pytest.fixture
def swift_snapfs(swift_env, workdir, cleanup) -> Snapfs:
    return swift_fs(swift_env, workdir, cleanup)


def daemon_log(cache_dir: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return (cache_dir / "daemon.log").read_text(errors="replace")
    return ""


# ---------------------------------------------------------------- 1. end to end


def test_ext4_snapshots_and_store_only_restore_on_swift(swift_snapfs: Snapfs, workdir):
    ext4_snapshots_and_store_only_restore(swift_snapfs, workdir, second_by="cli")
    assert swift_snapfs.stats()["flush_errors"] == 0


# ---------------------------------------------------------------- 2. proxy outage


def test_swift_proxy_outage_during_upload(swift_env, swift_snapfs: Snapfs, workdir):
    fs = swift_snapfs
    vol = "v"
    fs.cli("volume", "create", vol, "--size", "128M", "--block-size", "64K")
    rng = random.Random(2)
    first, later = rng.randbytes(24 * MiB), rng.randbytes(8 * MiB)
    proxy = SwiftProxy(swift_env["dir"])
    try:
        # A flush cycle stages its blocks, then PUTs them in packs: a fraction of a second
        # on loopback. To stop the proxy in the middle of that, deterministically, freeze it
        # first (neither the writes nor the snapshot need the store, and no flush cycle can
        # complete while it is frozen), wait until the flusher is uploading, then kill it.
        proxy.freeze()
        write_at(fs.vol(vol), 0, first)
        fs.cli("snapshot", "create", f"{vol}@s1")
        wait_for(
            "the flusher to start uploading",
            lambda: ctl(fs, "stats")["uploading_objects"] > 0,
            timeout=30,
            fs=fs,
        )
        assert snapshot_states(fs, vol) == {"s1": "creating"}
        proxy.kill()
        # Writes go on into the cache (over blocks s1 needs: copy-on-write, and new ones),
        # and fsync returns.
        write_at(fs.vol(vol), 20 * MiB, later)
        write_at(fs.vol(vol), 100 * MiB, later[:MiB])
        wait_for(
            "'flush failed, retrying' in daemon.log",
            lambda: "flush failed, retrying" in daemon_log(fs.cache_dir),
            timeout=60,
            fs=fs,
        )
        stats = ctl(fs, "stats")
        assert stats["flush_errors"] > 0, stats
        assert "Connection refused" in (stats["last_error"] or ""), stats
        assert snapshot_states(fs, vol) == {"s1": "creating"}
        assert read_at(fs.vol(vol), 20 * MiB, len(later)) == later
    finally:
        proxy.restore()  # the session's Swift is shared: always restore it

    # The flusher recovers by itself: the snapshot becomes available.
    wait_for(
        "s1 to become available",
        lambda: snapshot_states(fs, vol) == {"s1": "available"},
        timeout=120,
        step=0.5,
        fs=fs,
    )
    fs.cli("sync")
    head = first[: 20 * MiB] + later

    def check_contents() -> None:
        assert read_at(fs.snap(vol, "s1"), 0, len(first)) == first
        assert read_at(fs.vol(vol), 0, len(head)) == head
        assert read_at(fs.vol(vol), 100 * MiB, MiB) == later[:MiB]
        assert read_at(fs.vol(vol), 28 * MiB, MiB) == bytes(MiB)

    check_contents()
    # Store-only restore.
    fs.umount()
    fs.mount(cache_dir=workdir / "fresh-cache")
    assert snapshot_states(fs, vol) == {"s1": "available"}
    check_contents()
    report = fs.cli_json("fsck")
    assert report["clean"], report


# ---------------------------------------------------------------- 3. faulty network


def test_ext4_end_to_end_through_a_faulty_network(swift_env, workdir, cleanup):
    proxy = FaultProxy(
        swift_env["port"],
        seed=3,
        fault_rate=0.05,
        delay_rate=0.05,
        max_delay=0.2,
        max_faults=300,
        max_in_a_row=2,
    )
    port = proxy.start()
    cleanup.push("fault proxy", proxy.stop)  # pushed first: stopped after the daemon's exit
    name = swift_env["new_container_url"]().rsplit("/", 1)[1]
    # Both the auth endpoint and the storage URL (rewritten by the proxy) go through it.
    fs = swift_fs(
        swift_env,
        workdir,
        cleanup,
        url=f"swift://127.0.0.1:{port}/{name}",
        env={"ST_AUTH": f"http://127.0.0.1:{port}/auth/v1.0"},
    )
    ext4_snapshots_and_store_only_restore(fs, workdir, second_by="cli")
    counts = dict(proxy.counts)
    print(f"fault proxy: {counts}")
    assert counts["requests"] > 200, counts  # the data path, not just auth, went through
    assert proxy.faults >= 20, counts
    assert all(counts.get(kind, 0) > 0 for kind in (*FAULTS, "delay")), counts
    log = daemon_log(fs.cache_dir) + daemon_log(workdir / "fresh-cache")
    assert "try 2 of" in log  # SwiftStore retried


# ---------------------------------------------------------------- 4. bad configuration


def one_error_line(res: subprocess.CompletedProcess, *secrets: str) -> str:
    assert res.returncode != 0, res
    out = res.stdout + res.stderr
    for secret in secrets:
        assert secret not in out and secret[:6] not in out, out
    assert "Traceback" not in out, out
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: "), res.stderr
    assert res.stdout == "", res.stdout
    return lines[0]


def test_bad_credentials_container_and_host_fail_with_one_line(swift_env, workdir, cleanup):
    mnt = workdir / "mnt"
    mnt.mkdir()
    cleanup.push(f"mount {mnt}", lambda: force_unmount(str(mnt)))
    base = {**os.environ}

    def snapfs(*args: str, env: dict, cache: str | None = None) -> subprocess.Popen:
        extra = (str(mnt), "--cache-dir", str(workdir / cache)) if cache else ()
        return subprocess.Popen(
            [*SNAPFS, *args, *extra],
            env=env,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def result(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # Unreachable host (port 1 refuses; auth URL derived from the store URL): the slow case
    # (every try is retried), so both commands run while the others are checked.
    down = {k: v for k, v in base.items() if k != "ST_AUTH"} | {"ST_KEY": SECRET}
    unreachable = "swift://127.0.0.1:1/box"
    slow = [
        snapfs("init", unreachable, env=down),
        snapfs("mount", unreachable, env=down, cache="cache-unreachable"),
    ]
    for proc in slow:
        cleanup.push(f"pid {proc.pid}", proc.kill)  # a no-op once it has exited

    # Wrong password.
    wrong = base | {"ST_KEY": SECRET}
    url = swift_env["new_container_url"]()
    for args, cache in ((("init", url), None), (("mount", url), "cache-wrong-key")):
        line = one_error_line(result(snapfs(*args, env=wrong, cache=cache)), SECRET)
        assert "authentication failed" in line, line
        assert swift_env["ST_USER"] not in line

    # Unknown container: `init` creates it (that is its job), so only `mount` can meet it.
    url = swift_env["new_container_url"]()
    line = one_error_line(
        result(snapfs("mount", url, env=base, cache="cache-no-container")), swift_env["ST_KEY"]
    )
    assert "not found" in line and url.rsplit("/", 1)[1] in line, line

    for proc in slow:
        line = one_error_line(result(proc), SECRET)
        assert "refused" in line.lower() and unreachable in line, line

    assert not os.path.ismount(mnt)
    for cache in ("cache-unreachable", "cache-wrong-key", "cache-no-container"):
        log = daemon_log(workdir / cache)
        assert SECRET not in log and "Traceback" not in log, log


# ---------------------------------------------------------------- 5. kill -9 mid-upload


def test_kill_9_during_upload_loses_nothing(swift_env, swift_snapfs: Snapfs, workdir):
    fs = swift_snapfs
    fs.cli("volume", "create", "v", "--size", "256M", "--block-size", "64K")
    data = random.Random(5).randbytes(32 * MiB)
    proxy = SwiftProxy(swift_env["dir"])
    try:
        # As in the outage test: with the proxy frozen, no flush cycle can complete, so the
        # kill lands while the flusher is uploading (its PUTs hang), whatever the timing.
        proxy.freeze()
        write_at(fs.vol("v"), 3 * MiB + 123, data)
        fs.cli("snapshot", "create", "v@before-kill")
        write_at(fs.vol("v"), 0, b"after" * 1000)
        wait_for(
            "the flusher to start uploading",
            lambda: ctl(fs, "stats")["uploading_objects"] > 0,
            timeout=30,
            fs=fs,
        )
        os.kill(fs.pid, signal.SIGKILL)
        wait_for("the daemon to die", lambda: pid_gone(fs.pid), timeout=10, step=0.05)
    finally:
        proxy.restore()  # the requests cut by the kill reach Swift, or not: both must do
    run(["fusermount3", "-uz", str(fs.mnt)], check=False)
    assert fs.cli("status", check=False).returncode != 0
    assert published_snapshots(fs.store_url) == [], "killed after the snapshot was published"

    def check_contents(fs: Snapfs) -> None:
        assert read_at(fs.vol("v"), 0, 5000) == b"after" * 1000
        assert read_at(fs.vol("v"), 3 * MiB + 123, len(data)) == data
        assert read_at(fs.snap("v", "before-kill"), 0, 5000) == bytes(5000)
        assert read_at(fs.snap("v", "before-kill"), 3 * MiB + 123, len(data)) == data

    fs.mount()  # the same cache dir: crash recovery
    wait_for(
        "before-kill to become available",
        lambda: snapshot_states(fs, "v") == {"before-kill": "available"},
        timeout=120,
        step=0.5,
        fs=fs,
    )
    fs.cli("sync")
    check_contents(fs)
    report = fs.cli_json("fsck")
    assert report["clean"], report
    # No object lost: the store alone gives everything back.
    fs.umount()
    fs.mount(cache_dir=workdir / "fresh-cache")
    check_contents(fs)
    report = fs.cli_json("fsck")
    assert report["clean"], report


# ---------------------------------------------------------------- 6. one writer, discard


def test_one_writer_and_discard_on_swift(swift_env, workdir, cleanup):
    """The lease and the conditional publish on Swift (If-None-Match), and discard giving
    the space back in the container after gc."""
    env = {"SNAPFS_LEASE_SECONDS": "3"}
    fs = swift_fs(swift_env, workdir / "first", cleanup, env=env)
    fs.cli("volume", "create", "v", "--size", "16M", "--block-size", "64K")
    with open(fs.vol("v"), "r+b") as f:
        f.write(os.urandom(8 << 20))
    fs.cli("snapshot", "create", "v@one")
    fs.cli("sync")
    stored = fs.stats()["stored_data_bytes"]

    other = workdir / "mnt2"
    other.mkdir()
    res = run(
        [*SNAPFS, "mount", fs.store_url, str(other), "--cache-dir", str(workdir / "cache2")],
        check=False,
        env=fs.env,
    )
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert f"pid {fs.pid}" in res.stderr and "--takeover" in res.stderr

    # Discard on Swift: the snapshot keeps the data until it is deleted, then gc frees it.
    fd = os.open(fs.vol("v"), os.O_RDWR)
    try:
        assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 8 << 20) == 0
    finally:
        os.close(fd)
    fs.cli("snapshot", "delete", "v@one")
    fs.cli("sync")
    fs.cli("gc", "--threshold", "0.5")
    assert fs.stats()["stored_data_bytes"] <= stored - (8 << 20)

    # A forced takeover: the old writer can publish nothing over the new one.
    second = Snapfs(workdir / "second", cleanup, store_url=fs.store_url, env=fs.env)
    second.mount(extra=("--takeover",))
    second.cli("snapshot", "create", "v@from-second")
    second.cli("sync")
    # It may already know it lost the store (then the write is EROFS, as tested in
    # test_lease.py); either way nothing of it reaches the store.
    with contextlib.suppress(OSError), open(fs.vol("v"), "r+b") as f:
        f.write(b"old" * 1000)
    fs.cli("sync", check=False)
    wait_lease_lost(fs)
    assert published_snapshots(fs.store_url) == ["v@from-second"]
