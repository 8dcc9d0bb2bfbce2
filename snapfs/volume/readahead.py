"""Read-ahead: when reads of a volume or a snapshot go forward block after block, fetch the
next blocks from the store before they are asked for, several at a time.

A cold read otherwise pays one store round trip per block, one after the other (the kernel
sends a FUSE read of one block and waits for it). With the next `window` blocks already on
their way, `limit` GETs run at once and the reader finds most blocks in the cache.
"""

import logging
from collections.abc import Awaitable, Callable, Hashable

import trio

log = logging.getLogger("snapfs.readahead")

Fetch = Callable[[int], Awaitable[object]]


class ReadAhead:
    def __init__(self, window_bytes: int, limit: int) -> None:
        self.window_bytes = window_bytes  # how far ahead of the reader (0: off)
        self.limiter = trio.CapacityLimiter(max(1, limit))
        self.nursery: trio.Nursery | None = None
        self._streams: dict[Hashable, tuple[int, int]] = {}  # key → (last read, fetched to)
        self.issued = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task that owns the prefetches; without it, read-ahead is off."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.nursery = None

    def note(
        self,
        key: Hashable,
        first: int,
        last: int,
        block_size: int,
        nblocks: int,
        fetch: Fetch,
        wanted: Callable[[int], bool] = lambda _blk: True,
    ) -> None:
        """A read of blocks first..last of stream `key` (which has `nblocks`). When it goes
        on from the previous read, keep the next `window_bytes` on their way (the blocks
        that are `wanted`: not cached yet)."""
        prev, ahead = self._streams.get(key, (-2, -1))
        window = max(2, min(256, self.window_bytes // block_size))
        if self.nursery is None or not self.window_bytes or not 0 <= first - prev <= 2:
            self._streams[key] = (last, last)  # random access: nothing ahead
            return
        if ahead - last > window // 2:  # enough on the way: fetch in batches
            self._streams[key] = (last, ahead)
            return
        end = min(last + window, nblocks - 1)
        for blk in range(max(ahead, last) + 1, end + 1):
            if wanted(blk):
                self.nursery.start_soon(self._one, fetch, blk)
                self.issued += 1
        self._streams[key] = (last, max(ahead, end))

    def forget(self, key: Hashable) -> None:
        self._streams.pop(key, None)

    async def _one(self, fetch: Fetch, blk: int) -> None:
        async with self.limiter:
            try:
                await fetch(blk)
            except Exception as exc:  # the reader's own fetch will retry and report
                log.debug("read-ahead of block %d failed: %s", blk, exc)
