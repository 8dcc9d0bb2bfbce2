"""What the kernel caches of the namespace, and making it forget what is no longer true.

The kernel keeps each name it was told (a dentry: parent inode + name → inode) for the
entry timeout, and each inode's attributes for the attribute timeout. Names change behind
its back when a ctl command creates, deletes or renames a volume or snapshot, rolls back or
resizes, or when a read-only mount follows the writer: without a word from us, a deleted
volume's name would still lead to its dead inode (ENOENT on open) and a deleted name would
still exist (stat succeeds) until the timeout ran out.

`KernelView` remembers what the kernel was told (lookups, readdir, getattr replies) and,
asked after such a change, compares it with the namespace as it is now: it returns the
entries and inodes that went stale (`Stale`) and forgets them. `notify` tells the kernel;
it blocks until the kernel has dropped them, so it runs in a worker thread (the loop keeps
answering the lookups the kernel may wait for meanwhile), and the caller answers its ctl
command only after that: whoever reads the reply sees the new namespace.

owns: the record of what was told, the comparison and the notifications. does not own:
what the namespace is (fuse/ops.py computes it) nor when to compare (ops.update_kernel).
"""

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

log = logging.getLogger("snapfs.fuse")

Fingerprint = tuple[int, ...]


def fingerprint(attrs: pyfuse3.EntryAttributes) -> Fingerprint:
    """The attributes whose change the kernel must learn of (size after a resize or a
    rollback, allocation, owner, times)."""
    return (
        attrs.st_size,
        attrs.st_blocks,
        attrs.st_mode,
        attrs.st_uid,
        attrs.st_ctime_ns,
        attrs.st_mtime_ns,
    )


@dataclass(frozen=True)
class Stale:
    """Kernel caches to drop: entries (parent inode, name) and inodes' attributes."""

    entries: list[tuple[int, bytes]] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entries or self.inodes)


class KernelView:
    """The entries and attributes the kernel was told and may still cache. Plain methods,
    no await: a comparison sees one state of the namespace."""

    def __init__(self) -> None:
        self._entries: dict[int, dict[bytes, int]] = {}  # parent → name → inode
        self._attrs: dict[int, Fingerprint] = {}

    def told_entry(self, parent: int, name: bytes, ino: int) -> None:
        self._entries.setdefault(parent, {})[name] = ino

    def told_attrs(self, ino: int, attrs: pyfuse3.EntryAttributes) -> None:
        self._attrs[ino] = fingerprint(attrs)

    def stale(
        self,
        children: Callable[[int], dict[bytes, int]],
        attrs: Callable[[int], Fingerprint | None],
    ) -> Stale:
        """What the kernel was told that is no longer so: an entry whose name is gone or
        leads to another inode now (`children(parent)`: name → inode as it is now), an
        inode that is gone or whose attributes changed (`attrs(ino)`, None when gone).
        Forgets them: the kernel asks again, and what it is told then is recorded again."""
        out = Stale()
        for parent, told in self._entries.items():
            now = children(parent)
            gone = [name for name, ino in told.items() if now.get(name) != ino]
            for name in gone:
                del told[name]
            out.entries.extend((parent, name) for name in gone)
        for parent in [p for p, told in self._entries.items() if not told]:
            del self._entries[parent]
        for ino, told_fp in list(self._attrs.items()):
            if attrs(ino) != told_fp:
                del self._attrs[ino]
                out.inodes.append(ino)
        return out


def notify(stale: Stale) -> None:
    """Tell the kernel to drop `stale`. Blocks until it has (an entry waits for lookups in
    its directory to finish): call it from a worker thread, never from the loop that answers
    those lookups. Never raises: an entry or inode the kernel had dropped already (ENOENT)
    is fine, any other error is logged and the timeout bounds how long that cache stays."""
    for parent, name in stale.entries:
        _tell(pyfuse3.invalidate_entry, parent, name)
    for ino in stale.inodes:
        _tell(pyfuse3.invalidate_inode, ino, True)  # attributes only: no page cache to drop


def _tell(call: Callable, *args) -> None:
    try:
        call(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel had forgotten it already
            log.warning("%s%r failed: %s", call.__name__, args, exc)
