"""The stores' own throughput, without snapfs: what a flush or a cold read could reach.

Local: `threads` threads each write whole objects to a temporary file and rename it into
place (no fsync per object), then one syncfs of the store (the cheapest durable batch when
nothing else on the filesystem is dirty). Reads: the same objects, page cache dropped
first, `threads` at a time.
Swift: python-swiftclient PUTs and GETs, one Connection per thread.
"""

import ctypes
import os
import queue
import time
from pathlib import Path

from bench.sysutil import evict, parallel

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def local_put_get(root: Path, obj_size: int, total: int, threads: int = 8) -> dict:
    """{"put_MBps", "get_MBps", "objects"} for `total` bytes in objects of `obj_size`."""
    root.mkdir(parents=True, exist_ok=True)
    n = max(1, total // obj_size)
    data = os.urandom(obj_size)
    names = [f"{i:08x}" for i in range(n)]
    for sub in {name[-2:] for name in names}:
        (root / sub).mkdir(exist_ok=True)

    def put(name: str) -> None:
        path = root / name[-2:] / name
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)

    t = time.perf_counter()
    parallel(put, names, threads)
    _syncfs(root)
    put_s = time.perf_counter() - t
    evict([root])

    def get(name: str) -> int:
        with open(root / name[-2:] / name, "rb", buffering=0) as f:
            return len(f.read())

    t = time.perf_counter()
    got = sum(parallel(get, names, threads))
    get_s = time.perf_counter() - t
    return _rates(n, obj_size, threads, put_s, got, get_s)


def swift_put_get(
    container: str, obj_size: int, total: int, threads: int = 8, cold_dirs: tuple[Path, ...] = ()
) -> dict:
    """The same with python-swiftclient against the Swift in ST_AUTH/ST_USER/ST_KEY
    (`cold_dirs`: the Swift's data, evicted from the page cache before the GETs)."""
    from swiftclient.client import Connection

    pool: queue.Queue = queue.Queue()
    for _ in range(threads):  # authenticated before the clock starts, as the store's are
        c = Connection(
            authurl=os.environ["ST_AUTH"],
            user=os.environ["ST_USER"],
            key=os.environ["ST_KEY"],
            retries=2,
        )
        c.get_auth()
        pool.put(c)

    def with_conn(fn):
        def run(name: str):
            c = pool.get()
            try:
                return fn(c, name)
            finally:
                pool.put(c)

        return run

    c = pool.get()
    c.put_container(container)
    pool.put(c)
    n = max(1, total // obj_size)
    data = os.urandom(obj_size)
    names = [f"o/{i:08x}" for i in range(n)]
    t = time.perf_counter()
    parallel(with_conn(lambda c, name: c.put_object(container, name, data)), names, threads)
    put_s = time.perf_counter() - t
    evict(cold_dirs)
    t = time.perf_counter()
    got = sum(
        parallel(with_conn(lambda c, name: len(c.get_object(container, name)[1])), names, threads)
    )
    get_s = time.perf_counter() - t
    while not pool.empty():
        pool.get().close()
    return _rates(n, obj_size, threads, put_s, got, get_s)


def _rates(n: int, obj_size: int, threads: int, put_s: float, got: int, get_s: float) -> dict:
    return {
        "objects": n,
        "object_size": obj_size,
        "threads": threads,
        "put_MBps": n * obj_size / put_s / 1e6,
        "get_MBps": got / get_s / 1e6,
    }
