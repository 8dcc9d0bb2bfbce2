"""Shared fixtures. Everything a test mounts, attaches or starts is registered with a
`Cleanup` stack and torn down in reverse order, also when the test fails. All of it lies in
one temp root (pytest's --basetemp, see suite_root), where scripts/test-cleanup finds what a
killed run left."""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.swift_fixtures"]

SNAPFS = [sys.executable, "-m", "snapfs.cli"]
CHECKOUT = Path(__file__).resolve().parent.parent


def suite_root() -> Path:
    """The dir under which a run of the suite makes everything: $SNAPFS_TEST_ROOT, else one per
    user and checkout (scripts/test-cleanup --print-root says the same)."""
    given = os.environ.get("SNAPFS_TEST_ROOT")
    if given:
        return Path(given)
    tag = hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:8]
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"snapfs-tests-{os.getuid()}-{tag}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Make the root pytest's --basetemp (unless one is given), and hold ROOT.lock while the
    run lasts: scripts/test-cleanup leaves a root alone while its lock is held, and a second
    run would remove the first one's dirs (pytest empties --basetemp when it starts)."""
    if config.option.basetemp is None:
        config.option.basetemp = str(suite_root())
    base = os.path.abspath(config.option.basetemp)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    lock = open(f"{base}.lock", "a+")  # noqa: SIM115 (held open until the run ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise pytest.UsageError(
            f"another run of the suite (pid {holder}) is using {base}; wait for it to end, or "
            "give this one a root of its own (SNAPFS_TEST_ROOT=/tmp/DIR or --basetemp=/tmp/DIR)"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    config.add_cleanup(lock.close)


class Cleanup:
    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._stack.append((what, fn))

    def run(self) -> None:
        errors = []
        while self._stack:
            what, fn = self._stack.pop()
            try:
                fn()
            except Exception as exc:
                errors.append(f"{what}: {exc}")
        if errors:
            print("cleanup problems:", *errors, sep="\n  ", file=sys.stderr)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: str) -> None:
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


class Snapfs:
    """One store + one mount point, driven through the real CLI and kernel."""

    def __init__(
        self, root: Path, cleanup: Cleanup, store_url: str | None = None, env: dict | None = None
    ) -> None:
        self.root = root
        self.cleanup = cleanup
        self.store_url = store_url or f"file://{root}/store"
        self.env = {**os.environ, **(env or {})}
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache_dir = root / "cache"
        self.pid: int | None = None

    def cli(self, *args: str, check: bool = True, mount: bool = True):
        cmd = [*SNAPFS, *(["--mount", str(self.mnt)] if mount else []), *args]
        return run(cmd, check=check, env=self.env)

    def cli_json(self, *args: str):
        return json.loads(self.cli("--json", *args).stdout)

    def init(self) -> None:
        self.cli("init", self.store_url, mount=False)

    def mount(
        self, cache_dir: Path | None = None, extra: tuple[str, ...] = (), mnt: Path | None = None
    ) -> None:
        mnt = mnt or self.mnt
        cache = cache_dir or self.cache_dir
        holder: dict[str, int | None] = {"pid": None}
        self.cleanup.push(f"daemon on {mnt}", lambda: self._stop(mnt, holder["pid"]))
        self.cli("mount", self.store_url, str(mnt), "--cache-dir", str(cache), *extra, mount=False)
        status = json.loads(
            run([*SNAPFS, "--json", "--mount", str(mnt), "status"], env=self.env).stdout
        )
        holder["pid"] = status["pid"]
        if mnt == self.mnt:
            self.pid = status["pid"]

    def _stop(self, mnt: Path, pid: int | None) -> None:
        if is_mounted(str(mnt)):
            subprocess.run(
                [*SNAPFS, "umount", str(mnt)], capture_output=True, timeout=300, env=self.env
            )
        force_unmount(str(mnt))
        deadline = time.monotonic() + 60
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def umount(self) -> None:
        self.cli("umount", str(self.mnt), mount=False)
        self.pid = None

    def vol(self, name: str) -> Path:
        return self.mnt / "volumes" / name

    def snap(self, vol: str, name: str) -> Path:
        return self.mnt / "snapshots" / vol / name

    def stats(self) -> dict:
        return self.cli_json("stats")

    def losetup(self, path: Path, read_only: bool = False) -> str:
        args = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(path)]
        dev = run(args).stdout.strip()
        self.cleanup.push(f"loop {dev}", lambda: detach(dev))
        return dev

    def mount_fs(self, dev: str, where: Path, read_only: bool = False) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        opts = ["-o", "ro,noload"] if read_only else []
        run(["mount", *opts, dev, str(where)])
        self.cleanup.push(f"mount {where}", lambda: umount_fs(where))
        return where


def refused(fs: Snapfs, *args: str) -> str:
    """Run a snapfs command that must fail with one line on stderr and exit 1 (no
    traceback); returns that line."""
    res = fs.cli(*args, check=False)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


def detach(dev: str) -> None:
    for _ in range(50):
        res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if res.returncode == 0 or "No such device" in res.stderr:
            return
        out = subprocess.run(["losetup", dev], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.1)


def umount_fs(where: Path) -> None:
    if is_mounted(str(where)):
        res = subprocess.run(["umount", str(where)], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.run()


@pytest.fixture
def workdir(tmp_path_factory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("snapfs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def snapfs(workdir: Path, cleanup: Cleanup) -> Snapfs:
    fs = Snapfs(workdir, cleanup)
    fs.init()
    fs.mount()
    return fs


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int, seed: int) -> str:
    """Deterministic pseudo-random content (fast): returns its sha256."""
    import random

    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            data = rng.randbytes(n)
            f.write(data)
            h.update(data)
            left -= n
    return h.hexdigest()
