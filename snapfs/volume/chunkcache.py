"""The chunk cache of snapshot reads: a small LRU of chunks by id, within a byte limit.

owns: the chunks that snapshot reads and their read-ahead fetched (verified, by chunk
id), their byte count and their LRU order. does not own: fetching them (DataPath's
`_snap_chunk` and `_prefetch_snap`, with `InFlight` sharing concurrent fetches), the cached
blocks of volumes (their cache files and `CacheSpace`), nor what a snapshot maps.
"""

from collections import OrderedDict


class ChunkCache:
    """Chunks by id, least recently used first; `bytes` stays within `limit` except when a
    single chunk is larger."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, oid: bytes) -> bytes | None:
        """The chunk, now the most recently used, or None."""
        data = self._chunks.get(oid)
        if data is not None:
            self._chunks.move_to_end(oid)
        return data

    def put(self, oid: bytes, data: bytes) -> None:
        """Keep `data` as the most recently used; evict the least recently used beyond the
        limit (never the last chunk)."""
        old = self._chunks.pop(oid, None)
        if old is not None:
            self.bytes -= len(old)
        self._chunks[oid] = data
        self.bytes += len(data)
        while self.bytes > self.limit and len(self._chunks) > 1:
            self.bytes -= len(self._chunks.popitem(last=False)[1])

    def clear(self) -> None:
        self._chunks.clear()
        self.bytes = 0

    def check(self) -> list[str]:
        """Its invariants, as findings: it counts its chunks' bytes, within its limit."""
        found = []
        held = sum(map(len, self._chunks.values()))
        if self.bytes != held:
            found.append(f"chunk cache: counts {self.bytes} bytes, its chunks hold {held}")
        if held > self.limit and len(self._chunks) > 1:
            found.append(f"chunk cache: {held} bytes, over its limit of {self.limit}")
        return found

    def assert_invariants(self) -> None:
        found = self.check()
        assert not found, "; ".join(found)
