"""scripts/test-cleanup: what a killed run leaves in its root (a daemon stopped under its
mount, a loop device over one of its volumes, ext4 mounted on that) hangs every later
`losetup`, `df` and `rm -rf`; after the cleanup each of them returns. Each test gives the
script a root of its own, never the running suite's."""

import contextlib
import fcntl
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT, Cleanup, Snapfs, run, suite_root

pytestmark = pytest.mark.fuse

CLEANUP = CHECKOUT / "scripts" / "test-cleanup"


def run_cleanup(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLEANUP), str(root)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
        check=False,
    )


@dataclass
class Leftover:
    root: Path
    stack: Cleanup = field(default_factory=Cleanup)
    pids: list[int] = field(default_factory=list)
    stuck: list[subprocess.Popen] = field(default_factory=list)

    def returns_within(self, cmd: list[str], seconds: float) -> bool:
        """Whether cmd returns within `seconds`. One that does not is killed, and reaped only
        at teardown: a process waiting on a FUSE request its daemon has read cannot die
        before the connection is aborted."""
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.stuck.append(proc)
            return False
        return True


@pytest.fixture
def left(workdir: Path) -> Leftover:
    """A private root, cleared afterwards whatever happened: by the script, then, as a last
    resort, by ending the daemons (which aborts their connections) and the usual teardown."""
    state = Leftover(workdir / "left")
    yield state
    run_cleanup(state.root)
    for pid in state.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    state.stack.run()
    for proc in state.stuck:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def mounts_under(root: Path) -> list[str]:
    """From /proc/self/mountinfo's text: nothing here stats a path."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def loops_over(root: Path) -> list[str]:
    """Loop devices whose backing file is in root, from sysfs (`losetup` stats the files)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(f"{root}/"):
                found.append(backing.parts[3])
    return found


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stopped_daemon_with_a_loop_device_and_ext4_on_top_is_cleared(left: Leftover):
    root = left.root
    fs = Snapfs(root, left.stack)
    fs.init()
    fs.mount()
    assert fs.pid is not None
    left.pids.append(fs.pid)
    fs.cli("volume", "create", "v", "--size", "64M")
    dev = fs.losetup(fs.vol("v"))
    run(["mkfs.ext4", "-q", dev])
    ext = fs.mount_fs(dev, root / "ext4")
    (ext / "data").write_bytes(os.urandom(1 << 20))  # dirty, for the unmount to write
    os.kill(fs.pid, signal.SIGSTOP)  # as a takeover test does; then the run is killed
    assert not left.returns_within(["df", str(fs.mnt)], 3), "the stopped daemon's mount answers"

    res = run_cleanup(root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert all(line.startswith("cleanup: ") for line in lines), lines
    said = iter(lines)  # in this order
    for start in (
        "cleanup: aborted fuse connection ",
        f"cleanup: ended pid {fs.pid} (it was stopped): ",
        f"cleanup: unmounted {ext} (ext4)",
        f"cleanup: detached {dev} ({fs.vol('v')})",
        f"cleanup: unmounted {fs.mnt} (fuse.snapfs)",
        f"cleanup: removed {root}",
    ):
        assert any(line.startswith(start) for line in said), (start, lines)
    assert f"({fs.mnt})" in lines[0]

    for cmd in (["losetup", "-a"], ["df"], ["rm", "-rf", str(root)]):
        assert left.returns_within(cmd, 30), (
            f"`{' '.join(cmd)}` hangs after the cleanup (nothing of this test's is left: "
            "/work/shared/tools/machine-doctor lists what else on this machine may hang it)"
        )
    assert not root.exists()
    assert mounts_under(root) == []
    assert loops_over(root) == []
    assert gone(fs.pid)


def test_the_cleanup_says_nothing_when_nothing_was_left(workdir: Path):
    res = run_cleanup(workdir / "never-made")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    plain = workdir / "plain"  # an earlier run that ended well: pytest empties its root
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "file").write_text("kept")
    res = run_cleanup(plain)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert (plain / "sub" / "file").read_text() == "kept"


def test_the_cleanup_leaves_a_root_alone_while_a_run_holds_its_lock(workdir: Path):
    root = workdir / "busy"
    root.mkdir()
    sleeper = subprocess.Popen(["sh", "-c", "sleep 60", f"{root}/x"])  # names a path in root
    try:
        with open(f"{root}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            res = run_cleanup(root)
        assert res.returncode == 1
        assert res.stdout == ""
        assert f"(pid {os.getpid()}) is using {root}" in res.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cleanup_clears_the_root_the_suite_uses(monkeypatch: pytest.MonkeyPatch):
    for env in ({}, {"SNAPFS_TEST_ROOT": "/tmp/elsewhere"}):
        monkeypatch.delenv("SNAPFS_TEST_ROOT", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        printed = run([str(CLEANUP), "--print-root"]).stdout.strip()
        assert Path(printed) == suite_root()
