"""Read-ahead: when reads of a volume or a snapshot go forward block after block, fetch the
next blocks from the store before they are asked for, several at a time.

A cold read otherwise pays one store round trip per block, one after the other (the kernel
sends a FUSE read of one block and waits for it). Blocks ahead are fetched in batches of up
to 1 MiB: the engine turns a batch into ranged GETs of whole runs of a pack (blocks written
together lie together), `limit` batches at a time.
"""

import logging
from collections.abc import Awaitable, Callable, Hashable

import trio

log = logging.getLogger("snapfs.readahead")

Fetch = Callable[[list[int]], Awaitable[object]]
BATCH_BYTES = 1 << 20


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
        todo = [b for b in range(max(ahead, last) + 1, end + 1) if wanted(b)]
        per = max(1, BATCH_BYTES // block_size)
        for i in range(0, len(todo), per):
            self.nursery.start_soon(self._one, fetch, todo[i : i + per])
        self.issued += len(todo)
        self._streams[key] = (last, max(ahead, end))

    def forget(self, key: Hashable) -> None:
        self._streams.pop(key, None)

    async def _one(self, fetch: Fetch, blocks: list[int]) -> None:
        async with self.limiter:
            try:
                await fetch(blocks)
            except Exception as exc:  # the reader's own fetch will retry and report
                log.debug("read-ahead of blocks %d-%d failed: %s", blocks[0], blocks[-1], exc)
