"""The contract every object store fulfils.

Keys are '/'-separated ASCII paths of [A-Za-z0-9._-] parts, never '..'. Values are bytes.
Objects are written whole and, by convention of the layers above, never modified: a key is
either absent or holds its final bytes. `barrier()` makes every put that returned before it
durable; the layers above call it before they publish anything that points at those objects.
"""

import functools
import re
from abc import ABC, abstractmethod

from snapfs.errors import AlreadyExists, InvalidArgument
from snapfs.tasks import run_all

_KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


Ranges = list[tuple[str, int, int]]  # (key, offset, length)
Bodies = list[bytes]


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or len(key) > 512:
        raise InvalidArgument(f"invalid store key {key[:80]!r}")
    return key


class Store(ABC):
    """Async object store. Methods are checkpoints; on cancellation a put may or may not have
    happened (the key then holds either nothing or the whole value, never a part)."""

    url: str  # a description without credentials, safe to log

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Whole object, or `length` bytes from `offset`. Raises ObjectNotFound."""

    @abstractmethod
    async def head(self, key: str) -> int | None:
        """Size of the object, or None when absent."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; absent is not an error."""

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Every key starting with `prefix`, sorted."""

    async def get_ranges(self, ranges: Ranges) -> Bodies:
        """`get(key, offset, length)` for each (key, offset, length), in order; by default
        all at once (a store bounds its own concurrency). Raises ObjectNotFound."""
        out: Bodies = [b""] * len(ranges)

        async def one(i: int) -> None:
            out[i] = await self.get(*ranges[i])

        await run_all([functools.partial(one, i) for i in range(len(ranges))], len(ranges) or 1)
        return out

    async def put_new(self, key: str, data: bytes) -> None:
        """Put only if `key` is absent (or already holds exactly `data`, as after a retried
        put); else raise AlreadyExists. Stores override this with an atomic check."""
        if await self.head(key) is not None:
            if await self.get(key) != data:
                raise AlreadyExists(f"{self.url}/{key}: already written by another writer")
            return
        await self.put(key, data)

    async def barrier(self) -> None:  # noqa: B027 - most stores are durable on put
        """Return once every put that completed before the call is durable."""

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""
