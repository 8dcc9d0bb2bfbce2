"""The engine against a plain bytearray model (no FUSE): random writes of any size and
offset, snapshots, deletes, clones, flushes, evictions, restarts and reads of any snapshot
must always equal the model, and the refcounts must always equal what the roots reference.
"""

import tempfile

import hypothesis.strategies as st
import trio
from hypothesis import HealthCheck, given, settings

from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 4096
SIZES = [8 * BS, 13 * BS + 512, 40 * BS]

KINDS = (
    ["write"] * 8
    + ["zero", "discard", "discard", "read", "read"]
    + [
        "snapshot",
        "snapshot",
        "snapshot",
        "delete_snapshot",
        "clone",
        "clone_head",
        "flush",
        "sync",
        "evict",
        "grow",
        "rollback",
        "restart",
        "gc",
    ]
)
# Every operation draws the same fields and uses those it needs; writes are most of them.
ops = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 99),
        st.floats(0, 1),
        st.integers(1, 3 * BS),
        st.integers(0, 255),
        st.booleans(),
    ),
    min_size=3,
    max_size=50,
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    ops=ops,
    sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=2),
    cache_blocks=st.sampled_from([12, 1000]),
)
async def test_engine_matches_model(ops, sizes, cache_blocks):
    with trio.fail_after(30):  # a hang is a bug: fail with a traceback instead
        await _run_model(ops, sizes, cache_blocks)


async def _run_model(ops, sizes, cache_blocks):
    store = MemoryStore()
    await publish.init_store(store)
    cache_dir = tempfile.mkdtemp(prefix="snapfs-model-")
    config = EngineConfig(
        cache_size=cache_blocks * BS,
        batch_bytes=5 * BS,
        slice_bytes=2 * BS,
        uploads=3,
        pack_size=3 * BS,
    )
    engine = await Engine.open(store, cache_dir, config)
    model: dict[str, bytearray] = {}
    snaps: dict[tuple[str, str], bytes] = {}
    counter = 0
    try:
        for i, size in enumerate(sizes):
            await engine.create_volume(f"v{i}", size, BS)
            model[f"v{i}"] = bytearray(size)

        def vol(k: int) -> str:
            names = sorted(model)
            return names[k % len(names)]

        for op in ops:
            kind = op[0]
            if kind in ("write", "zero", "read", "discard"):
                name = vol(op[1])
                size = len(model[name])
                off = min(int(op[2] * size), size - 1)
                n = min(op[3] * (8 if kind == "discard" and op[5] else 1), size - off)
                if kind == "read":
                    assert await engine.read(name, off, n) == bytes(model[name][off : off + n])
                    continue
                if kind == "discard":
                    before = engine.allocated_bytes(name)
                    await engine.discard(name, off, n)
                    model[name][off : off + n] = bytes(n)
                    assert engine.allocated_bytes(name) <= before
                    continue
                data = bytes((op[4] + j) % 256 for j in range(n)) if kind == "write" else bytes(n)
                await engine.write(name, off, data)
                model[name][off : off + n] = data
            elif kind == "snapshot":
                name = vol(op[1])
                counter += 1
                snap = f"s{counter}"
                await engine.create_snapshot(name, snap, temporary=op[5] and op[4] < 64)
                snaps[(name, snap)] = bytes(model[name])
            elif kind == "delete_snapshot" and snaps:
                key = sorted(snaps)[op[1] % len(snaps)]
                await engine.delete_snapshot(*key)
                del snaps[key]
            elif kind == "clone" and snaps:
                key = sorted(snaps)[op[1] % len(snaps)]
                counter += 1
                new = f"c{counter}"
                size = len(snaps[key]) + (3 * BS if op[5] else 0)
                await engine.create_volume(new, size, source=key)
                model[new] = bytearray(snaps[key]) + bytearray(size - len(snaps[key]))
            elif kind == "clone_head":
                name = vol(op[1])
                counter += 1
                tmp, new = f"t{counter}", f"h{counter}"
                await engine.create_snapshot(name, tmp, temporary=True)
                await engine.create_volume(new, len(model[name]), source=(name, tmp))
                await engine.delete_snapshot(name, tmp)
                model[new] = bytearray(model[name])
            elif kind == "flush":
                await engine.flush_once()
            elif kind == "sync":
                await engine.sync()
                report = await engine.check()
                assert report.clean, report.as_dict()
                for name, data in model.items():  # allocated = the blocks that are not zero
                    nonzero = sum(1 for b in range(0, len(data), BS) if any(data[b : b + BS]))
                    assert engine.allocated_bytes(name) == nonzero * BS, name
            elif kind == "gc":
                await engine.gc(threshold=0.2 + op[2] * 0.8)
                report = await engine.check()
                assert report.clean, report.as_dict()
            elif kind == "evict":
                engine.evict_all()
            elif kind == "grow":
                name = vol(op[1])
                grow = (op[4] % 20 + 1) * 512
                await engine.resize_volume(name, len(model[name]) + grow)
                model[name] += bytearray(grow)
            elif kind == "rollback" and snaps:
                key = sorted(snaps)[op[1] % len(snaps)]
                await engine.rollback(*key)
                model[key[0]] = bytearray(snaps[key])
            elif kind == "restart":
                await engine.close()
                if op[5]:  # store-only restore into an empty cache dir
                    cache_dir = tempfile.mkdtemp(prefix="snapfs-model-")
                    snaps = {k: v for k, v in snaps.items() if not k[1].startswith("t")}
                engine = await Engine.open(store, cache_dir, config)
                temporary = {(s.volume, s.name) for s in engine.catalog.snapshots()}
                snaps = {k: v for k, v in snaps.items() if k in temporary}

            for name in model:
                await check_allocated(engine, name)
            for (name, snap_name), data in snaps.items():
                if kind in ("sync", "restart"):
                    snap = await engine.wait_available(name, snap_name)
                    assert await engine.read_snapshot(snap, 0, len(data)) == data

        for name, data in model.items():
            assert await engine.read(name, 0, len(data)) == bytes(data), name
        await engine.sync()
        engine.evict_all()
        for name, data in model.items():
            assert await engine.read(name, 0, len(data)) == bytes(data), name
        for (name, snap_name), data in snaps.items():
            snap = await engine.wait_available(name, snap_name)
            assert await engine.read_snapshot(snap, 0, len(data)) == data
        report = await engine.check()
        assert report.clean, report.as_dict()
    finally:
        await engine.close(flush=False)


async def check_allocated(engine: Engine, name: str) -> None:
    """allocated = dirty blocks that are not discarded + clean blocks the tree maps."""
    head = engine.head(name)
    mapped = {b async for b, _ in engine.tree.items(head.row.root, head.row.root_level)}
    live = {b for b, d in head.dirty.items() if d.hole is None} | (mapped - set(head.dirty))
    assert engine.allocated_bytes(name) == len(live) * BS, name
