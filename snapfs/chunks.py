"""Content-addressed objects on top of a store.

An object's id is the blake3 digest (32 bytes) of its plain bytes. Two kinds share the scheme:
data blocks (`c/`) and tree nodes (`n/`). The stored bytes are one codec byte followed by the
payload; codec 0 is plain (compression and encryption slot in here as further codecs). Every
read is verified against its digest: a mismatch is an IntegrityError that names the object.

    key  = KIND "/" hex[0:2] "/" hex          e.g. c/3f/3f9a…
    body = codec:u8 payload
"""

import blake3
import trio

from snapfs.errors import IntegrityError
from snapfs.store.base import Store

CHUNK = "c"
NODE = "n"
_PLAIN = b"\x00"


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def object_key(kind: str, oid: bytes) -> str:
    h = oid.hex()
    return f"{kind}/{h[:2]}/{h}"


class ChunkStore:
    """put(kind, bytes) → id and get(kind, id) → verified bytes. Hashing large blocks runs in
    a worker thread so the event loop stays responsive."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def hash(self, data: bytes) -> bytes:
        if len(data) >= 16384:
            return await trio.to_thread.run_sync(digest, data)
        return digest(data)

    async def put(self, kind: str, oid: bytes, data: bytes) -> int:
        """Store `data` under its (already computed) id; returns the stored size."""
        body = _PLAIN + data
        await self.store.put(object_key(kind, oid), body)
        return len(body)

    async def get(self, kind: str, oid: bytes) -> bytes:
        key = object_key(kind, oid)
        body = await self.store.get(key)
        if body[:1] != _PLAIN:
            raise IntegrityError(f"{self.store.url}/{key}: unknown codec {body[:1].hex()}")
        data = body[1:]
        if await self.hash(data) != oid:
            raise IntegrityError(f"{self.store.url}/{key}: content does not match its digest")
        return data

    async def delete(self, kind: str, oid: bytes) -> None:
        await self.store.delete(object_key(kind, oid))
