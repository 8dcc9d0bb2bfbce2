"""Peak memory of deleting a snapshot of a large sparse volume (issue 22, step 9).

    PYTHONPATH=<tree> python bench/drop_rss.py [--gib 64] [--mib 512] [--bs-kib 64]

Setup (in this process): a local `file://` store in a temp dir, a volume of `--gib` GiB,
`--mib` MiB written in blocks of distinct random content spread evenly over it (so the
tree has as many leaves as it can), snapshot `s`, then the volume rolled back to a snapshot
taken before the writes (empty): `s` alone holds the tree. Then, in a fresh process each
(so that the setup's memory is not counted), on a copy of the store and cache dir: open
the engine, `delete_snapshot` + `sync` (which, with streaming decrements, expands the
whole queue), and print the RSS before the delete and the peak RSS during it (VmHWM, reset
after the open: opening loads the whole index, and ru_maxrss would show that peak), and in
a second run the tracemalloc peak of the delete alone (Python allocations). Works on the
code before and after the change (it uses only the public engine API).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import trio

from snapfs.store import LocalStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last `reset_peak`) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Linux: VmHWM starts again from the current RSS (opening the engine loads the whole
    index, whose peak would hide the delete's)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def setup(root: str, gib: int, mib: int, bs: int) -> dict:
    store = LocalStore(os.path.join(root, "store"))
    await publish.init_store(store)
    engine = await Engine.open(store, os.path.join(root, "cache"), EngineConfig(grace=0))
    size = gib << 30
    await engine.create_volume("v", size, bs)
    await engine.create_snapshot("v", "empty")
    blocks = (mib << 20) // bs
    stride = (size // bs) // blocks
    start = time.monotonic()
    for i in range(blocks):
        await engine.write("v", i * stride * bs, os.urandom(bs))
        if i % 2048 == 2047:
            await engine.sync()
    await engine.create_snapshot("v", "s")
    await engine.sync()
    await engine.rollback("v", "empty")  # s alone holds the written tree now
    await engine.sync()
    stats = engine.statistics()
    await engine.close()
    return {
        "volume_gib": gib,
        "written_mib": mib,
        "block_kib": bs >> 10,
        "chunks": blocks,
        "stored_objects": stats.stored_objects,
        "setup_s": round(time.monotonic() - start, 1),
    }


async def delete(root: str, trace: bool, drop_batch: int) -> dict:
    store = LocalStore(os.path.join(root, "store"))
    config = EngineConfig(grace=0, **({"drop_batch": drop_batch} if drop_batch else {}))
    engine = await Engine.open(store, os.path.join(root, "cache"), config)
    opened = maxrss_mib()
    rss_before = status_mib("VmRSS")
    reset_peak()
    if trace:
        tracemalloc.start()
    start = time.monotonic()
    await engine.delete_snapshot("v", "s")
    await engine.sync()
    took = time.monotonic() - start
    out = {"delete_s": round(took, 2), "objects_left": engine.statistics().stored_objects}
    if trace:
        out["traced_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    else:
        out |= {
            "maxrss_after_open_mib": round(opened),
            "rss_before_delete_mib": round(rss_before),
            "peak_rss_during_delete_mib": round(status_mib("VmHWM")),
        }
    await engine.close()
    return out


def run_child(root: str, trace: bool, drop_batch: int) -> dict:
    copy = tempfile.mkdtemp(prefix="snapfs-droprss-")
    # Store objects are written once (a delete unlinks): hard links do. The cache file is
    # sparse (the rollback emptied it): cp keeps it so (copytree would read all of it).
    subprocess.run(["cp", "-al", f"{root}/store", f"{copy}/store"], check=True)
    subprocess.run(["cp", "-a", "--sparse=always", f"{root}/cache", f"{copy}/cache"], check=True)
    try:
        cmd = [sys.executable, __file__, "--delete", copy, "--drop-batch", str(drop_batch)]
        cmd += ["--trace"] if trace else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=64)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--bs-kib", type=int, default=64)
    ap.add_argument("--drop-batch", type=int, default=0, help="EngineConfig.drop_batch")
    ap.add_argument("--delete", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.delete:
        print(json.dumps(trio.run(delete, args.delete, args.trace, args.drop_batch)))
        return
    root = tempfile.mkdtemp(prefix="snapfs-droprss-")
    try:
        result = trio.run(setup, root, args.gib, args.mib, args.bs_kib << 10)
        result |= run_child(root, False, args.drop_batch)
        result |= run_child(root, True, args.drop_batch)
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
