"""A store wrapper that tests (and the simulation) use to pause, fail or delay any call.

    store = FaultStore(MemoryStore())
    gate = store.pause("put_new", "catalog/")      # the next matching call stops ...
    ...                                            # ... before it runs (or after, when
    await gate.wait_reached()                      #     after=True: the op happened, the
    gate.release()                                 #     reply has not come back yet)
    store.fail("list", "catalog/")                 # the next matching call raises StoreError
    store.fail("put", "p/", after=True)            # the put lands, then the reply is lost

Rules match on the operation name (put, put_new, get, get_ranges, head, delete, list,
barrier) and a key prefix; each rule fires `times` times (None: for ever). `lag` makes
`list` show the store as it was that many seconds ago (a put not listed yet, a deleted key
still listed). `hook` is called before every call with (op, key, False) and after it with
(op, key, True), and may be a coroutine function: the simulation uses it to delay and to
fail at random (an error after the call is a lost reply: the call happened).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import trio

from snapfs.errors import StoreError
from snapfs.store.base import Bodies, Ranges, Store


@dataclass
class Gate:
    """A paused call: `wait_reached()` until it arrives, `release()` to let it go on."""

    reached: trio.Event = field(default_factory=trio.Event)
    go: trio.Event = field(default_factory=trio.Event)
    key: str | None = None

    async def wait_reached(self) -> None:
        await self.reached.wait()

    def release(self) -> None:
        self.go.set()


@dataclass
class _Rule:
    op: str
    prefix: str
    after: bool
    times: int | None
    gate: Gate | None = None
    error: BaseException | None = None

    def matches(self, op: str, key: str, after: bool) -> bool:
        return (
            self.op in (op, "*")
            and key.startswith(self.prefix)
            and self.after == after
            and (self.times is None or self.times > 0)
        )


class FaultStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.rules: list[_Rule] = []
        self.hook = None  # (op, key) -> None | awaitable: delays and random faults
        self.calls: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.lag = 0.0  # `list` shows the store as it was this many seconds (trio time) ago
        self._changes: list[tuple[float, str, bool]] = []  # (when, key, put or deleted)

    # ------------------------------------------------------------------ rules

    def pause(self, op: str, prefix: str = "", after: bool = False, times: int = 1) -> Gate:
        gate = Gate()
        self.rules.append(_Rule(op, prefix, after, times, gate=gate))
        return gate

    def fail(
        self,
        op: str,
        prefix: str = "",
        after: bool = False,
        times: int | None = 1,
        error: BaseException | None = None,
    ) -> None:
        error = error or StoreError(f"injected failure of {op} {prefix}*")
        self.rules.append(_Rule(op, prefix, after, times, error=error))

    def clear(self) -> None:
        for rule in self.rules:
            if rule.gate is not None:
                rule.gate.release()
        self.rules.clear()

    async def _point(self, op: str, key: str, after: bool) -> None:
        if not after:
            self.calls.append((op, key))
        if self.hook is not None:
            res = self.hook(op, key, after)
            if inspect.isawaitable(res):
                await res
        for rule in list(self.rules):
            if not rule.matches(op, key, after):
                continue
            if rule.times is not None:
                rule.times -= 1
            if rule.gate is not None:
                rule.gate.key = key
                rule.gate.reached.set()
                await rule.gate.go.wait()
            if rule.error is not None:
                raise rule.error

    # ------------------------------------------------------------------ the contract

    def _changed(self, key: str, put: bool) -> None:
        if self.lag > 0:
            self._changes.append((trio.current_time(), key, put))

    def _lagging(self, prefix: str, keys: list[str]) -> list[str]:
        """The listing as it was `lag` seconds ago (an eventually consistent listing)."""
        since = trio.current_time() - self.lag
        self._changes = [c for c in self._changes if c[0] >= since]
        view = set(keys)
        for _when, key, put in reversed(self._changes):
            if key.startswith(prefix):
                (view.discard if put else view.add)(key)
        return sorted(view)

    async def put(self, key: str, data: bytes) -> None:
        await self._point("put", key, False)
        await self.inner.put(key, data)
        self._changed(key, True)
        await self._point("put", key, True)

    async def put_new(self, key: str, data: bytes) -> None:
        await self._point("put_new", key, False)
        await self.inner.put_new(key, data)
        self._changed(key, True)
        await self._point("put_new", key, True)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await self._point("get", key, False)
        data = await self.inner.get(key, offset, length)
        await self._point("get", key, True)
        return data

    async def get_ranges(self, ranges: Ranges) -> Bodies:
        key = ranges[0][0] if ranges else ""
        await self._point("get_ranges", key, False)
        out = await self.inner.get_ranges(ranges)
        await self._point("get_ranges", key, True)
        return out

    async def head(self, key: str) -> int | None:
        await self._point("head", key, False)
        size = await self.inner.head(key)
        await self._point("head", key, True)
        return size

    async def delete(self, key: str) -> None:
        await self._point("delete", key, False)
        await self.inner.delete(key)
        self.deleted.append(key)
        self._changed(key, False)
        await self._point("delete", key, True)

    async def list(self, prefix: str = "") -> list[str]:
        await self._point("list", prefix, False)
        keys = await self.inner.list(prefix)
        await self._point("list", prefix, True)
        return self._lagging(prefix, keys) if self.lag > 0 else keys

    async def barrier(self) -> None:
        await self._point("barrier", "", False)
        await self.inner.barrier()
        await self._point("barrier", "", True)

    async def aclose(self) -> None:
        await self.inner.aclose()
