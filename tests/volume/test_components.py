"""The engine is wiring (issue 22 step 8): no base class, components that are objects, and
statistics assembled from the components' own."""

import dataclasses

import trio

from snapfs.store.memory import MemoryStore
from snapfs.volume import publish
from snapfs.volume.background import Background
from snapfs.volume.collector import Collector
from snapfs.volume.datapath import DataPath
from snapfs.volume.engine import Engine, EngineConfig, EngineStatistics
from snapfs.volume.flusher import Committer
from snapfs.volume.follow import Follower
from snapfs.volume.fsck import Checker
from snapfs.volume.references import References
from snapfs.volume.volumes import Volumes

COMPONENTS = (
    Engine,
    Volumes,
    Follower,
    DataPath,
    Committer,
    Collector,
    Background,
    References,
    Checker,
)


def test_engine_and_its_components_have_no_base_class():
    for cls in COMPONENTS:
        assert cls.__bases__ == (object,), f"{cls.__name__} inherits {cls.__bases__}"


async def test_statistics_are_the_components_own(tmp_path):
    store = MemoryStore()
    await publish.init_store(store)
    engine = await Engine.open(store, str(tmp_path / "c"), EngineConfig(cache_size=8 << 20))
    try:
        await engine.create_volume("v", 1 << 20, 4096)
        await engine.write("v", 0, b"x" * 8192)
        await engine.discard("v", 8192, 4096)
        await engine.sync()
        given: dict[str, str] = {}
        parts = {
            "space": engine.space,
            "refs": engine.refs,
            "data": engine.data,
            "committer": engine.committer,
            "collector": engine.collector,
            "background": engine.background,
            "fence": engine.fence,
        }
        for name, part in parts.items():
            for key in part.statistics():
                assert key not in given, f"{key} from {given[key]} and {name}"
                given[key] = name
        fields = {f.name for f in dataclasses.fields(EngineStatistics)}
        assert set(given) <= fields
        stats = engine.statistics()
        assert stats.discarded_bytes == 4096 and stats.deduplicated_blocks == 1
        assert stats.catalog_seq == stats.published_seq > 0
        await trio.lowlevel.checkpoint()
    finally:
        await engine.close()


def test_only_the_fence_deletes_from_the_store():
    """The collector (collect, gc, sweep) and fsck --repair delete through the fence, which
    deletes only while this writer holds the store and after the grace period; the lease
    module deletes its own lease object. Nothing else calls a store's delete."""
    import pathlib
    import re

    import snapfs

    root = pathlib.Path(snapfs.__file__).parent
    callers = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"store\.delete\b", path.read_text())
    }
    assert callers <= {"volume/fence.py", "volume/lease.py", "store/base.py"}, callers
