"""Cache files that can crash: every write that was not fdatasynced is lost.

`SimFiles` is the engine's `Files` for tests and the simulation. Each file keeps, beside the
real file the engine reads and writes, the image that its last `datasync()` made durable;
`crash()` puts every file back to that image, as a power cut would. Size changes count as
durable at once (the engine never relies on them surviving). `pause("datasync", ".frozen")`
stops the next matching sync until released; `hook(op, path)` may delay or fail any sync.
"""

from __future__ import annotations

import inspect
import os

from snapfs.volume.files import BlockFile, Files
from tests.faultstore import Gate


class SimFile(BlockFile):
    def __init__(self, owner: SimFiles, path: str, size: int | None) -> None:
        super().__init__(path, size)
        self.owner = owner
        if path not in owner.images:
            owner.images[path] = self._image()
        elif size is not None:
            owner.resize_image(path, size)

    def _image(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.owner.resize_image(self.path, size)

    async def datasync(self) -> None:
        await self.owner.point("datasync", self.path)
        self.owner.images[self.path] = self._image()
        self.owner.syncs += 1


class SimFiles(Files):
    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}  # path → what survives a crash
        self.rules: list[tuple[str, str, Gate]] = []
        self.hook = None
        self.syncs = 0

    def open(self, path: str, size: int | None = None) -> BlockFile:
        return SimFile(self, path, size)

    def resize_image(self, path: str, size: int) -> None:
        image = self.images.get(path, b"")
        self.images[path] = image[:size] + bytes(max(0, size - len(image)))

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

    def crash(self) -> None:
        """Every file loses what was written since its last datasync."""
        for path, image in self.images.items():
            if not os.path.exists(path):
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, 0)  # holes read as zeros, as in the image
                os.ftruncate(fd, len(image))
                os.pwrite(fd, image, 0)
            finally:
                os.close(fd)

    def forget(self, path: str) -> None:
        self.images.pop(path, None)
