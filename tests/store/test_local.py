"""LocalStore durability: each put syncs its own data, and a barrier fsyncs exactly the
directories that gained entries since the last one (not the whole filesystem, which would
also write out the daemon's cache file)."""

import os

from snapfs.store import LocalStore


async def test_barrier_fsyncs_the_directories_that_gained_entries(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "store"))
    synced_files: list[int] = []
    synced_dirs: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fdatasync(fd):
        synced_files.append(fd)
        real_fdatasync(fd)

    def fsync(fd):
        synced_dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    root = str(tmp_path / "store")
    await store.put("p/ab/pack1", b"x" * 1000)
    await store.put("p/ab/pack2", b"y")
    await store.put_new("catalog/1", b"z")
    assert len(synced_files) == 3  # every object's data, in its put
    assert synced_dirs == []
    await store.barrier()
    assert sorted(synced_dirs) == sorted(
        [root, f"{root}/catalog", f"{root}/p", f"{root}/p/ab", str(tmp_path)]
    )
    synced_dirs.clear()
    await store.barrier()  # nothing new
    assert synced_dirs == []
    await store.put("p/ab/pack3", b"w")
    await store.barrier()
    assert synced_dirs == [f"{root}/p/ab"]
    assert await store.get("p/ab/pack1") == b"x" * 1000
