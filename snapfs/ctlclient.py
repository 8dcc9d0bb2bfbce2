"""The client side of `.snapfs/ctl`: find a snapfs mount and send its daemon one command.

A command is one line written to the mount's ctl file; the daemon answers with one JSON
document `{"ok": true, "result": ...}` or `{"ok": false, "error": ..., "errno": ...}`
(snapfs/fuse/ops.py). The `snapfs` command (cli.py), export / import (images.py) and send /
receive (sendrecv.py) all talk to the daemon through here; it imports nothing of theirs.
"""

import errno
import json
import os

FSTYPE = "fuse.snapfs"
GONE = (errno.ENOTCONN, errno.ECONNABORTED)


class CliError(Exception):
    """A command-line failure: one line for the user, no traceback (exit 1)."""


class DaemonGone(CliError):
    """The mount is there but its daemon is not (killed): the kernel answers ENOTCONN."""


def snapfs_mounts() -> list[str]:
    """The mount points of every snapfs mount on the machine, in /proc/self/mounts order."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == FSTYPE:
                mounts.append(parts[1].replace("\\040", " "))
    return mounts


def find_mount(explicit: str | None) -> str:
    """The mount to talk to: `explicit` (which must be a snapfs mount), else the one the
    current directory is in, else the only one on the machine; CliError otherwise."""
    mounts = snapfs_mounts()
    if explicit:
        path = os.path.realpath(explicit)
        if path not in mounts:
            raise CliError(f"{explicit} is not a snapfs mount")
        return path
    cwd = os.path.realpath(os.getcwd())
    inside = [m for m in mounts if cwd == m or cwd.startswith(m.rstrip("/") + "/")]
    if inside:
        return max(inside, key=len)
    if not mounts:
        raise CliError("no snapfs mount found: run 'snapfs mount STORE_URL MOUNTPOINT' first")
    if len(mounts) > 1:
        raise CliError(
            f"{len(mounts)} snapfs mounts ({', '.join(mounts)}): choose one with --mount MOUNTPOINT"
        )
    return mounts[0]


def ctl(mount: str, line: str) -> object:
    """Send one command line; return the result or raise CliError with the daemon's reason
    (DaemonGone when the mount's daemon is not running)."""
    path = os.path.join(mount, ".snapfs", "ctl")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        if exc.errno in GONE:
            raise DaemonGone(f"the daemon of {mount} is not running") from None
        raise CliError(f"cannot reach the daemon at {mount}: {exc.strerror}") from None
    try:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as exc:
            if exc.errno in GONE:
                raise DaemonGone(f"the daemon of {mount} is not running") from None
        chunks = []
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return _result(b"".join(chunks))


def _result(raw: bytes) -> object:
    """The result of a reply document, or CliError with its reason."""
    try:
        reply = json.loads(raw or b"null")
    except ValueError:
        raise CliError("the daemon sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise CliError("the daemon sent no reply")
    if not reply.get("ok"):
        raise CliError(reply.get("error", "failed"))
    return reply.get("result")
