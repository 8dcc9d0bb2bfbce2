"""Backups in a bank, and their restore into a running writer (docs/design.md, "Backup").

A *bank* is a store that holds backups: references with unique names (`References.
begin_inbound(unique=True)`), copied there by `snapfs backup` (snapfs/backup.py) as
replicate copies a snapshot. Nothing else distinguishes a bank from any store.

`restore_backup` runs inside the daemon of a read-write mount (the ctl command `restore`):
the mount's engine is the one writer of its store, so the copy cannot come from outside
(replicate refuses a store with a live writer). The bank is read by a read-only engine in
a temporary cache dir; the copy is a `Replicator` in shared mode (each batch holds the
engine's commit lock: the mount's flusher, deletes and gc go on between batches); then the
volume is created with the backup's size and block size, the copied reference is adopted
as its snapshot NAME (`manage`) and the volume rolled back to it. A restore cut short
leaves an inbound reference in the mount's store, which the next restore of the same
backup resumes; a finished copy whose volume could not be made stays an available
reference there (listed by `snapshot unmanaged list`), which the next restore reuses.

owns: finding a backup by name, the restore's sequence and report.
does not own: the bank's writer sessions (snapfs/backup.py), the copy (replicate.py), the
reference rows (references.py).
"""

import dataclasses
from collections.abc import Callable

import trio

from snapfs.errors import AlreadyExists, Cancelled, InvalidReference, NotFound
from snapfs.store import open_store
from snapfs.units import check_name
from snapfs.volume.catalog import ReferenceRow
from snapfs.volume.engine import Engine
from snapfs.volume.replicate import Replicator, read_only_engine, reference_snapshot


def named_backup(bank: Engine, name: str) -> ReferenceRow:
    """The available backup `name` of the bank: NotFound when there is none,
    InvalidReference when it is still inbound (a backup that did not finish)."""
    check_name(name, "backup name")
    found = [r for r in bank.references() if r.name == name]
    if not found:
        raise NotFound(f"no backup named {name!r} in {bank.store.url}")
    done = [r for r in found if r.state == "available"]
    if not done:
        raise InvalidReference(f"backup {name!r} in {bank.store.url} did not finish (inbound)")
    return done[-1]


async def restore_backup(
    engine: Engine,
    bank_url: str,
    name: str,
    volume: str,
    uid: int,
    on_bytes: Callable[[int], None] | None = None,
    cancel: trio.CancelScope | None = None,
) -> dict:
    """Copy backup `name` of the bank at `bank_url` into `engine`'s store (only what it
    lacks) and make volume `volume` of it, owned by `uid`; an existing volume is refused
    (AlreadyExists) before anything is copied. `on_bytes(n)` as bytes are copied (the
    progress the daemon's status shows). `cancel` (not entered yet): cancelling it stops
    the copy (Cancelled; what was copied stays, as an inbound reference the next restore
    of this backup resumes); once the copy is complete the volume is made regardless.
    Returns the report."""
    engine.writable()
    check_name(volume, "volume name")
    if any(v.name == volume for v in engine.volumes()):
        raise AlreadyExists(f"volume {volume!r} already exists")
    bank = open_store(bank_url)
    try:
        async with read_only_engine(bank) as source:
            backup = named_backup(source, name)
            snap = reference_snapshot(backup, uid)
            copy = Replicator(source, snap, engine, shared=True, on_bytes=on_bytes)
            with cancel or trio.CancelScope():  # only the copy can be cut short
                ref = await copy.run(name, backup.description, f"{bank.url} {backup.id}")
            if cancel is not None and cancel.cancelled_caught:
                raise Cancelled(
                    f"restore of {name!r} as {volume!r} cancelled: what was copied stays; "
                    "run it again to go on"
                )
    finally:
        await bank.aclose()
    await engine.create_volume(volume, ref.size, ref.block_size, uid=uid)
    await engine.manage(volume, ref.id, name, uid=uid)
    await engine.rollback(volume, name, uid=uid)
    return {
        "volume": volume,
        "backup": name,
        "bank": bank_url,
        "size": ref.size,
        "block_size": ref.block_size,
        **dataclasses.asdict(copy.stats),
    }
