"""Bad input gets one clear line and a non-zero exit or an errno; the daemon stays up and
nothing is lost."""

import errno
import json
import os

import pytest

from tests.conftest import SNAPFS, Snapfs, run

pytestmark = pytest.mark.fuse


def one_line_error(res) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("snapfs: ")
    return lines[0]


def ctl_raw(fs: Snapfs, payload: bytes) -> tuple[int, dict | None]:
    fd = os.open(fs.mnt / ".snapfs" / "ctl", os.O_RDWR)
    try:
        try:
            os.write(fd, payload)
            err = 0
        except OSError as exc:
            err = exc.errno
        raw = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
    return err, json.loads(raw) if raw else None


@pytest.fixture
def fs(snapfs: Snapfs) -> Snapfs:
    snapfs.cli("volume", "create", "good", "--size", "16M")
    with open(snapfs.vol("good"), "r+b") as f:
        f.write(b"precious" * 1000)
    snapfs.cli("snapshot", "create", "good@keep")
    return snapfs


BAD_SNAPSHOT_NAMES = ["a/b", "..", "../x", "", "x" * 300, ".hidden", "-flag", "sp ace", "é"]


@pytest.mark.parametrize("name", BAD_SNAPSHOT_NAMES)
def test_bad_snapshot_names(fs: Snapfs, name: str):
    line = one_line_error(fs.cli("snapshot", "create", f"good@{name}", check=False))
    assert "snapshot" in line or "usage" in line or "invalid" in line
    with pytest.raises(OSError) as info:
        os.setxattr(fs.vol("good"), "user.snapfs.snapshot", name.encode())
    assert info.value.errno in (errno.EINVAL, errno.ERANGE, errno.E2BIG)


def test_nul_and_garbage_on_ctl(fs: Snapfs):
    for payload in (
        b"snapshot create good@a\x00b\n",
        b"\xff\xfe garbage\n",
        b"frobnicate\n",
        b"snapshot create\n",
        b"volume create x --size\n",
        b"'unclosed\n",
    ):
        err, reply = ctl_raw(fs, payload)
        assert err == errno.EINVAL, payload
        assert reply is not None and reply["ok"] is False and reply["error"], payload
    err, reply = ctl_raw(fs, b"x" * (1 << 20) + b"\n")
    assert err == errno.EINVAL
    assert "longer than" in reply["error"]


def test_duplicates_and_missing(fs: Snapfs):
    assert "already exists" in one_line_error(
        fs.cli("snapshot", "create", "good@keep", check=False)
    )
    with pytest.raises(OSError) as info:
        os.setxattr(fs.vol("good"), "user.snapfs.snapshot", b"keep")
    assert info.value.errno == errno.EEXIST
    assert "already exists" in one_line_error(
        fs.cli("volume", "create", "good", "--size", "1M", check=False)
    )
    assert "not found" in one_line_error(fs.cli("snapshot", "delete", "good@nope", check=False))
    assert "not found" in one_line_error(fs.cli("snapshot", "create", "nope@x", check=False))


@pytest.mark.parametrize("size", ["0", "-1", "1Q", "", "12.5G", "100P", "513"])
def test_bad_sizes(fs: Snapfs, size: str):
    one_line_error(fs.cli("volume", "create", "v", "--size", size, check=False))
    one_line_error(fs.cli("volume", "resize", "good", "--size", size, check=False))


def test_bad_xattrs(fs: Snapfs):
    with pytest.raises(OSError) as info:
        os.getxattr(fs.vol("good"), "user.snapfs.nope")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.setxattr(fs.vol("good"), "user.snapfs.nope", b"x")
    assert info.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as info:
        os.setxattr(fs.vol("good"), "user.snapfs.snapshot", b"y" * 4000)
    assert info.value.errno == errno.EINVAL


def test_bad_mounts_and_urls(fs: Snapfs, workdir):
    one_line_error(
        run([*SNAPFS, "mount", fs.store_url, str(workdir / "does-not-exist")], check=False)
    )
    line = one_line_error(
        run(
            [*SNAPFS, "mount", fs.store_url, str(fs.mnt), "--cache-dir", str(workdir / "other")],
            check=False,
        )
    )
    assert "already" in line
    other = workdir / "mnt2"
    other.mkdir()
    for opts in (
        ["--flush-delay", "0"],
        ["--flush-delay", "nan"],
        ["--flush-delay", "soon"],
        ["--flush-max-age", "-1"],
        ["--flush-delay", "60", "--flush-max-age", "10"],
        ["--cache-size", "0"],
    ):
        cmd = [*SNAPFS, "mount", fs.store_url, str(other), "--cache-dir", str(workdir / "c2")]
        one_line_error(run([*cmd, *opts], check=False))
    for url in ("ftp://x/y", "file://relative", "swift://user:secret@h:1/c", "nonsense"):
        res = run([*SNAPFS, "init", url], check=False)
        assert "secret" not in one_line_error(res)
    one_line_error(run([*SNAPFS, "init", fs.store_url], check=False))  # already a store
    one_line_error(run([*SNAPFS, "--mount", str(workdir), "stats"], check=False))
    one_line_error(run([*SNAPFS, "bogus", "command"], check=False))


def test_daemon_survives_everything(fs: Snapfs):
    test_nul_and_garbage_on_ctl(fs)
    test_bad_xattrs(fs)
    for name in BAD_SNAPSHOT_NAMES:
        fs.cli("snapshot", "create", f"good@{name}", check=False)
    status = fs.cli_json("status")
    assert status["pid"] == fs.pid
    assert (status["flush_delay"], status["flush_max_age"]) == (5.0, 30.0)  # the defaults
    with open(fs.vol("good"), "rb") as f:
        assert f.read(8000) == b"precious" * 1000
    with open(fs.snap("good", "keep"), "rb") as f:
        assert f.read(8000) == b"precious" * 1000
    with pytest.raises(OSError) as info:
        os.close(os.open(fs.snap("good", "keep"), os.O_RDWR))
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (fs.mnt / "volumes" / "newfile").write_bytes(b"x")
    assert fs.cli_json("fsck")["clean"]
