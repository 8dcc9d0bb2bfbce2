"""In-memory store for fast unit tests only; never in place of the real path."""

import trio

from snapfs.errors import AlreadyExists, ObjectNotFound
from snapfs.store.base import Store, check_key


class MemoryStore(Store):
    def __init__(self) -> None:
        self.url = "memory://"
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.bytes_put = 0

    async def put(self, key: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.objects[check_key(key)] = bytes(data)
        self.puts += 1
        self.bytes_put += len(data)

    async def put_new(self, key: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        old = self.objects.get(check_key(key))
        if old is not None and old != data:
            raise AlreadyExists(f"{self.url}{key}: already written by another writer")
        self.objects[key] = bytes(data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        try:
            data = self.objects[check_key(key)]
        except KeyError:
            raise ObjectNotFound(f"{self.url}{key}: not found") from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    async def head(self, key: str) -> int | None:
        await trio.lowlevel.checkpoint()
        data = self.objects.get(check_key(key))
        return None if data is None else len(data)

    async def delete(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        self.objects.pop(check_key(key), None)

    async def list(self, prefix: str = "") -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(k for k in self.objects if k.startswith(prefix))
