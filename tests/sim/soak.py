"""Run simulation seeds beyond the CI range for a time budget (scripts/sim-soak).

    scripts/sim-soak [--minutes N] [--first S] [--seeds K]

One process, one core: seeds S, S+1, ... until the budget is spent (or K seeds ran). Each
failure prints its seed, its error and the replay command; the last line says how many
seeds ran, seeds/s and steps/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import pytest

from tests.sim.test_sim import OPEN, simulate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/sim-soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    p.add_argument("--first", type=int, default=1000, help="first seed (default 1000)")
    p.add_argument("--seeds", type=int, default=None, help="stop after this many seeds")
    args = p.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    seed, ran, steps, failed = args.first, 0, 0, []
    while time.perf_counter() < deadline and (args.seeds is None or ran < args.seeds):
        try:
            with pytest.MonkeyPatch.context() as mp:
                world = simulate(seed, mp)
            steps += world.steps
        except BaseException as exc:  # a soak reports every failure and goes on
            if isinstance(exc, KeyboardInterrupt):
                break
            failed.append(seed)
            head = str(exc).split("\nreplay:")[0]
            known = f" (open: {OPEN[seed]})" if seed in OPEN else ""
            print(f"FAIL seed {seed}{known}: {head[:2000]}", flush=True)
            print(f"  replay: SNAPFS_SIM_SEED={seed} scripts/test tests/sim", flush=True)
        ran += 1
        seed += 1
    took = time.perf_counter() - started
    print(
        f"soak: {ran} seeds ({args.first}..{seed - 1}) in {took:.0f}s, {len(failed)} failed "
        f"{failed}, {ran / took:.2f} seeds/s, {steps / took:.0f} steps/s",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
