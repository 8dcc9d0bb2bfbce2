"""The local catalog: SQLite in WAL mode, one transaction per metadata change.

Tables (all in one file, <cache-dir>/catalog.sqlite3):

    meta(key, value)                       store uuid, catalog seq, published seq, clean flag
    volumes(id, name, size, block_size, root, root_level, epoch, owner, created, parent)
    snapshots(id, volume, name, epoch, state, root, root_level, size, block_size,
              created, temporary, owner, guid)   guid: the snapshot's identity (32 hex
                                           digits), kept by send/receive (snapfs/stream.py)
    refs(key, count, size)                 key = kind byte (b'c' | b'n') + 32-byte digest;
                                           count 0 only for a node in `drops`
    drops(key)                             tree nodes whose count reached zero and whose
                                           children still hold a count from them: collect
                                           expands them in batches (volume/refcounts.py)
    dirty(volume_id, blk, epoch)           blocks of a head not yet in its committed tree
    frozen(volume_id, snap_epoch, blk, slot)  copy-on-write saves for snapshots in `creating`
    present(volume_id, blk)                clean cached blocks, written only at clean shutdown
    garbage(key, since)                    blobs whose count reached zero (since NULL: they
                                           leave the index once a catalog without them is
                                           published), and store objects to delete (packs,
                                           old index fragments, old catalogs) with the time
                                           (this host's clock) they stopped being needed:
                                           deleted `grace` seconds after (volume/fence.py)
    orphans(key, seen)                     store objects no catalog knows, first seen when:
                                           the sweep deletes them `grace` seconds after
    snaprefs(id, name, description, state, root, root_level, size, block_size, source,
             guid, owner, created, pins)   references: snapshot trees kept alive outside
                                           any volume (volume/references.py); state
                                           'inbound' (being copied in: `pins` holds the
                                           complete subtrees copied so far, 32-byte node ids
                                           back to back) or 'available' (holds its root)

refs, drops, the present list and garbage are derived or transient: a fresh machine rebuilds refs
from the published catalog by walking every root (see volume/check.py).
"""

import contextlib
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from snapfs.chunks import INDEX_SCHEMA, digest
from snapfs.errors import CatalogFailed, InvalidArgument

log = logging.getLogger("snapfs.catalog")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS volumes(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, size INTEGER NOT NULL,
    block_size INTEGER NOT NULL, root BLOB, root_level INTEGER NOT NULL, epoch INTEGER NOT NULL,
    owner INTEGER NOT NULL, created REAL NOT NULL, parent TEXT);
CREATE TABLE IF NOT EXISTS snapshots(
    id INTEGER PRIMARY KEY AUTOINCREMENT, volume TEXT NOT NULL, name TEXT NOT NULL,
    epoch INTEGER NOT NULL, state TEXT NOT NULL, root BLOB, root_level INTEGER NOT NULL,
    size INTEGER NOT NULL, block_size INTEGER NOT NULL, created REAL NOT NULL,
    temporary INTEGER NOT NULL, owner INTEGER NOT NULL, guid TEXT, UNIQUE(volume, name));
CREATE TABLE IF NOT EXISTS refs(key BLOB PRIMARY KEY, count INTEGER NOT NULL,
    size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dirty(volume_id INTEGER, blk INTEGER, epoch INTEGER NOT NULL,
    PRIMARY KEY(volume_id, blk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frozen(volume_id INTEGER, snap_epoch INTEGER, blk INTEGER,
    slot INTEGER NOT NULL, PRIMARY KEY(volume_id, snap_epoch, blk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS present(volume_id INTEGER, blk INTEGER,
    PRIMARY KEY(volume_id, blk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops(key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS garbage(key BLOB PRIMARY KEY, since REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS orphans(key TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snaprefs(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL, state TEXT NOT NULL,
    root BLOB, root_level INTEGER NOT NULL, size INTEGER NOT NULL, block_size INTEGER NOT NULL,
    source TEXT NOT NULL, guid TEXT NOT NULL, owner INTEGER NOT NULL, created REAL NOT NULL,
    pins BLOB NOT NULL) WITHOUT ROWID;
"""

# Kinds of garbage rows (the key's first byte): blobs, and objects to delete from the store.
BLOB_KINDS = (b"c", b"n")
STORE_KINDS = (b"p", b"i", b"g")  # pack, index fragment, catalog object


@dataclass
class VolumeRow:
    id: int
    name: str
    size: int
    block_size: int
    root: bytes | None
    root_level: int
    epoch: int
    owner: int
    created: float
    parent: str | None


@dataclass
class SnapshotRow:
    id: int
    volume: str
    name: str
    epoch: int
    state: str
    root: bytes | None
    root_level: int
    size: int
    block_size: int
    created: float
    temporary: int
    owner: int
    guid: str


@dataclass
class ReferenceRow:
    id: str
    name: str
    description: str
    state: str  # 'inbound' | 'available'
    root: bytes | None
    root_level: int
    size: int
    block_size: int
    source: str
    guid: str
    owner: int
    created: float
    pins: bytes  # inbound: the node ids it holds, 32 bytes each (repeats count)

    def held(self) -> list[bytes]:
        """The tree nodes this reference holds one count on: its root once available,
        the complete subtrees copied so far while inbound."""
        if self.state == "available":
            return [] if self.root is None else [self.root]
        return [self.pins[i : i + 32] for i in range(0, len(self.pins), 32)]


GUID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_guid() -> str:
    """A fresh snapshot identity: 16 random bytes, in hex."""
    return secrets.token_hex(16)


def check_guid(text: str) -> str:
    """A snapshot identity a user gives: 32 hex digits (case ignored), returned lowercase."""
    guid = str(text).lower()
    if not GUID_RE.match(guid) or guid == "0" * 32:
        raise InvalidArgument(f"invalid snapshot guid {str(text)[:40]!r}: 32 hex digits, not all 0")
    return guid


def legacy_guid(volume: str, name: str, created: float, epoch: int) -> str:
    """The identity of a snapshot made before snapshots had one (a cache dir or a published
    catalog of an older version): derived from its record, so that a writer's migration, a
    restore and a read-only mount of the same old record all agree on it."""
    return digest(f"{volume}\0{name}\0{created!r}\0{epoch}".encode())[:16].hex()


class Catalog:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA + INDEX_SCHEMA)
        self._depth = 0
        self.failed: str | None = None  # why a change could not be made durable
        self._migrate()

    def _migrate(self) -> None:
        """Cache dirs written by older versions: garbage rows had no time (store objects
        queued then wait a grace period from now); snapshots had no guid (each gets
        `legacy_guid`); there were no references (the `snaprefs` table is created empty by
        SCHEMA's CREATE IF NOT EXISTS: nothing to convert)."""
        self._migrate_guid()
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(garbage)")}
        if "since" not in cols:
            with self.transaction():
                self.db.execute("ALTER TABLE garbage ADD COLUMN since REAL")
                self.db.execute(
                    "UPDATE garbage SET since=? WHERE substr(key,1,1) NOT IN (?, ?)",
                    (time.time(), *BLOB_KINDS),
                )

    def _migrate_guid(self) -> None:
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(snapshots)")}
        if "guid" in cols:
            return
        with self.transaction():
            self.db.execute("ALTER TABLE snapshots ADD COLUMN guid TEXT")
            rows = self.db.execute("SELECT id, volume, name, created, epoch FROM snapshots")
            for sid, volume, name, created, epoch in list(rows):
                guid = legacy_guid(volume, name, created, epoch)
                self.db.execute("UPDATE snapshots SET guid=? WHERE id=?", (guid, sid))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable change. Nested uses join the outer transaction. When SQLite
        fails (EIO, ENOSPC, a commit that cannot be made durable) the change is rolled
        back and this catalog fails for good: CatalogFailed now and at every later
        transaction, until it is opened again (the callers change their memory only after
        the transaction, but a writer whose catalog fails mid-flight must stop)."""
        if self.failed is not None:
            raise CatalogFailed(f"the local catalog failed earlier ({self.failed}): remount")
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.db
            except BaseException:
                self._depth = 0
                self._rollback()
                raise
            self._depth = 0
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._depth = 0
            self._rollback()
            self.failed = str(exc)
            log.error("the local catalog failed: %s; changing nothing more until remounted", exc)
            raise CatalogFailed(f"the local catalog failed ({exc}): remount") from None

    def _rollback(self) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    # meta
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    # volumes
    def volumes(self) -> list[VolumeRow]:
        return [VolumeRow(*r) for r in self.db.execute("SELECT * FROM volumes ORDER BY name")]

    def volume(self, name: str) -> VolumeRow | None:
        r = self.db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        return VolumeRow(*r) if r else None

    def add_volume(
        self,
        name: str,
        size: int,
        block_size: int,
        root: bytes | None,
        root_level: int,
        owner: int,
        parent: str | None,
        created: float | None = None,
    ) -> int:
        cur = self.db.execute(
            "INSERT INTO volumes(name, size, block_size, root, root_level, epoch, owner,"
            " created, parent) VALUES(?,?,?,?,?,0,?,?,?)",
            (name, size, block_size, root, root_level, owner, created or time.time(), parent),
        )
        return int(cur.lastrowid or 0)

    def update_volume(self, vid: int, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE volumes SET {cols} WHERE id=?", (*fields.values(), vid))

    def delete_volume(self, vid: int) -> None:
        for table in ("dirty", "frozen", "present"):
            self.db.execute(f"DELETE FROM {table} WHERE volume_id=?", (vid,))
        self.db.execute("DELETE FROM volumes WHERE id=?", (vid,))

    # snapshots
    def snapshots(self, volume: str | None = None) -> list[SnapshotRow]:
        if volume is None:
            rows = self.db.execute("SELECT * FROM snapshots ORDER BY volume, epoch, id")
        else:
            rows = self.db.execute(
                "SELECT * FROM snapshots WHERE volume=? ORDER BY epoch, id", (volume,)
            )
        return [SnapshotRow(*r) for r in rows]

    def snapshot(self, volume: str, name: str) -> SnapshotRow | None:
        r = self.db.execute(
            "SELECT * FROM snapshots WHERE volume=? AND name=?", (volume, name)
        ).fetchone()
        return SnapshotRow(*r) if r else None

    def snapshot_by_id(self, sid: int) -> SnapshotRow | None:
        r = self.db.execute("SELECT * FROM snapshots WHERE id=?", (sid,)).fetchone()
        return SnapshotRow(*r) if r else None

    def add_snapshot(
        self,
        volume: str,
        name: str,
        epoch: int,
        state: str,
        root: bytes | None,
        root_level: int,
        size: int,
        block_size: int,
        temporary: bool,
        owner: int,
        created: float | None = None,
        guid: str | None = None,
    ) -> int:
        """A new snapshot record; `guid` None: a fresh identity."""
        cur = self.db.execute(
            "INSERT INTO snapshots(volume, name, epoch, state, root, root_level, size,"
            " block_size, created, temporary, owner, guid) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                volume,
                name,
                epoch,
                state,
                root,
                root_level,
                size,
                block_size,
                created or time.time(),
                int(temporary),
                owner,
                guid or new_guid(),
            ),
        )
        return int(cur.lastrowid or 0)

    def snapshot_by_guid(self, volume: str, guid: str) -> SnapshotRow | None:
        r = self.db.execute(
            "SELECT * FROM snapshots WHERE volume=? AND guid=?", (volume, guid)
        ).fetchone()
        return SnapshotRow(*r) if r else None

    def update_snapshot(self, sid: int, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE snapshots SET {cols} WHERE id=?", (*fields.values(), sid))

    def delete_snapshot(self, sid: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id=?", (sid,))

    # references (snaprefs)
    def references(self) -> list[ReferenceRow]:
        rows = self.db.execute("SELECT * FROM snaprefs ORDER BY created, id")
        return [ReferenceRow(*r) for r in rows]

    def reference(self, rid: str) -> ReferenceRow | None:
        r = self.db.execute("SELECT * FROM snaprefs WHERE id=?", (rid,)).fetchone()
        return ReferenceRow(*r) if r else None

    def add_reference(self, row: ReferenceRow) -> None:
        self.db.execute(
            "INSERT INTO snaprefs VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            tuple(getattr(row, f) for f in ReferenceRow.__dataclass_fields__),
        )

    def update_reference(self, rid: str, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE snaprefs SET {cols} WHERE id=?", (*fields.values(), rid))

    def delete_reference(self, rid: str) -> None:
        self.db.execute("DELETE FROM snaprefs WHERE id=?", (rid,))

    # refs
    def ref(self, key: bytes) -> int:
        r = self.db.execute("SELECT count FROM refs WHERE key=?", (key,)).fetchone()
        return r[0] if r else 0

    def has_ref(self, key: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM refs WHERE key=?", (key,)).fetchone() is not None

    def apply_refs(self, deltas: dict[bytes, int], sizes: dict[bytes, int]) -> list[bytes]:
        """Add deltas to counts (creating rows with `sizes`). A chunk whose count reaches
        zero loses its row and is queued as garbage; a node keeps a row of count 0 and goes
        on the `drops` queue (its children still hold a count from it), and leaves the
        queue when counted again. Returns the chunks that became garbage."""
        dead = []
        for key, delta in deltas.items():
            if delta == 0 and key not in sizes:
                continue
            r = self.db.execute("SELECT count FROM refs WHERE key=?", (key,)).fetchone()
            count = (r[0] if r else 0) + delta
            if count < 0:
                raise AssertionError(f"refcount of {key.hex()} would drop below zero")
            if count == 0 and key[:1] != b"n":
                if r:
                    self.db.execute("DELETE FROM refs WHERE key=?", (key,))
                self.db.execute("INSERT OR IGNORE INTO garbage(key) VALUES(?)", (key,))
                dead.append(key)
                continue
            if r:
                self.db.execute("UPDATE refs SET count=? WHERE key=?", (count, key))
            else:
                self.db.execute(
                    "INSERT INTO refs(key, count, size) VALUES(?,?,?)", (key, count, sizes[key])
                )
                self.db.execute("DELETE FROM garbage WHERE key=?", (key,))
            if count == 0:
                self.db.execute("INSERT OR IGNORE INTO drops(key) VALUES(?)", (key,))
            elif r and r[0] == 0:
                self.db.execute("DELETE FROM drops WHERE key=?", (key,))
        return dead

    def drops(self, limit: int | None = None) -> list[bytes]:
        """Queued nodes (count 0, children not yet decremented), `limit` of them."""
        sql = "SELECT key FROM drops" + ("" if limit is None else " LIMIT ?")
        return [r[0] for r in self.db.execute(sql, () if limit is None else (limit,))]

    def expanded(self, keys: Iterable[bytes]) -> None:
        """Queued nodes whose children were decremented: their zero rows go, and they are
        garbage (they leave the index once a catalog without them is out)."""
        for key in keys:
            r = self.db.execute("SELECT count FROM refs WHERE key=?", (key,)).fetchone()
            assert r is not None and r[0] == 0, f"expanding {key.hex()}: count {r}"
            self.db.execute("DELETE FROM refs WHERE key=?", (key,))
            self.db.execute("DELETE FROM drops WHERE key=?", (key,))
            self.db.execute("INSERT OR IGNORE INTO garbage(key) VALUES(?)", (key,))

    def all_refs(self) -> dict[bytes, tuple[int, int]]:
        return {k: (c, s) for k, c, s in self.db.execute("SELECT key, count, size FROM refs")}

    def replace_refs(self, refs: dict[bytes, tuple[int, int]]) -> None:
        """The counts recomputed from the roots (and the queue, when they include it: a
        queued node's count is 0); a queue entry without a zero count goes."""
        old = {k: s for k, _c, s in self.db.execute("SELECT key, count, size FROM refs")}
        self.db.execute("DELETE FROM refs")
        self.db.executemany(
            "INSERT INTO refs(key, count, size) VALUES(?,?,?)",
            ((k, c, s or old.get(k, 0)) for k, (c, s) in refs.items()),
        )
        self.db.execute("DELETE FROM drops WHERE key NOT IN (SELECT key FROM refs WHERE count=0)")

    def referenced_bytes(self, kind: bytes | None = None) -> int:
        if kind is None:
            r = self.db.execute("SELECT COALESCE(SUM(size),0), COUNT(*) FROM refs").fetchone()
        else:
            r = self.db.execute(
                "SELECT COALESCE(SUM(size),0), COUNT(*) FROM refs WHERE substr(key,1,1)=?", (kind,)
            ).fetchone()
        return int(r[0])

    def ref_count_rows(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0])

    # garbage
    def garbage(self, kinds: Iterable[bytes] = (), limit: int = -1) -> list[bytes]:
        """Garbage keys (of `kinds` only, when given; `limit` of them)."""
        if not kinds:
            return [r[0] for r in self.db.execute("SELECT key FROM garbage LIMIT ?", (limit,))]
        kinds = tuple(kinds)
        marks = ",".join("?" for _ in kinds)
        sql = f"SELECT key FROM garbage WHERE substr(key, 1, 1) IN ({marks}) LIMIT ?"
        return [r[0] for r in self.db.execute(sql, (*kinds, limit))]

    def add_garbage(self, keys: Iterable[bytes], since: float | None = None) -> None:
        """Queue blobs (since None) or store objects to delete (since: when the last
        catalog or index that needed them was replaced)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO garbage(key, since) VALUES(?, ?)", ((k, since) for k in keys)
        )

    def stamp_garbage(self, kinds: Iterable[bytes], since: float) -> bool:
        """Give the store objects of `kinds` queued without a time the time `since`;
        whether there were any."""
        marks = ",".join("?" for _ in kinds)
        cur = self.db.execute(
            f"UPDATE garbage SET since=? WHERE since IS NULL AND substr(key, 1, 1) IN ({marks})",
            (since, *kinds),
        )
        return cur.rowcount > 0

    def unstamped_garbage(self, kinds: Iterable[bytes]) -> bool:
        marks = ",".join("?" for _ in kinds)
        row = self.db.execute(
            f"SELECT 1 FROM garbage WHERE since IS NULL AND substr(key, 1, 1) IN ({marks}) LIMIT 1",
            tuple(kinds),
        ).fetchone()
        return row is not None

    def timed_garbage(self, kinds: Iterable[bytes], limit: int = 5) -> list[bytes]:
        """Up to `limit` keys of `kinds` queued with a time (fsck: blobs must have none)."""
        kinds = tuple(kinds)
        marks = ",".join("?" for _ in kinds)
        sql = (
            f"SELECT key FROM garbage WHERE since IS NOT NULL AND substr(key, 1, 1) IN ({marks})"
            " LIMIT ?"
        )
        return [r[0] for r in self.db.execute(sql, (*kinds, limit))]

    def forget_garbage(self, keys: Iterable[bytes]) -> None:
        self.db.executemany("DELETE FROM garbage WHERE key=?", ((k,) for k in keys))

    def due_garbage(self, cutoff: float) -> list[bytes]:
        """Store objects queued for deletion at or before `cutoff`."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT key FROM garbage WHERE since IS NOT NULL AND since <= ? ORDER BY since",
                (cutoff,),
            )
        ]

    def next_garbage_time(self) -> float | None:
        r = self.db.execute("SELECT MIN(since) FROM garbage WHERE since IS NOT NULL").fetchone()
        return None if r[0] is None else float(r[0])

    # orphans: store objects no catalog knows, with the time the sweep first saw them
    def orphans(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT key, seen FROM orphans"))

    def set_orphans(self, seen: dict[str, float]) -> None:
        self.db.execute("DELETE FROM orphans")
        self.db.executemany("INSERT INTO orphans(key, seen) VALUES(?, ?)", seen.items())

    # dirty / frozen / present
    def dirty(self, vid: int) -> dict[int, int]:
        return dict(self.db.execute("SELECT blk, epoch FROM dirty WHERE volume_id=?", (vid,)))

    def set_dirty(self, vid: int, items: Iterable[tuple[int, int]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO dirty(volume_id, blk, epoch) VALUES(?,?,?)",
            ((vid, b, e) for b, e in items),
        )

    def clear_dirty(self, vid: int, blks: Iterable[int]) -> None:
        self.db.executemany(
            "DELETE FROM dirty WHERE volume_id=? AND blk=?", ((vid, b) for b in blks)
        )

    def frozen(self, vid: int) -> list[tuple[int, int, int]]:
        return list(
            self.db.execute("SELECT snap_epoch, blk, slot FROM frozen WHERE volume_id=?", (vid,))
        )

    def add_frozen(self, vid: int, snap_epoch: int, blk: int, slot: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO frozen VALUES(?,?,?,?)", (vid, snap_epoch, blk, slot)
        )

    def clear_frozen(self, vid: int, snap_epoch: int) -> None:
        self.db.execute("DELETE FROM frozen WHERE volume_id=? AND snap_epoch=?", (vid, snap_epoch))

    def take_present(self) -> list[tuple[int, int]]:
        rows = list(self.db.execute("SELECT volume_id, blk FROM present"))
        self.db.execute("DELETE FROM present")
        return rows

    def save_present(self, items: Iterable[tuple[int, int]]) -> None:
        self.db.execute("DELETE FROM present")
        self.db.executemany("INSERT OR IGNORE INTO present VALUES(?,?)", items)
