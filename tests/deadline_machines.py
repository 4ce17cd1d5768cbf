"""Machines for tests/test_deadlines.py (on queue ``rt``, so a supervisor of
tests/supervised.py runs them)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from pgdurable import FSM, Await, Child, Done, Next, Spawn, job, step


@job(name="dl_quick", queue="rt")
def quick(args: dict) -> str:
    return "ran"


class Waiter(FSM, name="dl_wait", queue="rt"):
    """Awaits `go`, then finishes; spawns `kids` children like itself first if asked."""

    @step(initial=True)
    def start(self, ctx):
        kids = ctx.state.get("kids", 0)
        if kids:
            return Spawn([Child(Waiter, {"kids": kids - 1}) for _ in range(kids)], then=self.wait)
        return Await("go", then=self.end)

    @step
    def wait(self, ctx):
        return Await("go", then=self.end)

    @step
    def end(self, ctx):
        return Done("ended")


class Timed(FSM, name="dl_timed", queue="rt", deadline=dt.timedelta(hours=1)):
    """A default deadline of an hour from the insert."""

    @step(initial=True)
    def start(self, ctx):
        return Await("go", then=self.end)

    @step
    def end(self, ctx):
        return Done("ended")


class Slow(FSM, name="dl_slow", queue="rt"):
    """Its first step runs until a gate file exists (after marking that it started)."""

    @step(initial=True)
    def work(self, ctx):
        Path(ctx.state["started"]).touch()
        gate = Path(ctx.state["gate"])
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return Next(self.after)

    @step
    def after(self, ctx):
        return Done("after ran")
