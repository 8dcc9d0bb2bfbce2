"""`snapfs replicate VOL@SNAP --to STORE_URL`: a snapshot into another store, as a reference.

Owns the command-line side: where the source is read from, the target's writer session and
its cache dir, the progress line and the report. The copy itself is
snapfs/volume/replicate.py (`Replicator`); the reference rows are the target engine's.

- Source: by default the running mount's store. The mount is asked to `sync` (every pending
  snapshot is uploaded and the catalog published), then the store is opened read-only in
  this process (a read-only engine in a temp cache dir, as `export --store` does).
  `--from-store URL` reads a store directly, without a mount.
- Target: opened in this process as a short-lived writer, on a persistent cache dir per
  target store (`~/.cache/snapfs/replicate/<store uuid>`, or `--cache-dir`). It never
  displaces a writer: a live lease on the target (a read-write mount) refuses the command
  with one line, and it takes the lease itself while it runs (renewed; released at the
  end), so a mount of the target meanwhile is refused in turn. When a writer published on
  the target since this cache dir last did, the cache dir is rebuilt from the store
  (nothing in it is needed: the inbound reference and its pins are published).
- A run that was killed leaves the target's inbound reference; the next run of the same
  snapshot finds it (same guid and root) and resumes.

Errors are one line (CliError, SnapfsError); nothing here prints a traceback.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import AsyncIterator

import trio

from snapfs import progress as progress_line
from snapfs.ctlclient import CliError, ctl, find_mount
from snapfs.errors import Busy, InvalidArgument
from snapfs.images import parse_words
from snapfs.store import open_store
from snapfs.store.base import Store
from snapfs.tasks import plain_errors_nursery
from snapfs.units import check_name, format_size, split_snapshot_ref
from snapfs.volume import lease, publish
from snapfs.volume.catalog import SnapshotRow
from snapfs.volume.engine import Engine, EngineConfig
from snapfs.volume.references import check_reference_id
from snapfs.volume.replicate import Replicator, read_only_engine, reference_snapshot

USAGE = (
    "usage: snapfs replicate VOL@SNAP --to STORE_URL [--name NAME] [--description TEXT]"
    " [--from-store URL] [--cache-dir DIR] [--no-progress]; or replicate REF --from-store URL"
    " --to STORE_URL (a reference of that store)"
)
BATCH_ENV = "SNAPFS_TEST_REPLICATE_BATCH"  # tests: bytes per committed batch
PAUSE_ENV = "SNAPFS_TEST_REPLICATE_PAUSE"  # tests: seconds after each batch (to kill mid-way)
BATCH_BYTES = 64 << 20


def cache_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "snapfs", "replicate")


def main(words: list[str], mount: str | None, as_json: bool) -> int:
    (ref,), opts, flags = parse_words(
        words[1:],
        {"to", "name", "description", "from-store", "cache-dir"},
        {"progress", "no-progress"},
        USAGE,
        count=1,
    )
    if "to" not in opts:
        raise CliError(f"--to STORE_URL is needed; {USAGE}")
    if "@" in ref:
        split_snapshot_ref(ref)
    elif "from-store" in opts:
        check_reference_id(ref)  # a reference of the source store (a replica, a backup)
    else:
        raise CliError(f"{ref[:40]!r}: VOL@SNAP, or a reference id with --from-store URL")
    name = opts.get("name")
    job = Job(ref, opts["to"], None if name is None else check_name(name, "reference name"))
    job.description = opts.get("description", "")[:1024]
    job.cache_dir = opts.get("cache-dir")
    job.show = progress_line.wanted(as_json, "no-progress" in flags)
    job.source_url = opts.get("from-store") or synced_source(find_mount(mount), ref)
    result = trio.run(job.run)
    print(json.dumps(result) if as_json else describe(ref, result))
    return 0


def synced_source(mnt: str, ref: str) -> str:
    """The store URL of the mount, once the snapshot is uploaded and published there."""
    status = ctl(mnt, "status")
    assert isinstance(status, dict)
    ctl(mnt, "sync")
    info = ctl(mnt, f"snapshot show {ref}")
    assert isinstance(info, dict)
    if info["state"] != "available" or info["temporary"]:
        raise CliError(f"snapshot {ref} is {info['state']}: it cannot be replicated yet")
    return status.get("store_url") or status["store"]


def describe(ref: str, r: dict) -> str:
    return (
        f"replicated {ref} to {r['to']} as reference {r['reference']} ({r['state']}): "
        f"sent {r['sent_objects']} objects ({format_size(r['sent_bytes'])}), "
        f"{r['present_objects']} already there{adopted(r)}"
    )


def adopted(r: dict) -> str:
    """What a resumed run found uploaded by the one it resumes (not sent again)."""
    if not r.get("adopted_objects"):
        return ""
    return f", {r['adopted_objects']} found uploaded by an interrupted run"


class Job:
    """One `snapfs replicate`: the stores, the sessions and the report."""

    def __init__(self, what: str, to: str, name: str | None) -> None:
        self.what, self.to, self.name = what, to, name  # what: VOL@SNAP or a reference id
        self.description = ""
        self.cache_dir: str | None = None
        self.source_url = ""
        self.show = False
        self.unique = False  # a backup: NAME is unique in the target (a bank)

    async def run(self) -> dict:
        source_store, target_store = open_store(self.source_url), open_store(self.to)
        try:
            async with read_only_engine(source_store) as source:
                row = source_row(source, self.what)
                if await same_store(source_store, target_store):
                    raise InvalidArgument(f"{self.to} is the source store itself")
                async with writer_session(target_store, self.target_cache) as target:
                    return await self._copy(source, row, target)
        finally:
            await source_store.aclose()
            await target_store.aclose()

    def target_cache(self, uuid: str) -> str:
        return os.path.abspath(self.cache_dir or os.path.join(cache_root(), uuid))

    async def _copy(self, source: Engine, row, target: Engine) -> dict:
        shown = progress_line.Progress(f"replicate {self.what}", None, self.show)
        replicator = Replicator(
            source,
            row,
            target,
            batch_bytes=int(os.environ.get(BATCH_ENV) or BATCH_BYTES),
            pause=float(os.environ.get(PAUSE_ENV) or 0),
            on_bytes=shown.add,
        )
        label = f"{self.source_url} {self.what}"
        try:
            ref = await replicator.run(
                self.name or row.name, self.description, label, unique=self.unique
            )
        finally:
            shown.close()
        return {
            "to": self.to,
            "reference": ref.id,
            "name": ref.name,
            "state": ref.state,
            "size": ref.size,
            **dataclasses.asdict(replicator.stats),
        }


def source_row(source: Engine, what: str) -> SnapshotRow:
    """The snapshot to copy: VOL@SNAP, or an available reference of the source store (seen
    as the snapshot it keeps: same root, size, block size, guid)."""
    if "@" in what:
        return source.snapshot_row(*split_snapshot_ref(what))
    return reference_snapshot(source.reference(what))


async def same_store(a: Store, b: Store) -> bool:
    return (await publish.read_manifest(a))["uuid"] == (await publish.read_manifest(b))["uuid"]


@contextlib.asynccontextmanager
async def writer_session(
    store: Store, cache_for, config: EngineConfig | None = None
) -> AsyncIterator[Engine]:
    """A short-lived writer of `store`: refused (Busy, one line) while a writer is live on
    it; holds the lease while it runs and releases it at the end."""
    uuid = (await publish.read_manifest(store))["uuid"]
    cache = cache_for(uuid)
    await refuse_live_writer(store)
    held = await lease.acquire(store, cache)
    try:
        engine = await open_writer(store, cache, config or EngineConfig())
        try:
            async with plain_errors_nursery() as nursery:
                nursery.start_soon(lease.keep_renewed, store, held, engine.lost)
                yield engine
                nursery.cancel_scope.cancel()
        finally:
            await engine.close(flush=not engine.lease_lost)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await lease.release(store, held)


async def refuse_live_writer(store: Store) -> None:
    current = await lease.read_lease(store)
    if current is not None and current.expires > time.time() and lease.holder_alive(current):
        raise Busy(
            f"{store.url} has a live writer ({current.describe()}): replicate never "
            "displaces it; unmount it first"
        )


def has_catalog(cache: str) -> bool:
    return os.path.exists(os.path.join(cache, "catalog.sqlite3"))


async def open_writer(store: Store, cache: str, config: EngineConfig) -> Engine:
    """The target engine on its persistent cache dir; rebuilt from the store when another
    writer published since this cache dir did (nothing in it is needed then)."""
    existed = has_catalog(cache)
    try:
        return await Engine.open(store, cache, config)
    except Busy:
        if not existed:
            raise
    shutil.rmtree(cache, ignore_errors=True)
    return await Engine.open(store, cache, config)
