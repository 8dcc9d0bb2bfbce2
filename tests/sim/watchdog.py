"""Fail a seed that hangs instead of hanging the test (tests/sim).

Three guards, from the cheapest to the last resort:

- `Watchdog.run`, a task beside the world: every step the world takes (a client op, an
  admin op, a restart, the finish) registers with `step()`; one that has not ended within
  `BOUND` seconds of virtual time fails the seed. A deadlock is caught too: on a MockClock
  with autojump, when every task waits the clock jumps to the watchdog's next wakeup.
- `Spin`, a trio Instrument: the event loop that keeps stepping tasks while virtual time
  stands still (a loop that checkpoints but never waits) is stopped after `SPIN` task steps
  through `run_sync_soon` (trio disables an instrument that raises).
- `wall_alarm` (test_sim.py): SIGALRM after a wall-clock budget, for a loop that never
  checkpoints at all (trio cannot interrupt it); it raises where the loop is.

Each failure carries the stacks of every task (`task_tree()`).
"""

from __future__ import annotations

import signal
import traceback
from contextlib import contextmanager

import trio
import trio.lowlevel

BOUND = 60.0  # virtual seconds a step may take (an incarnation lives 40 s at most)
SPIN = 100_000  # task steps without virtual time moving (a run has at most ~3 000)


class Stuck(AssertionError):
    pass


def _frames(task: trio.lowlevel.Task) -> list:
    frames = []
    coro = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def task_tree(limit: int = 60) -> str:
    """Every task of the run, indented by nursery, with where it waits."""
    out: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        pad = "  " * depth
        out.append(f"{pad}task {task.name}")
        for frame in _frames(task):
            code = frame.f_code
            if "/trio/" in code.co_filename:
                continue
            out.append(f"{pad}  {code.co_filename}:{frame.f_lineno} {code.co_name}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    try:
        walk(trio.lowlevel.current_root_task(), 0)
    except RuntimeError:
        return "(no trio run)"
    return "\n".join(out[-limit * 10 :])


class Spin(trio.abc.Instrument):
    def __init__(self, clock, on_spin) -> None:
        self.clock = clock
        self.on_spin = on_spin
        self.last = None
        self.count = 0
        self.fired = False
        self.most = 0  # the most task steps seen at one virtual instant

    def before_task_step(self, task) -> None:
        now = self.clock.current_time()
        if now != self.last:
            self.last, self.count = now, 0
            return
        self.count += 1
        if self.count > self.most:
            self.most = self.count
        if self.count > SPIN and not self.fired:
            self.fired = True
            where = "".join(traceback.format_stack(_frames(task)[-1])[-8:])
            self.on_spin(
                f"the event loop ran {SPIN} task steps without virtual time moving; "
                f"task {task.name} at\n{where}\ntasks:\n{task_tree()}"
            )


class Watchdog:
    def __init__(self) -> None:
        self.steps: dict[int, tuple[str, float]] = {}
        self.n = 0
        self.failure: str | None = None
        self.scope: trio.CancelScope | None = None

    @contextmanager
    def step(self, what: str):
        self.n += 1
        key = self.n
        self.steps[key] = (what, trio.current_time())
        try:
            yield
        finally:
            del self.steps[key]

    def fail(self, message: str) -> None:
        """Stop the run (the world raises `Stuck` with `message` when it has unwound)."""
        if self.failure is None:
            self.failure = message
        if self.scope is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.scope.cancel)

    async def run(self) -> None:
        while True:
            await trio.sleep(BOUND / 4)
            now = trio.current_time()
            late = [(w, now - t) for w, t in self.steps.values() if now - t > BOUND]
            if late:
                what, took = late[0]
                self.fail(
                    f"step '{what}' has not ended after {took:.0f}s of virtual time "
                    f"(bound {BOUND:.0f}s)\ntasks:\n{task_tree()}"
                )
                return


@contextmanager
def wall_alarm(seconds: int):
    """SIGALRM after `seconds` of wall time: raises `Stuck` where the process is."""

    def expire(_signum, frame):
        where = "".join(traceback.format_stack(frame)[-12:])
        raise Stuck(f"no end after {seconds}s of wall time (a loop with no checkpoint?)\n{where}")

    if seconds <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
