"""Plumbing for the benchmark: commands, a cleanup stack, loop devices, page-cache eviction,
sequential reads and writes, process memory. Nothing here knows about snapfs."""

import contextlib
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class CommandError(RuntimeError):
    pass


def sh(
    *cmd,
    check: bool = True,
    timeout: float | None = 600,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a command (stdin closed), capture its output; raise CommandError on failure."""
    args = [str(c) for c in cmd]
    try:
        res = subprocess.run(
            args,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(args)}: timed out after {timeout} s") from None
    if check and res.returncode:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-5:]
        raise CommandError(f"{' '.join(args)} (exit {res.returncode}): {' / '.join(tail)}")
    return res


class Cleanup:
    """A LIFO stack of teardown steps. Every step runs, also when an earlier one fails;
    failures are collected in `errors` (and printed), never raised."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self.errors: list[str] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self) -> None:
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except BaseException as exc:  # a Ctrl-C here must not skip the other steps
                self.errors.append(f"{what}: {exc!r}")
                print(f"  cleanup: {what}: {exc!r}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Cleanup":
        return self

    def __exit__(self, *exc) -> None:
        self.run()


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def mounted(path: Path | str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def force_unmount(path: Path | str) -> None:
    if mounted(path):
        sh("fusermount3", "-u", path, check=False)
    if mounted(path):
        sh("umount", "-l", path, check=False)
        sh("fusermount3", "-uz", path, check=False)


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Wait up to `grace` seconds for a process to exit, then SIGKILL it."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- loop devices


def loop_attach(
    cleanup: Cleanup, path: Path | str, direct_io: bool = True, read_only: bool = False
) -> tuple[str, bool]:
    """Attach a loop device over `path` (registered for detach); returns (device, whether
    the loop device does direct I/O on its backing file)."""
    args = ["losetup", "-f", "--show"] + (["-r"] if read_only else [])
    if direct_io:
        args.append("--direct-io=on")
    dev = sh(*args, path).stdout.strip()
    cleanup.push(f"detach {dev}", lambda: loop_detach(dev))
    dio = sh("losetup", "-n", "-O", "DIO", dev, check=False).stdout.strip() == "1"
    return dev, dio


def loop_detach(dev: str) -> None:
    """Detach and wait until the kernel really let go of the backing file (a detach is
    deferred while the device is still open, e.g. by a fio that just exited)."""
    name = os.path.basename(dev)
    backing = Path(f"/sys/block/{name}/loop/backing_file")
    for _ in range(300):
        if not backing.exists():
            return
        sh("losetup", "-d", dev, check=False)
        time.sleep(0.1)
    raise RuntimeError(f"{dev} is still attached")


# ---------------------------------------------------------------- page cache


def evict(paths: Iterable[Path | str]) -> None:
    """Drop the clean page cache of these files (and of every file under these dirs):
    POSIX_FADV_DONTNEED, so that a read afterwards is cold without dropping the caches of
    the whole machine (other people run test suites here)."""
    for top in paths:
        top = Path(top)
        files = (
            [top] if not top.is_dir() else [Path(d) / f for d, _, fs in os.walk(top) for f in fs]
        )
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def tree_listing(top: Path) -> dict[str, int]:
    """{relative path: size} of every file under `top`."""
    out = {}
    for d, _, fs in os.walk(top):
        for f in fs:
            p = Path(d) / f
            with contextlib.suppress(OSError):
                out[str(p.relative_to(top))] = p.stat().st_size
    return out


# ---------------------------------------------------------------- data


def write_random(
    path: Path | str,
    size: int,
    seed: int,
    offset: int = 0,
    fsync: bool = True,
    chunk: int = 8 * MiB,
) -> float:
    """Write `size` bytes of seeded pseudo-random data at `offset`; returns MB/s."""
    rng = random.Random(seed)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            os.pwrite(fd, rng.randbytes(n), offset + done)
            done += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - t) / 1e6


def write_blocks(
    path: Path | str, blocks: Iterable[int], block_size: int, seed: int, fsync: bool = True
) -> int:
    """Overwrite whole blocks with fresh random data; returns the bytes written."""
    rng = random.Random(seed)
    n = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for blk in blocks:
            os.pwrite(fd, rng.randbytes(block_size), blk * block_size)
            n += block_size
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return n


def read_sequential(path: Path | str, size: int, chunk: int = 4 * MiB) -> float:
    """MB/s of one reader doing `chunk`-sized preads from 0 to `size` (like dd bs=4M)."""
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            got = len(os.pread(fd, min(chunk, size - off), off))
            if not got:
                raise OSError(f"{path}: short read at {off}")
            off += got
    finally:
        os.close(fd)
    return size / (time.perf_counter() - t) / 1e6


def parallel(fn: Callable, items: list, threads: int) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


# ---------------------------------------------------------------- processes and tools


def proc_status_kib(pid: int, field: str) -> int:
    """A `/proc/PID/status` memory field (VmHWM, VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def tool_version(*cmd: str) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (res.stdout or res.stderr).strip().splitlines()
    return text[0] if text else None


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def tests_running() -> bool:
    """True when a pytest runs on this machine (other people's suites share the CPUs)."""
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if re.search(rb"\bpytest\b", cmd):
                return True
    return False
