"""pytest plugin: one real loopback OpenStack Swift (scripts/swift-saio) per test session.

`swift_env` starts it on first use and stops it when the session ends, whatever happened.
A Swift that fails to start is an error of every test that needs it, never a silent skip;
only SNAPFS_NO_SWIFT=1 skips them. SNAPFS_SWIFT_DIR=/path reuses (and leaves running) a
Swift already started there with `scripts/swift-saio start /path`, for quick local loops.

While the session runs, ST_AUTH/ST_USER/ST_KEY are set in os.environ, so
`open_store("swift://...")` works as it does for a user.
"""

import os
import subprocess
import uuid
from pathlib import Path

import pytest

SAIO = Path(__file__).resolve().parent.parent / "scripts" / "swift-saio"
CREDENTIALS = ("ST_AUTH", "ST_USER", "ST_KEY")


def _saio(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SAIO), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
    return env


@pytest.fixture(scope="session")
def swift_env(tmp_path_factory):
    """{"ST_AUTH", "ST_USER", "ST_KEY", "port", "new_container_url", "dir"}:
    `new_container_url(prefix="")` returns a fresh `swift://127.0.0.1:PORT/<unique>[/prefix]`
    (the container is not created); `dir` is the swift-saio directory."""
    if os.environ.get("SNAPFS_NO_SWIFT") == "1":
        pytest.skip("SNAPFS_NO_SWIFT=1: tests that need a real Swift are skipped")
    given = os.environ.get("SNAPFS_SWIFT_DIR")
    saio_dir = str(given or tmp_path_factory.mktemp("swift-saio"))
    ours = not (given and _saio("status", saio_dir, timeout=60).returncode == 0)
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    try:
        started = _saio("start", saio_dir, timeout=900)  # a first start installs Swift
        if started.returncode != 0:
            tail = "\n".join(started.stderr.splitlines()[-40:])
            pytest.fail(
                f"scripts/swift-saio start {saio_dir} failed (exit {started.returncode}); "
                f"set SNAPFS_NO_SWIFT=1 to skip the Swift tests\n{tail}",
                pytrace=False,
            )
        env = _parse_exports(started.stdout)
        missing = [name for name in CREDENTIALS if name not in env]
        if missing:
            pytest.fail(f"swift-saio start printed no {missing}: {started.stdout!r}", pytrace=False)
        port = int(env["ST_AUTH"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        os.environ.update(env)

        def new_container_url(prefix: str = "") -> str:
            url = f"swift://127.0.0.1:{port}/snapfs-test-{uuid.uuid4().hex[:12]}"
            return f"{url}/{prefix}" if prefix else url

        yield {**env, "port": port, "new_container_url": new_container_url, "dir": saio_dir}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if ours:
            stopped = _saio("stop", saio_dir, timeout=120)
            if stopped.returncode != 0:
                print(f"swift-saio stop {saio_dir} failed: {stopped.stderr.strip()}")
