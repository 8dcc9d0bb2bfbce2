"""Background maintenance: the flusher loop, gc of packs, the orphan sweep, fsck."""

import logging

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, fragment_key, pack_key
from snapfs.errors import (
    IntegrityError,
    ObjectNotFound,
    SnapfsError,
)
from snapfs.volume.check import (
    K_CHUNK,
    K_FRAG,
    K_NODE,
    K_PACK,
    CheckReport,
    expected_refs,
    key_to_store_key,
)
from snapfs.volume.flusher import Flusher

log = logging.getLogger("snapfs.engine")


class Maintenance(Flusher):
    """The background loop (flush, publish, gc, orphan sweep) and the checks."""

    _sweep_at = 0.0  # when the orphans the last sweep remembered are due (config.clock)

    async def run_flusher(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: every `flush_delay` (at once when kicked), flush the blocks left
        alone for `flush_delay` or dirty for `flush_max_age`. Cycles follow each other
        without a pause only while there is a backlog (a full batch or a pending
        snapshot): under steady writes, blocks that settle meanwhile wait for the next tick
        instead of making a commit each (every commit has fixed costs: barriers, a catalog
        transaction and a publish).
        Store errors are logged and retried with backoff; cancellation stops it between
        cycles (the final flush is `close()`'s, shielded)."""
        task_status.started()
        backoff = 1.0
        while True:
            with trio.move_on_after(min(self.config.flush_delay, self.config.flush_max_age)):
                await self._kick.wait()
            self._kick = trio.Event()
            try:
                while (
                    await self.flush_once(
                        min_age=self.config.flush_delay, max_age=self.config.flush_max_age
                    )
                    and self._backlog
                ):
                    await trio.lowlevel.checkpoint()
                if not self.lease_lost and not self.fence.up_to_date():
                    async with self.commit_lock:
                        await self._publish()
                        await self._collect()
                due = self.fence.next_due()
                if due is not None and due <= self.config.clock() and not self.lease_lost:
                    async with self.commit_lock:  # garbage whose grace period is over
                        await self._collect()
                if not self.lease_lost and self.chunks.sparse_packs(self.config.gc_threshold):
                    await self.gc()  # background gc: work follows the garbage
                if (
                    self.sweep_needed
                    and not self.lease_lost
                    and self.config.clock() >= self._sweep_at
                ):
                    await self.sweep_orphans()
                backoff = 1.0
            except Exception as exc:  # the daemon must outlive any failure of a cycle
                self.flush_errors += 1
                self.last_error = str(exc) or exc.__class__.__name__
                if isinstance(exc, SnapfsError):
                    log.warning("flush failed, retrying in %.0fs: %s", backoff, exc)
                else:
                    log.exception("flush failed unexpectedly, retrying in %.0fs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def gc(self, threshold: float | None = None) -> dict:
        """Rewrite packs whose live share fell below `threshold` (their live blobs move to new
        packs, then the old packs go), and fold the index fragments into a checkpoint when
        they have piled up. The work follows the garbage, not the data kept."""
        self.writable()
        threshold = self.config.gc_threshold if threshold is None else threshold
        async with self.commit_lock:
            await self._publish()
            await self._collect()
            before = self.chunks.statistics()
            sparse = self.chunks.sparse_packs(threshold)
            moved = 0
            try:
                for pid, _size, _live in sparse:
                    for key, body in await self.chunks.read_live(pid):
                        self.chunks.stage_body(key, body)
                        moved += len(body)
                    await self.chunks.upload_sealed()
                await self.chunks.flush()
                await self.store.barrier()
            except BaseException:
                self.chunks.discard_staged()
                self.sweep_needed = True
                raise
            # The index changed: a catalog naming the new fragment goes out, and the old
            # packs stay in the store for the grace period after it: a reader that loaded
            # the catalog before (a read-only mount) still finds its blobs.
            with self.catalog.transaction():
                self.chunks.record()
                self.chunks.forget_packs([pid for pid, _s, _l in sparse])
                self.fence.queue((K_PACK + pid for pid, _s, _l in sparse), published=False)
                if sparse:
                    self._bump_seq()
            await self._publish()
            await self._collect()
            if self.chunks.statistics().fragments > 32:
                old = await self.chunks.checkpoint()
                await self.store.barrier()
                with self.catalog.transaction():
                    self.chunks.record()
                    self.chunks.forget_fragments(old)
                    self.fence.queue((K_FRAG + _fragment_id(k) for k in old), published=False)
                    self._bump_seq()
                await self._publish()
                await self._collect()
            after = self.chunks.statistics()
            return {
                "rewritten_packs": len(sparse),
                "moved_bytes": moved,
                "store_bytes_before": before.pack_bytes,
                "store_bytes_after": after.pack_bytes,
                "live_bytes": after.live_bytes,
                "packs": after.packs,
            }

    async def sweep_orphans(self) -> int:
        """Delete the packs and index fragments that no committed catalog knows: what a
        flush or gc cycle uploaded before it failed (store error, crash, cancellation), or
        what a displaced writer uploaded and never published. The flusher runs it after
        such a failure or an unclean shutdown. Only after this writer's fence, and only
        objects seen orphaned for the grace period (the fence remembers when). Objects
        queued for deletion are not orphans. Returns how many objects went."""
        self.writable()
        async with self.commit_lock:
            await self._publish()
            await self._collect()
            self.fence.check_may_delete()
            garbage = self.catalog.garbage()
            keep = self.chunks.known_packs()
            keep.update(k[1:] for k in garbage if k[:1] == K_PACK)
            orphans = set()
            for key in await self.store.list("p/"):
                pid = _pack_id(key)
                if pid is not None and pid not in keep:
                    orphans.add(key)
            fragments = self.chunks.fragment_keys()
            fragments.update(fragment_key(k[1:]) for k in garbage if k[:1] == K_FRAG)
            orphans.update(k for k in await self.store.list("i/") if k not in fragments)
            removed, due = await self.fence.sweep(orphans)
            if removed:
                log.info("removed %d objects that a failed cycle left in the store", removed)
            self.orphans_removed += removed
            self.sweep_needed = due is not None
            self._sweep_at = due or 0.0
            return removed

    # ------------------------------------------------------------------ checks and stats

    async def _check_store(self, expected) -> tuple[list[str], list[bytes]]:
        """Every referenced blob is indexed and its pack is in the store; and which packs
        in the store nothing indexes (left by a crashed cycle)."""
        missing = []
        packs = set()
        for key in expected:
            loc = self.chunks.location(key)
            if loc is None:
                missing.append(f"{key_to_store_key(key)}: not in the index")
            else:
                packs.add(loc[0])
        listed = {bytes.fromhex(k.rsplit("/", 1)[1]) for k in await self.store.list("p/")}
        for pid in sorted(packs - listed):  # a listing may lag: ask for the pack itself
            if await self.store.head(pack_key(pid)) is None:
                missing.append(f"{pack_key(pid)}: missing from the store")
        known = self.chunks.known_packs()
        known.update(k[1:] for k in self.catalog.garbage() if k[:1] == K_PACK)  # in grace
        return missing, sorted(listed - known)

    async def check(
        self, repair: bool = False, verify_store: bool = True, verify_data: bool = False
    ) -> CheckReport:
        """Recompute every refcount from the roots and compare (a writer: a read-only
        engine keeps none); check the store has every referenced object; with
        `verify_data`, read every one and verify it against its digest. With repair, write
        the recomputed counts and delete orphan packs."""
        async with self.commit_lock:
            roots = [(h.row.root, h.bs) for h in self.heads.values()]
            roots += [
                (s.root, s.block_size) for s in self.catalog.snapshots() if s.state == "available"
            ]
            roots += [(n, r.block_size) for r in self.catalog.references() for n in r.held()]
            expected = await expected_refs(self.tree, roots)
            report = CheckReport(objects=len(expected))
            if not self.read_only:
                report.wrong_counts = self._wrong_counts(expected)
            if verify_store:
                report.missing, orphans = await self._check_store(expected)
                if report.missing and self.fence.fenced and not self.read_only:
                    # Not damage if another writer took the store over: what only this
                    # writer's unpublished state needed is that writer's to delete.
                    await self.fence.confirm_current("checking the store")
                report.orphan_packs = len(orphans)
                if repair and orphans:
                    await self.fence.delete([pack_key(p) for p in orphans])
                    report.repaired = True
            if verify_data:
                report.corrupt = await self._verify_data(expected)
            if repair and report.wrong_counts:
                with self.catalog.transaction():
                    self.refs.replace(expected)
                    self.chunks.recount_live()
                report.repaired = True
            return report

    def _wrong_counts(self, expected: dict) -> list[str]:
        """Refcounts that differ from the ones recomputed from the roots, and packs whose
        live bytes differ from the blobs the index places in them."""
        actual = self.refs.all()
        wrong = [
            f"{key_to_store_key(key)}: counted {actual.get(key, (0, 0))[0]}, "
            f"referenced {expected.get(key, (0, 0))[0]}"
            for key in sorted(set(expected) | set(actual))
            if expected.get(key, (0, 0))[0] != actual.get(key, (0, 0))[0]
        ]
        if not any(k[:1] in (K_CHUNK, K_NODE) for k in self.catalog.garbage()):
            wrong += [
                f"{pack_key(pid)}: live bytes {live}, blobs indexed in it {counted}"
                for pid, live, counted in self.chunks.live_mismatches()
            ]
        return wrong

    async def _verify_data(self, expected: dict) -> list[str]:
        """Read every referenced chunk (the tree walk read every node already), in ranged
        GETs of up to 64, verifying each against its digest; a batch that fails is read
        again one by one to name the objects."""
        chunks = sorted(k[1:] for k in expected if k[:1] == K_CHUNK and self.chunks.location(k))
        corrupt = []
        for first in range(0, len(chunks), 64):
            batch = chunks[first : first + 64]
            try:
                await self.chunks.get_many(CHUNK, batch)
                continue
            except (IntegrityError, ObjectNotFound):
                pass
            for oid in batch:
                try:
                    await self.chunks.get(CHUNK, oid)
                except (IntegrityError, ObjectNotFound) as exc:
                    corrupt.append(f"{key_to_store_key(K_CHUNK + oid)}: {exc}")
        return corrupt


def _pack_id(key: str) -> bytes | None:
    try:
        return bytes.fromhex(key.rsplit("/", 1)[1])
    except ValueError:
        return None  # not a name snapfs writes: left alone


def _fragment_id(key: str) -> bytes:
    return bytes.fromhex(key.rsplit("/", 1)[1])
