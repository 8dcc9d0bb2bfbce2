"""Fetches under way, by key: readers of a key that is being fetched wait for that fetch
instead of starting their own (a volume's blocks, a snapshot's chunks)."""

import contextlib
from collections.abc import Hashable, Iterable, Iterator

import trio


class InFlight:
    def __init__(self) -> None:
        self._events: dict[Hashable, trio.Event] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._events

    async def wait(self, key: Hashable) -> bool:
        """Wait for the fetch of `key` if one is under way; return whether there was one
        (then look again: the fetch may have filled the cache, or failed)."""
        event = self._events.get(key)
        if event is None:
            return False
        await event.wait()
        return True

    @contextlib.contextmanager
    def claim(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """Mark `keys` as being fetched for the duration of the block; waiters wake at its
        end, whether the fetch succeeded or not. The keys must not be claimed already."""
        events = {key: trio.Event() for key in keys}
        assert not any(key in self._events for key in events), "a key claimed twice"
        self._events.update(events)
        try:
            yield
        finally:
            for key, event in events.items():
                del self._events[key]
                event.set()
