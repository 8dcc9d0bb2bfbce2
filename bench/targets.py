"""What the benchmark mounts and starts: snapfs (through its CLI and ctl file), the pyfuse3
pass-through, s3backer --test and a loopback Swift. Each registers its teardown with a
`Cleanup` before it can leave anything behind."""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from bench.sysutil import (
    PY,
    ROOT,
    Cleanup,
    CommandError,
    force_unmount,
    mounted,
    sh,
    stop_process,
    wait_for,
    wait_pid_gone,
)
from snapfs import ctlclient

SNAPFS = [PY, "-m", "snapfs.cli"]


class Snapfs:
    """One store and one mount of it, driven like a user drives it."""

    def __init__(self, cleanup: Cleanup, root: Path, store_url: str | None = None) -> None:
        self.cleanup = cleanup
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.store_url = store_url or f"file://{root / 'store'}"
        self.mnt = root / "mnt"
        self.cache_dir = root / "cache"
        self.pid: int | None = None

    @property
    def store_dir(self) -> Path | None:
        return (
            Path(self.store_url[len("file://") :]) if self.store_url.startswith("file://") else None
        )

    def cli(self, *args, mount: bool = True, timeout: float = 600) -> str:
        cmd = [*SNAPFS, *(["--mount", self.mnt] if mount else []), *args]
        return sh(*cmd, timeout=timeout).stdout

    def init(self) -> "Snapfs":
        self.cli("init", self.store_url, mount=False)
        return self

    def mount(self, cache_dir: Path | None = None, cache_size: str = "4G") -> "Snapfs":
        if cache_dir is not None:
            self.cache_dir = cache_dir
        self.mnt.mkdir(parents=True, exist_ok=True)
        mnt = self.mnt
        self.cleanup.push(f"snapfs on {mnt}", lambda: self._stop(mnt))
        self.cli(
            "mount",
            self.store_url,
            mnt,
            "--cache-dir",
            self.cache_dir,
            "--cache-size",
            cache_size,
            mount=False,
        )
        self.pid = self.ctl("status")["pid"]
        return self

    def umount(self) -> None:
        self._stop(self.mnt)

    def _stop(self, mnt: Path) -> None:
        pid, self.pid = self.pid, None
        if mounted(mnt):
            with contextlib.suppress(CommandError):
                sh(*SNAPFS, "umount", mnt, timeout=600)
        force_unmount(mnt)
        if pid is not None and not wait_pid_gone(pid, 60):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            wait_pid_gone(pid, 10)

    def ctl(self, line: str):
        """One command through the ctl file (what the CLI does, without a Python start)."""
        try:
            return ctlclient.ctl(str(self.mnt), line)
        except ctlclient.CliError as exc:
            raise CommandError(f"snapfs {line}: {exc}") from None

    def stats(self) -> dict:
        return self.ctl("stats")

    def vol(self, name: str) -> Path:
        return self.mnt / "volumes" / name

    def snap(self, vol: str, name: str) -> Path:
        return self.mnt / "snapshots" / vol / name


class Passthrough:
    """bench/passthrough.py: one file `disk` passing pread/pwrite to a local file."""

    def __init__(self, cleanup: Cleanup, backing: Path, mnt: Path, direct_io: bool = False) -> None:
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt
        flags = ["--direct-io"] if direct_io else []
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "bench" / "passthrough.py"), str(backing), str(mnt), *flags],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # Ctrl-C: we stop it, in order
        cleanup.push(f"pass-through on {mnt}", self.stop)
        wait_for(lambda: mounted(mnt) or self.proc.poll() is not None, 30, "the pass-through mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"pass-through daemon exited ({self.proc.returncode})")
        self.file = mnt / "disk"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if mounted(self.mnt):
            sh("fusermount3", "-u", self.mnt, check=False)
        force_unmount(self.mnt)
        if self.proc.poll() is None:
            self.proc.terminate()
        stop_process(self.proc, grace=30)


class S3backer:
    """s3backer in its local --test mode: blocks are files in a directory. Its test mode
    sleeps a random 0-199 ms in every block read and write from/to that directory (a
    simulated network, hard-coded in test_io.c); the block cache (on, sized to hold the
    whole volume) hides it for cached blocks. --listBlocks tells it which blocks exist, so
    it never 'downloads' a block never written. Two features are off because, with the
    whole volume cached, they make reads crawl at ~5 MB/s through the simulated network: the
    MD5 cache (a guard against eventually consistent S3; it holds back rewrites of a block)
    and read-ahead (s3backer 1.5.4: after a few sequential passes, reads go to the
    directory with the random delay although the blocks are cached). `-o big_writes`: without
    it its FUSE (2.x) writes come 4 KiB at a time, each a read-modify-write of a block."""

    def __init__(
        self, cleanup: Cleanup, root: Path, size: int, block_size: int, cache_blocks: int
    ) -> None:
        exe = shutil.which("s3backer")
        if exe is None:
            raise FileNotFoundError("s3backer is not installed (apt-get install s3backer)")
        self.dir = root / "s3b-blocks"
        self.mnt = root / "s3b-mnt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log = root / "s3backer.log"
        self.args = [
            "--test",
            f"--blockSize={block_size}",
            f"--size={size}",
            f"--blockCacheSize={cache_blocks}",
            "--listBlocks",
            "--md5CacheSize=0",
            "--md5CacheTime=0",
            "--minWriteDelay=0",
            "--readAhead=0",
            "-o",
            f"big_writes,max_write={min(block_size, 128 << 10)}",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "-f", *self.args, str(self.dir), str(self.mnt)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        cleanup.push(f"s3backer on {self.mnt}", self.stop)
        wait_for(
            lambda: mounted(self.mnt) or self.proc.poll() is not None, 60, "the s3backer mount"
        )
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"s3backer exited ({self.proc.returncode}): {' / '.join(tail)}")
        self.file = self.mnt / "file"

    def stop(self) -> None:
        # Its clean unmount writes back every dirty block with the test-mode delays (minutes
        # for a full cache); the data is throw-away, so kill it and unmount the dead mount.
        if self.proc.poll() is None:
            self.proc.kill()
        stop_process(self.proc, grace=30)
        force_unmount(self.mnt)


class SwiftSaio:
    """A loopback OpenStack Swift (scripts/swift-saio), credentials put in os.environ."""

    CREDENTIALS = ("ST_AUTH", "ST_USER", "ST_KEY")

    def __init__(self, cleanup: Cleanup, root: Path) -> None:
        self.dir = root / "swift-saio"
        self.script = ROOT / "scripts" / "swift-saio"
        self.saved = {k: os.environ.get(k) for k in self.CREDENTIALS}
        cleanup.push("swift-saio", self.stop)
        out = sh(self.script, "start", self.dir, timeout=900).stdout
        env = {}
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = value.strip("'\"")
        missing = [k for k in self.CREDENTIALS if k not in env]
        if missing:
            raise RuntimeError(f"swift-saio start printed no {missing}")
        os.environ.update(env)
        self.env = env
        self.port = int(env["ST_AUTH"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        self._n = 0

    def new_url(self, what: str) -> str:
        self._n += 1
        return f"swift://127.0.0.1:{self.port}/bench-{what}-{os.getpid()}-{self._n}"

    def stop(self) -> None:
        try:
            sh(self.script, "stop", self.dir, timeout=180)
        finally:
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
