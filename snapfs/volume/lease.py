"""One writer per store: a lease object in the store. Advisory: it keeps honest writers
apart and names the holder; it does not decide safety.

    lease    msgpack {token, host, pid, mounted, expires, cache_dir}

A read-write mount takes the lease and renews it every third of its time to live. A second
read-write mount is refused with the holder's name, unless the lease has expired, the holder
is a dead process on this very host, or `--takeover` says so. Read-only mounts never take it.

"Expired" compares the holder's `expires` (its wall clock) with ours: two hosts whose clocks
disagree may judge it differently, and a paused holder does not know it was taken over. So
nothing that keeps the store correct depends on it. Safety comes from the fence
(volume/fence.py): a writer that takes over first publishes a catalog at the newest seq + 1
with a conditional put, so the displaced writer's next publish finds that seq taken and it
stops publishing and deleting; and nothing is deleted before that fence, nor within the
grace period after the last catalog that needed it. (Judging expiry by our own observation,
a renewal counter unchanged for a TTL of our monotonic clock, would cost every takeover a
TTL wait at mount; with the fence it would buy no safety, so the rule stays as it is.)
"""

import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import trio

from snapfs import codec
from snapfs.errors import Busy, ObjectNotFound
from snapfs.store.base import Store

log = logging.getLogger("snapfs.lease")
LEASE_KEY = "lease"
DEFAULT_TTL = float(os.environ.get("SNAPFS_LEASE_SECONDS", "60"))


@dataclass
class Lease:
    token: str
    host: str
    pid: int
    mounted: float
    expires: float
    cache_dir: str

    def describe(self) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.expires))
        return f"host {self.host} pid {self.pid} (lease expires {until})"


def _pid_alive(pid: int) -> bool:
    """A zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def holder_alive(current: Lease) -> bool:
    """Whether the lease's holder may be alive: anywhere but a dead pid on this host."""
    return current.host != socket.gethostname() or _pid_alive(current.pid)


async def read_lease(store: Store) -> Lease | None:
    try:
        raw = codec.unpack(await store.get(LEASE_KEY), f"{store.url}/{LEASE_KEY}")
    except ObjectNotFound:
        return None
    try:
        return Lease(**raw)
    except TypeError:
        return None  # an unreadable lease protects nothing: treat as absent


async def acquire(
    store: Store, cache_dir: str, ttl: float = DEFAULT_TTL, takeover: bool = False
) -> Lease:
    """Take the store's lease or raise Busy naming the holder."""
    now = time.time()
    host = socket.gethostname()
    current = await read_lease(store)
    if current is not None and current.expires > now and not takeover:
        if holder_alive(current):
            raise Busy(
                f"{store.url} is mounted read-write by {current.describe()}; mount "
                "--read-only, wait for the lease to expire, or use --takeover if that "
                "writer is dead (a live one would be cut off from the store)"
            )
        log.warning("taking over the lease of dead pid %d on this host", current.pid)
    elif current is not None and current.expires > now:
        log.warning("taking over the lease of %s (--takeover)", current.describe())
    lease = Lease(uuid.uuid4().hex, host, os.getpid(), now, now + ttl, cache_dir)
    # A forced takeover insists. A live holder renewing at the same moment (a read, then a
    # write: stores have no compare-and-swap) can overwrite our lease once; so we let such
    # a renewal land before we look, and write again if it did. The holder's next renewal
    # then sees our token and stops (the conditional publish guards the catalog anyway).
    for attempt in range(5 if takeover else 1):
        await store.put(LEASE_KEY, codec.pack(asdict(lease)))
        await store.barrier()
        if takeover:
            await trio.sleep(min(ttl / 10, 0.5) * (attempt + 1))
        check = await read_lease(store)
        if check is not None and check.token == lease.token:
            return lease
    holder = check.describe() if check else "another writer"
    raise Busy(f"{store.url}: lost the race for the lease to {holder}")


async def renew(store: Store, lease: Lease, ttl: float = DEFAULT_TTL) -> bool:
    """Extend our lease; False when someone else holds it now."""
    current = await read_lease(store)
    if current is None or current.token != lease.token:
        return False
    lease.expires = time.time() + ttl
    await store.put(LEASE_KEY, codec.pack(asdict(lease)))
    return True


async def release(store: Store, lease: Lease) -> None:
    current = await read_lease(store)
    if current is not None and current.token == lease.token:
        await store.delete(LEASE_KEY)


async def keep_renewed(
    store: Store,
    lease: Lease,
    on_lost,
    ttl: float = DEFAULT_TTL,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Background task: renew every ttl/3. Store errors are retried until the lease would
    expire; then, or when another writer holds it, call `on_lost(reason)` and stop."""
    task_status.started()
    while True:
        await trio.sleep(ttl / 3)
        try:
            if not await renew(store, lease, ttl):
                holder = await read_lease(store)
                on_lost(f"lease taken over by {holder.describe() if holder else 'nobody'}")
                return
        except Exception as exc:  # the store is unreachable: keep trying until expiry
            if time.time() > lease.expires:
                on_lost(f"lease expired while the store was unreachable ({exc})")
                return
            log.warning(
                "could not renew the lease (expires in %.0fs): %s", lease.expires - time.time(), exc
            )
