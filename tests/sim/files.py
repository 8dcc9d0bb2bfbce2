"""Cache files that can crash: what was not fdatasynced is lost, or survives in part.

`SimFiles` is the engine's `Files` for tests and the simulation. Each file keeps an undo
log of the 512-byte sectors written (or punched) since its last `datasync()`: their content
as that sync left it. `crash()` puts those sectors back, as a power cut would; with `torn`
(a random.Random), each such sector keeps its new content or goes back at random (a write
not yet synced may survive in part, a sector at a time). Size changes count as durable at
once (the engine never relies on them surviving).

`freeze(prefix)` is the crash instant: from then on every write, punch, truncate and sync
of a file under `prefix` is dropped, so that code the cancellation runs afterwards (a
`finally` block) cannot change what survives. `crash()` thaws them.

`pause("datasync", ".frozen")` stops the next matching sync until released; `hook(op,
path)` may delay or fail any sync.
"""

from __future__ import annotations

import inspect
import os
import random

from snapfs.volume.files import BlockFile, Files
from tests.faultstore import Gate

SECTOR = 512


class SimFile(BlockFile):
    def __init__(self, owner: SimFiles, path: str, size: int | None) -> None:
        new = not os.path.exists(path)
        super().__init__(path, size)
        self.owner = owner
        if new or path not in owner.undo:
            owner.undo[path] = {}

    def _frozen(self) -> bool:
        return self.owner.frozen is not None and self.path.startswith(self.owner.frozen)

    def _save(self, offset: int, length: int) -> None:
        """Keep the synced content of every sector in the range before it changes."""
        undo = self.owner.undo.setdefault(self.path, {})
        size = os.fstat(self.fd).st_size
        for sector in range(offset // SECTOR, -(-(offset + length) // SECTOR)):
            if sector not in undo and sector * SECTOR < size:
                undo[sector] = os.pread(self.fd, SECTOR, sector * SECTOR)

    def pwrite(self, data, offset: int) -> None:
        if self._frozen():
            return
        self._save(offset, len(data))
        super().pwrite(data, offset)

    def punch(self, offset: int, length: int) -> None:
        if self._frozen():
            return
        self._save(offset, length)
        super().punch(offset, length)

    def truncate(self, size: int) -> None:
        if self._frozen():
            return
        super().truncate(size)
        undo = self.owner.undo.get(self.path, {})
        for sector in [s for s in undo if s * SECTOR >= size]:
            del undo[sector]

    async def datasync(self) -> None:
        await self.owner.point("datasync", self.path)
        if self.owner.fail_sync is not None and self.owner.fail_sync(self.path):
            raise OSError(5, "injected: fdatasync failed (EIO)", self.path)
        if self._frozen():
            return
        self.owner.undo[self.path] = {}
        self.owner.syncs += 1

    def durable(self, offset: int, length: int) -> bytes:
        """What a crash without tearing would leave in the range."""
        return self.owner.durable(self.path, offset, length)


class SimFiles(Files):
    def __init__(self) -> None:
        self.undo: dict[str, dict[int, bytes]] = {}  # path → sector → content at last sync
        self.rules: list[tuple[str, str, Gate]] = []
        self.hook = None
        self.fail_sync = None  # path -> bool: that datasync raises EIO (after its hook)
        self.syncs = 0
        self.frozen: str | None = None
        self.torn_sectors = 0  # sectors that kept unsynced content at a crash

    def open(self, path: str, size: int | None = None) -> BlockFile:
        return SimFile(self, path, size)

    def pause(self, op: str, suffix: str = "") -> Gate:
        gate = Gate()
        self.rules.append((op, suffix, gate))
        return gate

    async def point(self, op: str, path: str) -> None:
        if self.hook is not None:
            res = self.hook(op, path)
            if inspect.isawaitable(res):
                await res
        for rule in list(self.rules):
            if rule[0] == op and path.endswith(rule[1]):
                self.rules.remove(rule)
                gate = rule[2]
                gate.key = path
                gate.reached.set()
                await gate.go.wait()

    def durable(self, path: str, offset: int, length: int) -> bytes:
        if not os.path.exists(path):
            return b""
        with open(path, "rb") as f:
            f.seek(offset)
            data = bytearray(f.read(length))
        for sector, old in self.undo.get(path, {}).items():
            lo, hi = sector * SECTOR, sector * SECTOR + len(old)
            if hi <= offset or lo >= offset + length:
                continue
            a, b = max(lo, offset), min(hi, offset + length)
            data[a - offset : b - offset] = old[a - lo : b - lo]
        return bytes(data)

    def freeze(self, prefix: str) -> None:
        """The crash instant for the files under `prefix`: nothing changes them any more."""
        self.frozen = prefix

    def crash(self, torn: random.Random | None = None, prefix: str = "") -> None:
        """Every file (under `prefix`) loses what was written since its last datasync, or
        with `torn`, each such sector is lost or kept at random."""
        self.frozen = None
        for path, undo in self.undo.items():
            if not path.startswith(prefix):
                continue
            if undo and os.path.exists(path):
                fd = os.open(path, os.O_RDWR)
                try:
                    size = os.fstat(fd).st_size
                    for sector, old in sorted(undo.items()):
                        if sector * SECTOR >= size:
                            continue
                        if torn is not None and torn.random() < 0.5:
                            self.torn_sectors += 1
                            continue
                        os.pwrite(fd, old, sector * SECTOR)
                finally:
                    os.close(fd)
            self.undo[path] = {}

    def forget(self, path: str) -> None:
        self.undo.pop(path, None)
