"""Object stores, and the one place where a store URL becomes a composed store."""

from urllib.parse import urlsplit

from snapfs.errors import InvalidArgument
from snapfs.store.base import Store
from snapfs.store.local import LocalStore, check_local_root
from snapfs.store.memory import MemoryStore

__all__ = ["LocalStore", "MemoryStore", "Store", "open_store"]


def open_store(url: str) -> Store:
    """`file:///abs/path` or `swift://host:port/container` (credentials from ST_*/OS_* env)."""
    if not isinstance(url, str) or len(url) > 4096:
        raise InvalidArgument("invalid store URL")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise InvalidArgument(f"invalid store URL {url!r}: expected file:///absolute/path")
        check_local_root(parts.path)
        return LocalStore(parts.path)
    if parts.scheme == "memory":
        return MemoryStore()
    if parts.scheme in ("swift", "swift+https"):
        if parts.username or parts.password:
            raise InvalidArgument(
                "store URL must not contain credentials: set ST_AUTH/ST_USER/ST_KEY "
                "(or OS_*) in the environment"
            )
        from snapfs.store.swift import SwiftStore

        return SwiftStore.from_url(url)
    shown = url.split("@")[-1][:80]
    raise InvalidArgument(
        f"unsupported store URL {shown!r}: use file:///path or swift://host:port/container"
    )
