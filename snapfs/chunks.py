"""Content-addressed blobs, packed into pack objects, with a rebuildable index.

A blob's id is the blake3 digest (32 bytes) of its plain bytes. Two kinds share the scheme:
data blocks (`c`) and tree nodes (`n`); a blob's *key* is kind byte + id (33 bytes). A blob's
stored body is one codec byte followed by the payload (codec 0 = plain; compression and
encryption slot in as further codecs). Every read is verified against the id: a mismatch is
an IntegrityError that names the blob and its pack.

A Swift PUT costs ~12 ms whatever its size, so blobs travel in packs of a few MiB:

    p/<hh>/<pack id>   body* trailer         (pack id = blake3 of the whole object)
        trailer = msgpack {nonce: 16 random bytes, blobs: [[key, offset, length], ...]}
                  u32le(len(msgpack))  b"SPK1"
    i/<hh>/<frag id>   msgpack {format: 1, seq, packs: {pack id: size},
                                blobs: [[key, pack id, offset, length], ...]}

The index (blob → pack, offset, length) lives in the local catalog (tables `blobs`, `packs`)
and is published as write-once fragments, one per flush; `checkpoint()` folds them into one.
Both are derived: a fresh machine reads the fragments, and a pack's trailer lists its blobs.
A blob can be in several fragments (gc moved it to another pack, or it was stored again
after it died): the fragment with the highest `seq` wins. The index owns that counter
(table `index_seq`): it is durable before a fragment is written, and a restore continues
from the highest seq in the store, so it grows across crashes and across writers.
Fragments written before `seq` existed count as the oldest (among them, listing order).
`packs.live` counts the bytes of blobs still referenced, so GC knows which packs to drop
(nothing live) or rewrite (live share under a threshold) without walking trees or listing
the store.
"""

import functools
import secrets
import sqlite3
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import blake3
import trio

from snapfs import codec
from snapfs.errors import IntegrityError, ObjectNotFound
from snapfs.store.base import Store
from snapfs.tasks import run_all

CHUNK = "c"
NODE = "n"
_PLAIN = b"\x00"
_MAGIC = b"SPK1"
FORMAT = 1

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs(key BLOB PRIMARY KEY, pack BLOB NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS packs(id BLOB PRIMARY KEY, size INTEGER NOT NULL,
    live INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fragments(key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_seq(id INTEGER PRIMARY KEY CHECK (id = 1),
    next INTEGER NOT NULL);
"""
NO_SEQ = -1  # the seq of a fragment written before fragments had one: the oldest


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def blob_key(kind: str, oid: bytes) -> bytes:
    return kind.encode() + oid


def pack_key(pid: bytes) -> str:
    h = pid.hex()
    return f"p/{h[:2]}/{h}"


def fragment_key(fid: bytes) -> str:
    h = fid.hex()
    return f"i/{h[:2]}/{h}"


@dataclass
class IndexScan:
    """What `ChunkStore.scan_index` read from the store."""

    fkeys: list[str]
    newest: int = NO_SEQ  # the highest fragment seq read
    sizes: dict[bytes, int] = field(default_factory=dict)
    found: dict[bytes, tuple[bytes, int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PackStatistics:
    packs: int
    pack_bytes: int
    live_bytes: int
    fragments: int


class ChunkStore:
    """stage(kind, id, bytes) then flush() → blobs are in the store; record() (inside the
    caller's catalog transaction) makes them known; get(kind, id) → verified bytes."""

    def __init__(
        self, store: Store, db: sqlite3.Connection, pack_size: int = 4 << 20, uploads: int = 8
    ) -> None:
        self.store = store
        self.db = db
        self.pack_size = pack_size
        self.uploads = uploads
        # A blob's body is kept as parts (codec byte, payload) so that staging copies nothing.
        self._open: list[tuple[bytes, tuple[bytes, ...]]] = []  # the pack being filled
        self._open_bytes = 0
        self._sealed: list[list[tuple[bytes, tuple[bytes, ...]]]] = []
        self._staged: dict[bytes, tuple[bytes, ...]] = {}  # key → body parts, until uploaded
        # Uploaded in a pack but not yet in a fragment / not yet recorded: key → location.
        self._uploaded: dict[bytes, tuple[bytes, int, int]] = {}
        self._unindexed_rows: list[tuple[bytes, bytes, int, int]] = []
        self._unindexed_packs: dict[bytes, int] = {}
        self._pending_rows: list[tuple[bytes, bytes, int, int]] = []
        self._pending_packs: dict[bytes, int] = {}
        self._pending_fragments: list[str] = []
        # Blobs whose pack PUT succeeded (not when staged: an outage must not count).
        self.uploaded_bytes = 0
        self.uploaded_blobs = 0
        # A read-only engine sets this: a blob not found (not in the index, or its pack
        # gone: the writer's gc moved it) refreshes the index, then the read is tried once
        # more.
        self.on_missing: Callable[[], Awaitable[None]] | None = None

    @property
    def staged_blobs(self) -> int:
        """Blobs staged whose pack PUT has not succeeded yet."""
        return len(self._staged)

    async def hash(self, data: bytes) -> bytes:
        if len(data) >= 16384:
            return await trio.to_thread.run_sync(digest, data)
        return digest(data)

    # ------------------------------------------------------------------ writing

    def stage(self, kind: str, oid: bytes, data: bytes) -> int:
        """Queue a blob for the next pack; returns its stored size."""
        key = blob_key(kind, oid)
        known = self._stored_length(key)
        if known is not None:
            return known
        self._add(key, (_PLAIN, data))
        return 1 + len(data)

    def stage_body(self, key: bytes, body: bytes) -> None:
        """Re-stage an already encoded blob (used when repacking)."""
        self._add(key, (body,))

    def _stored_length(self, key: bytes) -> int | None:
        parts = self._staged.get(key)
        if parts is not None:
            return sum(map(len, parts))
        loc = self._uploaded.get(key)
        return None if loc is None else loc[2]

    def _add(self, key: bytes, parts: tuple[bytes, ...]) -> None:
        self._staged[key] = parts
        self._open.append((key, parts))
        self._open_bytes += sum(map(len, parts))
        if self._open_bytes >= self.pack_size:
            self._seal()

    def _seal(self) -> None:
        if self._open:
            self._sealed.append(self._open)
            self._open, self._open_bytes = [], 0

    async def upload_sealed(self) -> None:
        """Upload the packs that are full, so that staged blobs do not pile up in memory.
        Their index rows wait for flush(); nothing is durable or recorded yet."""
        sealed, self._sealed = self._sealed, []
        await run_all([functools.partial(self._upload, e) for e in sealed], self.uploads)

    async def start_sealed(self, nursery: trio.Nursery, window: trio.Semaphore) -> None:
        """Start uploading the full packs in `nursery`, each holding a slot of `window`
        until its PUT returns: the caller goes on hashing and staging while up to that many
        packs are in flight (it waits here only when the window is full)."""
        sealed, self._sealed = self._sealed, []
        for entries in sealed:
            await window.acquire()
            nursery.start_soon(self._upload_in_window, entries, window)

    async def _upload_in_window(self, entries, window: trio.Semaphore) -> None:
        try:
            await self._upload(entries)
        finally:
            window.release()

    async def _upload(self, entries: list[tuple[bytes, tuple[bytes, ...]]]) -> None:
        def build() -> tuple[bytes, bytes, list[tuple[bytes, int, int]]]:
            pieces: list[bytes] = []
            table: list[tuple[bytes, int, int]] = []
            offset = 0
            for key, parts in entries:
                length = sum(map(len, parts))
                table.append((key, offset, length))
                pieces.extend(parts)
                offset += length
            # The nonce makes every pack unique: a repack of the same blobs never gets the id
            # of a pack that is about to be deleted.
            trailer = codec.pack(
                {"nonce": secrets.token_bytes(16), "blobs": [list(t) for t in table]}
            )
            pieces += [trailer, struct.pack("<I", len(trailer)), _MAGIC]
            body = b"".join(pieces)
            return digest(body), body, table

        pid, body, table = await trio.to_thread.run_sync(build)
        await self.store.put(pack_key(pid), body)
        self.uploaded_blobs += len(table)
        self.uploaded_bytes += sum(length for _key, _offset, length in table)
        self._unindexed_packs[pid] = len(body)
        for key, offset, length in table:
            self._unindexed_rows.append((key, pid, offset, length))
            self._uploaded[key] = (pid, offset, length)
            self._staged.pop(key, None)

    async def flush(self) -> None:
        """Upload every staged blob in packs, then one index fragment for the packs uploaded
        since the last one. The caller makes them durable (store.barrier) and calls record()
        in its transaction."""
        self._seal()
        await self.upload_sealed()
        if not self._unindexed_packs:
            return
        rows, packs = self._unindexed_rows, self._unindexed_packs
        fkey = await self._put_fragment(packs, [list(r) for r in rows])
        self._unindexed_rows, self._unindexed_packs = [], {}
        self._pending_rows.extend(rows)
        self._pending_packs.update(packs)
        self._pending_fragments.append(fkey)

    async def _put_fragment(self, packs: dict[bytes, int], rows: list[list]) -> str:
        """Write an index fragment with the next seq (taken durably first: a fragment
        left by a failed cycle never shares its seq with a later one)."""
        seq = self._take_seq()
        fragment = codec.pack({"format": FORMAT, "seq": seq, "packs": packs, "blobs": rows})
        fkey = fragment_key(digest(fragment))
        await self.store.put(fkey, fragment)
        return fkey

    def _next_seq(self) -> int:
        row = self.db.execute("SELECT next FROM index_seq").fetchone()
        return 0 if row is None else int(row[0])

    def _set_next_seq(self, seq: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO index_seq VALUES(1, ?)", (seq,))

    def _take_seq(self) -> int:
        seq = self._next_seq()
        self._set_next_seq(seq + 1)  # autocommit: durable before the fragment's PUT
        return seq

    def record(self) -> None:
        """Inside the caller's transaction: index what flush() uploaded. A blob that was
        stored before (and is being brought back) moves its live bytes to the new pack."""
        for key, pid, off, length in self._pending_rows:
            old = self.db.execute("SELECT pack, length FROM blobs WHERE key=?", (key,)).fetchone()
            if old is not None:
                self.db.execute("UPDATE packs SET live = live - ? WHERE id=?", (old[1], old[0]))
            self.db.execute("INSERT OR REPLACE INTO blobs VALUES(?,?,?,?)", (key, pid, off, length))
        live: dict[bytes, int] = {}
        for _key, pid, _off, length in self._pending_rows:
            live[pid] = live.get(pid, 0) + length
        for pid, size in self._pending_packs.items():  # an adopted pack may be known
            self.db.execute(
                "INSERT INTO packs VALUES(?,?,?) ON CONFLICT(id) DO UPDATE SET live = live + ?",
                (pid, size, live.get(pid, 0), live.get(pid, 0)),
            )
        self.db.executemany(
            "INSERT OR IGNORE INTO fragments VALUES(?)", ((k,) for k in self._pending_fragments)
        )
        self._pending_rows, self._pending_packs, self._pending_fragments = [], {}, []
        self._staged.clear()
        self._uploaded.clear()

    def adopt(self, key: bytes, where: tuple[bytes, int, int], pack_size: int) -> None:
        """Take a blob that a pack no index lists already holds (uploaded by a cycle that
        never recorded it; see `orphan_blobs`) as if this cycle had uploaded it there: the
        next flush's fragment lists it and record() indexes it. The caller makes sure the
        pack stays until then."""
        pid = where[0]
        self._unindexed_packs[pid] = pack_size
        self._unindexed_rows.append((key, *where))
        self._uploaded[key] = where
        self._staged.pop(key, None)

    def discard_staged(self) -> None:
        """Forget what was staged or flushed but not recorded (a failed commit)."""
        self._open, self._open_bytes, self._sealed = [], 0, []
        self._staged.clear()
        self._uploaded.clear()
        self._unindexed_rows, self._unindexed_packs = [], {}
        self._pending_rows, self._pending_packs, self._pending_fragments = [], {}, []

    # ------------------------------------------------------------------ reading

    def location(self, key: bytes) -> tuple[bytes, int, int] | None:
        row = self.db.execute(
            "SELECT pack, offset, length FROM blobs WHERE key=?", (key,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    async def get(self, kind: str, oid: bytes) -> bytes:
        try:
            return await self._get(kind, oid)
        except ObjectNotFound:
            pass
        # The writer's own gc may have moved the blob while this read waited (with no grace
        # period): the index says where it is now. A read-only engine reloads its index.
        if self.on_missing is not None:
            await self.on_missing()
        return await self._get(kind, oid)

    async def _get(self, kind: str, oid: bytes) -> bytes:
        key = blob_key(kind, oid)
        parts = self._staged.get(key)
        body = None if parts is None else b"".join(parts)
        where = f"blob {kind}/{oid.hex()}"
        if body is None:
            loc = self._uploaded.get(key) or self.location(key)
            if loc is None:
                raise ObjectNotFound(f"{where}: not in the index")
            pid, off, length = loc
            where += f" in {pack_key(pid)}"
            try:
                body = await self.store.get(pack_key(pid), off, length)
            except ObjectNotFound:
                raise ObjectNotFound(f"{where}: pack missing from {self.store.url}") from None
        if len(body) < 1 or body[:1] != _PLAIN:
            raise IntegrityError(f"{where}: unknown codec")
        data = body[1:]
        if await self.hash(data) != oid:
            raise IntegrityError(f"{where}: content does not match its digest")
        return data

    async def get_many(self, kind: str, oids: list[bytes], gap: int = 64 << 10) -> dict:
        """Several blobs in as few GETs as possible: blobs of one pack that lie at most
        `gap` bytes apart come in one ranged GET (read-ahead of blocks written together).
        Every blob is verified as by `get`."""
        try:
            return await self._get_many(kind, oids, gap)
        except ObjectNotFound:
            pass
        if self.on_missing is not None:  # as in `get`
            await self.on_missing()
        return await self._get_many(kind, oids, gap)

    async def _get_many(self, kind: str, oids: list[bytes], gap: int) -> dict:
        out: dict[bytes, bytes] = {}
        spans: dict[bytes, list[tuple[int, int, bytes]]] = {}
        for oid in set(oids):
            key = blob_key(kind, oid)
            loc = None if key in self._staged else self.location(key)
            if loc is None:
                out[oid] = await self._get(kind, oid)  # staged, or the error `get` gives
                continue
            pid, off, length = loc
            spans.setdefault(pid, []).append((off, length, oid))
        runs: list[tuple[bytes, list[tuple[int, int, bytes]]]] = []
        for pid, items in spans.items():
            items.sort()
            run = [items[0]]
            for item in items[1:]:
                if item[0] - (run[-1][0] + run[-1][1]) <= gap:
                    run.append(item)
                else:
                    runs.append((pid, run))
                    run = [item]
            runs.append((pid, run))

        ranges = [
            (pack_key(pid), run[0][0], run[-1][0] + run[-1][1] - run[0][0]) for pid, run in runs
        ]
        datas = await self.store.get_ranges(ranges)
        got: list[tuple[str, bytes, bytes]] = []  # (pack name, oid, body)
        for (name, start, _n), (_pid, run), data in zip(ranges, runs, datas, strict=True):
            got.extend((name, oid, data[off - start : off - start + n]) for off, n, oid in run)
        # One trip to a worker thread verifies them all (blake3 of 128 KiB: ~50 us).
        digests = await trio.to_thread.run_sync(lambda: [digest(b[1:]) for _n, _o, b in got])
        for (name, oid, body), actual in zip(got, digests, strict=True):
            where = f"blob {kind}/{oid.hex()} in {name}"
            if body[:1] != _PLAIN:
                raise IntegrityError(f"{where}: unknown codec")
            if actual != oid:
                raise IntegrityError(f"{where}: content does not match its digest")
            out[oid] = body[1:]
        return out

    # ------------------------------------------------------------------ freeing

    def release(self, keys: list[bytes]) -> list[bytes]:
        """Inside the caller's transaction: blobs nothing references any more leave the
        index; returns the packs with no live bytes left (to delete from the store)."""
        touched = set()
        for key in keys:
            row = self.db.execute("SELECT pack, length FROM blobs WHERE key=?", (key,)).fetchone()
            if row is None:
                continue
            self.db.execute("DELETE FROM blobs WHERE key=?", (key,))
            self.db.execute("UPDATE packs SET live = live - ? WHERE id=?", (row[1], row[0]))
            touched.add(row[0])
        empty = [
            pid
            for pid in touched
            if (r := self.db.execute("SELECT live FROM packs WHERE id=?", (pid,)).fetchone())
            and r[0] <= 0
        ]
        for pid in empty:
            self.db.execute("DELETE FROM packs WHERE id=?", (pid,))
        return empty

    def sparse_packs(self, threshold: float) -> list[tuple[bytes, int, int]]:
        """Packs whose live share fell below `threshold`: (id, size, live)."""
        return list(
            self.db.execute(
                "SELECT id, size, live FROM packs WHERE live < size * ? ORDER BY live * 1.0 / size",
                (threshold,),
            )
        )

    async def read_live(self, pid: bytes) -> list[tuple[bytes, bytes]]:
        """The live blobs of a pack, (key, body), read with one GET and verified. A pack
        with none is not read (after a restore: one that gc retired, maybe gone already)."""
        rows = list(self.db.execute("SELECT key, offset, length FROM blobs WHERE pack=?", (pid,)))
        if not rows:
            return []
        body = await self.store.get(pack_key(pid))
        if digest(body) != pid:
            raise IntegrityError(f"{pack_key(pid)}: content does not match its digest")
        return [(key, body[off : off + length]) for key, off, length in rows]

    async def read_trailer(self, pid: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
        """What a pack holds, from its own trailer: ([(key, offset, length)], pack size).
        The whole pack is read and verified against its id."""
        table, body = await self._read_pack(pid)
        return table, len(body)

    async def _read_pack(self, pid: bytes) -> tuple[list[tuple[bytes, int, int]], bytes]:
        """A whole pack, verified against its id, and its trailer's table."""
        name = pack_key(pid)
        body = await self.store.get(name)
        if digest(body) != pid:
            raise IntegrityError(f"{name}: content does not match its digest")
        if len(body) < 8 or body[-4:] != _MAGIC:
            raise IntegrityError(f"{name}: no pack trailer")
        (length,) = struct.unpack("<I", body[-8:-4])
        doc = codec.unpack(body[-8 - length : -8], f"{self.store.url}/{name}")
        if not isinstance(doc, dict) or not isinstance(doc.get("blobs"), list):
            raise IntegrityError(f"{name}: malformed pack trailer")
        return [(bytes(k), int(o), int(n)) for k, o, n in doc["blobs"]], body

    async def unknown_packs(self, keep: set[bytes]) -> list[bytes]:
        """The packs in the store (one LIST of `p/`) that the index does not know and that
        are not in `keep` (the caller's: packs queued for deletion)."""
        known = self.known_packs() | keep
        pids = []
        for key in await self.store.list("p/"):
            try:
                pid = bytes.fromhex(key.rsplit("/", 1)[1])
            except ValueError:
                continue  # not a name snapfs writes
            if pid not in known:
                pids.append(pid)
        return sorted(pids)

    async def orphan_blobs(self, pid: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
        """The blobs of a pack that no index lists, as `read_trailer`, keeping only those
        whose body is intact (known codec, content matches the id): ones to `adopt`."""
        table, body = await self._read_pack(pid)

        def intact(entry: tuple[bytes, int, int]) -> bool:
            key, off, n = entry
            return body[off : off + 1] == _PLAIN and digest(body[off + 1 : off + n]) == key[1:]

        kept = await trio.to_thread.run_sync(lambda: [e for e in table if intact(e)])
        return kept, len(body)

    # ------------------------------------------------------------------ index publication

    async def checkpoint(self) -> list[str]:
        """Write one fragment with the whole index; return the older fragments, which the
        caller deletes once the checkpoint is durable and recorded."""
        packs = dict(self.db.execute("SELECT id, size FROM packs"))
        rows = [list(r) for r in self.db.execute("SELECT key, pack, offset, length FROM blobs")]
        fkey = await self._put_fragment(packs, rows)
        old = [k for (k,) in self.db.execute("SELECT key FROM fragments") if k != fkey]
        self._pending_fragments.append(fkey)
        return old

    def forget_fragments(self, keys: list[str]) -> None:
        self.db.executemany("DELETE FROM fragments WHERE key=?", ((k,) for k in keys))

    async def scan_index(
        self, skip: set[str] | None = None, named: Iterable[str] = (), keep_absent: bool = False
    ) -> "IndexScan":
        """Read the index from the store (awaits only, nothing written): the packs listed,
        and the fragments (those not in `skip`), keeping entries whose pack is listed (the
        fragment with the highest seq wins, whatever the listing order: gc moved the blob
        to a newer pack, and the older one goes after the grace period). Without `skip`,
        also the trailers of packs that no fragment lists (a fragment lost, or a cycle
        that failed between its packs and its fragment): their own trailers say what they
        hold. Listings may lag: the fragments a catalog `named` are read whether listed or
        not, and a pack a fragment names that is not listed is asked for by HEAD."""
        present = {key.rsplit("/", 1)[1] for key in await self.store.list("p/")}
        fkeys = await self.store.list("i/")
        fkeys += sorted(set(named) - set(fkeys))
        scan = IndexScan(fkeys)
        docs = []
        for fkey in fkeys:
            if skip is None or fkey not in skip:
                docs.append(await self._read_fragment(fkey))
        await self._probe_unlisted(present, docs)
        if keep_absent:  # fsck of a store: what the fragments say, to name what is missing
            present.update(pid.hex() for doc in docs if doc is not None for pid in doc["packs"])
        placed: dict[bytes, tuple[int, int]] = {}  # blob → (seq, listing position) it has
        for position, doc in enumerate(docs):
            if doc is None:
                continue
            order = (int(doc.get("seq", NO_SEQ)), position)
            scan.newest = max(scan.newest, order[0])
            for pid, size in doc["packs"].items():
                if pid.hex() in present:
                    scan.sizes[pid] = size
            for key, pid, off, length in doc["blobs"]:
                if pid.hex() in present and order > placed.get(key, (NO_SEQ - 1, 0)):
                    scan.found[key] = (pid, off, length)
                    placed[key] = order
        if skip is None:
            for name in sorted(present - {pid.hex() for pid in scan.sizes}):
                pid = bytes.fromhex(name)
                try:
                    table, size = await self.read_trailer(pid)
                except ObjectNotFound:
                    continue  # deleted since the listing
                scan.sizes[pid] = size
                for key, off, length in table:
                    scan.found.setdefault(key, (pid, off, length))
        return scan

    async def _probe_unlisted(self, present: set[str], docs: list[dict | None]) -> None:
        """Add to `present` the packs the fragments name that a lagging listing left out
        but that are in the store (HEAD); a pack gc deleted stays out."""
        named = {pid.hex() for doc in docs if doc is not None for pid in doc["packs"]}
        for name in sorted(named - present):
            if await self.store.head(pack_key(bytes.fromhex(name))) is not None:
                present.add(name)

    async def _read_fragment(self, fkey: str) -> dict | None:
        """An index fragment, or None when it was deleted since the listing."""
        try:
            doc = codec.unpack(await self.store.get(fkey), f"{self.store.url}/{fkey}")
        except ObjectNotFound:
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IntegrityError(f"{self.store.url}/{fkey}: unsupported index fragment")
        return doc

    def apply_scan(self, scan: "IndexScan", replace: bool) -> None:
        """Inside the caller's transaction, with no await: take what `scan_index` read,
        instead of the index (replace) or on top of it (the scanned fragments win). The
        next fragment seq continues after the highest scanned."""
        if replace:
            for table in ("blobs", "packs", "fragments"):
                self.db.execute(f"DELETE FROM {table}")
        self.db.executemany(
            "INSERT OR REPLACE INTO blobs VALUES(?,?,?,?)",
            ((key, pid, off, length) for key, (pid, off, length) in scan.found.items()),
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO packs VALUES(?,?,0)", ((p, n) for p, n in scan.sizes.items())
        )
        self.db.executemany("INSERT OR IGNORE INTO fragments VALUES(?)", ((k,) for k in scan.fkeys))
        self._set_next_seq(max(self._next_seq(), scan.newest + 1))  # after every writer's
        self.recount_live()

    async def load_index(self, named: Iterable[str] = (), keep_absent: bool = False) -> None:
        """Fresh cache: rebuild `blobs` and `packs` from the published fragments and the
        trailers of packs no fragment lists (`scan_index`). The caller then releases what
        no root references (which deletes orphan packs, after the fence and a grace)."""
        self.apply_scan(await self.scan_index(named=named, keep_absent=keep_absent), replace=False)

    def live_mismatches(self) -> list[tuple[bytes, int, int]]:
        """Packs whose live bytes differ from the blobs the index places in them."""
        return list(
            self.db.execute(
                "SELECT p.id, p.live, COALESCE(SUM(b.length), 0) AS counted FROM packs p "
                "LEFT JOIN blobs b ON b.pack = p.id GROUP BY p.id HAVING p.live != counted"
            )
        )

    def recount_live(self) -> None:
        self.db.execute(
            "UPDATE packs SET live = (SELECT COALESCE(SUM(length), 0) FROM blobs "
            "WHERE blobs.pack = packs.id)"
        )

    def fragment_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM fragments")}

    def known_packs(self) -> set[bytes]:
        return {p for (p,) in self.db.execute("SELECT id FROM packs")}

    def forget_packs(self, pids: list[bytes]) -> None:
        """Inside a transaction: packs whose blobs all moved elsewhere."""
        self.db.executemany("DELETE FROM packs WHERE id=?", ((p,) for p in pids))

    def indexed_keys(self) -> set[bytes]:
        return {k for (k,) in self.db.execute("SELECT key FROM blobs")}

    def statistics(self) -> PackStatistics:
        n, size, live = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size),0), COALESCE(SUM(live),0) FROM packs"
        ).fetchone()
        frags = self.db.execute("SELECT COUNT(*) FROM fragments").fetchone()[0]
        return PackStatistics(n, size, live, frags)
