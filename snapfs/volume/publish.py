"""What goes to the store besides data: the manifest and the published catalog.

    manifest                       msgpack {format: 1, uuid: str, created: float}
    catalog/<seq:016x>             msgpack {format: 1, seq, created, volumes: [...],
                                            snapshots: [...]}   (write-once; newest wins)

A catalog object holds the volume and snapshot records only (names, sizes, roots, owners):
a few hundred bytes each, never refcounts or block maps, which any machine derives from the
roots. Each commit writes the next seq as a new object and removes the ones three behind,
so a reader always finds a complete one and nothing is rewritten in place.
"""

import time
import uuid

from snapfs import codec
from snapfs.errors import IntegrityError, NotFound, ObjectNotFound, StoreError
from snapfs.store.base import Store
from snapfs.volume.catalog import Catalog

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


async def latest_seq(store: Store) -> int:
    keys = await store.list(CATALOG_PREFIX)
    return max((int(k[len(CATALOG_PREFIX) :], 16) for k in keys), default=0)


async def latest_catalog(store: Store) -> dict | None:
    keys = await store.list(CATALOG_PREFIX)
    for key in reversed(keys):
        try:
            doc = codec.unpack(await store.get(key), f"{store.url}/{key}")
        except ObjectNotFound:
            continue  # removed by the writer between list and get: take the next
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            return doc
        raise IntegrityError(f"{store.url}/{key}: unsupported catalog format")
    return None


def catalog_doc(catalog: Catalog, seq: int) -> dict:
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
        }
        for s in catalog.snapshots()
        if s.state == "available" and not s.temporary
    ]
    return {
        "format": FORMAT,
        "seq": seq,
        "created": time.time(),
        "volumes": volumes,
        "snapshots": snapshots,
    }


async def write_catalog(store: Store, doc: dict) -> None:
    """Publish one catalog; the caller has made every object it references durable."""
    await store.put_new(catalog_key(doc["seq"]), codec.pack(doc))  # AlreadyExists: not ours
    await store.barrier()
    for key in await store.list(CATALOG_PREFIX):
        if int(key[len(CATALOG_PREFIX) :], 16) <= doc["seq"] - KEEP_CATALOGS:
            await store.delete(key)
