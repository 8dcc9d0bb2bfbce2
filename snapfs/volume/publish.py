"""What goes to the store besides data: the manifest and the published catalog.

    manifest                       msgpack {format: 1, uuid: str, created: float}
    catalog/<seq:016x>             msgpack {format: 1, seq, created, writer, changes,
                                            volumes: [...], snapshots: [...],
                                            references: [...]}   (absent before references)
                                   (write-once; newest wins)

A catalog object holds the volume, snapshot and reference records only (names, sizes,
roots, owners; an inbound reference's pins):
a few hundred bytes each, never refcounts or block maps, which any machine derives from the
roots. Sequences are contiguous: each publish is a conditional put of the newest seq + 1
(volume/fence.py), so two writers can never both publish the same seq, and the newest is
found by probing upwards from the listing (`newest_seq`), not by trusting the listing. `writer`
is the publishing cache dir's token (it recognises its own catalog after a lost reply or a
crash) and `changes` the local change counter the document covers. The three newest are kept;
older ones are deleted a grace period after they fell out of those three (which frees their
seq for a `put_new`: the fence checks for a newer catalog after it published and before it
deletes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

from snapfs import codec
from snapfs.errors import IntegrityError, NotFound, ObjectNotFound, StoreError
from snapfs.store.base import Store
from snapfs.volume.catalog import Catalog, ReferenceRow

if TYPE_CHECKING:
    from snapfs.chunks import ChunkStore
    from snapfs.volume.fence import Fence

FORMAT = 1
MANIFEST = "manifest"
CATALOG_PREFIX = "catalog/"
KEEP_CATALOGS = 3


def catalog_key(seq: int) -> str:
    return f"{CATALOG_PREFIX}{seq:016x}"


async def init_store(store: Store) -> dict:
    """Write a manifest into an empty store. Refuses a foreign or an initialised store."""
    if await store.head(MANIFEST) is not None:
        raise StoreError(f"{store.url}: already a snapfs store")
    keys = await store.list("")
    if keys:
        raise StoreError(f"{store.url}: not empty and not a snapfs store ({len(keys)} objects)")
    manifest = {"format": FORMAT, "uuid": str(uuid.uuid4()), "created": time.time()}
    await store.put(MANIFEST, codec.pack(manifest))
    await store.barrier()
    return manifest


async def read_manifest(store: Store) -> dict:
    try:
        manifest = codec.unpack(await store.get(MANIFEST), f"{store.url}/{MANIFEST}")
    except ObjectNotFound:
        raise NotFound(f"{store.url}: not a snapfs store (run 'snapfs init' first)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{store.url}/{MANIFEST}: unsupported format")
    return manifest


def catalog_seq_of(key: str) -> int | None:
    try:
        return int(key[len(CATALOG_PREFIX) :], 16)
    except ValueError:
        return None


async def listed_seqs(store: Store) -> list[int]:
    seqs = (catalog_seq_of(k) for k in await store.list(CATALOG_PREFIX))
    return sorted(s for s in seqs if s is not None)


async def newest_seq(store: Store, known: int = 0) -> int:
    """The newest catalog seq in the store: the highest listed (or `known`, a seq known to
    exist), then HEAD of the next ones until one is absent. Sequences are contiguous, so a
    container listing that lags behind (Swift's does) cannot hide a newer catalog."""
    seq = max([known, *await listed_seqs(store)])
    while await store.head(catalog_key(seq + 1)) is not None:
        seq += 1
    return seq


async def read_catalog(store: Store, seq: int) -> dict | None:
    """Catalog `seq`, or None when absent."""
    key = catalog_key(seq)
    try:
        doc = codec.unpack(await store.get(key), f"{store.url}/{key}")
    except ObjectNotFound:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IntegrityError(f"{store.url}/{key}: unsupported catalog format")
    return doc


async def latest_catalog(store: Store, known: int = 0) -> dict | None:
    for _attempt in range(5):
        seq = await newest_seq(store, known)
        if seq == 0:
            return None
        doc = await read_catalog(store, seq)
        if doc is not None:
            return doc
    raise StoreError(f"{store.url}: catalog {seq} is listed but cannot be read")


def catalog_doc(
    catalog: Catalog, seq: int, writer: str = "", changes: int = 0, fragments: Iterable[str] = ()
) -> dict:
    """The catalog document: the volumes and available snapshots, and the index fragments
    that place every object they reference (a reader GETs them by name: a store listing
    may lag behind a catalog found by probing)."""
    volumes = [
        {
            "name": v.name,
            "size": v.size,
            "block_size": v.block_size,
            "root": v.root,
            "root_level": v.root_level,
            "owner": v.owner,
            "created": v.created,
            "parent": v.parent,
        }
        for v in catalog.volumes()
    ]
    snapshots = [
        {
            "volume": s.volume,
            "name": s.name,
            "size": s.size,
            "block_size": s.block_size,
            "root": s.root,
            "root_level": s.root_level,
            "owner": s.owner,
            "created": s.created,
            "epoch": s.epoch,
            "guid": s.guid,
        }
        for s in catalog.snapshots()
        if s.state == "available" and not s.temporary
    ]
    references = [asdict(r) for r in catalog.references()]
    return _doc(seq, writer, changes, volumes, snapshots, sorted(fragments), references)


def fence_doc(doc: dict | None, seq: int, writer: str) -> dict:
    """The fence of a fresh cache dir: the records of `doc` (the newest catalog, or None)
    again as `seq`, with the token of the writer that restores them; no local change."""
    if doc is None:
        return _doc(seq, writer, 0, [], [])
    return _doc(
        seq,
        writer,
        0,
        doc["volumes"],
        doc["snapshots"],
        doc.get("fragments", []),
        doc.get("references", []),
    )


def doc_references(doc: dict) -> list[ReferenceRow]:
    """The reference records of a catalog document (none in one of an older version)."""
    return [ReferenceRow(**r) for r in doc.get("references", ())]


def doc_roots(doc: dict) -> list[tuple[bytes | None, int]]:
    """(root, block size) of everything a catalog document keeps alive: each volume head,
    each snapshot, and the nodes each reference holds. Refcounts are derived from them."""
    roots = [(v["root"], v["block_size"]) for v in doc["volumes"]]
    roots += [(s["root"], s["block_size"]) for s in doc["snapshots"]]
    roots += [(node, r.block_size) for r in doc_references(doc) for node in r.held()]
    return roots


def _doc(
    seq: int,
    writer: str,
    changes: int,
    volumes: list,
    snapshots: list,
    fragments: Iterable[str] = (),
    references: Iterable = (),
) -> dict:
    return {
        "references": list(references),
        "fragments": list(fragments),
        "format": FORMAT,
        "seq": seq,
        "created": time.time(),
        "writer": writer,
        "changes": changes,
        "volumes": volumes,
        "snapshots": snapshots,
    }


async def publish_catalog(fence: Fence, catalog: Catalog, chunks: ChunkStore) -> None:
    """Publish the catalog as the next write-once object (the fence decides whether and at
    which seq; ReadOnly once this writer lost the store: it publishes nothing from then
    on)."""
    await fence.publish(
        lambda seq, writer, changes: catalog_doc(
            catalog, seq, writer, changes, chunks.fragment_keys()
        )
    )
