"""Machines for the step-timeout tests (drain and a real supervisor).

A step that must hang until the test says so waits for a file (``release``) to appear: the
test creates it, the step returns. Queue ``rt`` runs steps in threads, queue ``iso`` in step
processes (``isolation = "process"``, see test_timeouts_supervised).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from pgdurable import FSM, Await, Context, Done, Insert, Next, Retry, Spawn, StepTimeout, Stop, job, step


def _wait_for(path: str) -> None:
    """Block (a sync step's thread or process) until ``path`` exists."""
    while not Path(path).exists():
        time.sleep(0.02)


class Hangs(FSM, name="to_hangs", queue="rt", step_timeout=0.3):
    """An async step that never finishes: cancelled at the machine's step_timeout; handle()
    retries once, then fails, saying what it saw."""

    @step
    async def start(self, ctx: Context) -> Any:
        await asyncio.sleep(3600)
        return Done("never")

    def handle(self, exc: BaseException, ctx: Context) -> Any:
        if not isinstance(exc, StepTimeout):
            return Stop(f"unexpected {exc!r}")
        if ctx.attempt == 0:
            return Retry(delay=0, error=f"timeout {exc.step} {exc.timeout:g}")
        return Stop(f"saw StepTimeout of {exc.step} after {exc.timeout:g} s")


class Stubborn(FSM, name="to_stubborn", queue="rt"):
    """An async step that swallows its cancellation and returns: still a timeout."""

    @step(timeout=dt.timedelta(milliseconds=200))
    async def start(self, ctx: Context) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return Done("swallowed")
        return Done("never")


class Quick(FSM, name="to_quick", queue="rt", step_timeout=30):
    """Well within its timeout."""

    @step(initial=True)
    async def start(self, ctx: Context) -> Any:
        return Next("second", state={"n": 1})

    @step
    def second(self, ctx: Context) -> Any:
        return Done(ctx.state)


class Blocks(FSM, name="to_blocks", queue="rt"):
    """A sync step whose thread outlives its timeout: it waits for ``release``, then returns
    an outcome that must be discarded. ``handle`` fails the instance at once."""

    @step(timeout=0.3)
    def start(self, ctx: Context) -> Any:
        _wait_for(ctx.state["release"])
        return Done("late")


class OwnTimeout(FSM, name="to_own_timeout", queue="rt"):
    """A step that raises TimeoutError itself: not a StepTimeout."""

    @step(timeout=30)
    def start(self, ctx: Context) -> Any:
        raise TimeoutError("the step's own")


@job(queue="rt", timeout=0.3, max_attempts=2, backoff=lambda attempt: 0.0)
async def slow_job(args: dict[str, Any]) -> Any:
    await asyncio.sleep(3600)


# -- queue "iso": isolation = "process" -------------------------------------------------------
class Boom(Exception):
    """An exception of the user's that pickles."""


class Unpicklable(Exception):
    def __init__(self, what: str, *, extra: int):  # a required keyword: pickle cannot rebuild it
        super().__init__(what)
        self.extra = extra


class Acc(msgspec.Struct):
    n: int = 0
    pids: list[int] = []


class IsoHang(FSM, name="iso_hang", queue="iso"):
    """A sync step that never returns: its step process is killed at the timeout."""

    @step(timeout=2)  # long enough to write its pid first on a loaded machine
    def start(self, ctx: Context) -> Any:
        Path(ctx.state["pidfile"]).write_text(str(os.getpid()))
        time.sleep(3600)
        return Done("never")


class IsoWaits(FSM, name="iso_waits", queue="iso"):
    """A sync step that writes its process id, then waits for ``release`` (the test kills
    the process from outside meanwhile)."""

    @step
    def start(self, ctx: Context) -> Any:
        Path(ctx.state["pidfile"]).write_text(str(os.getpid()))
        _wait_for(ctx.state["release"])
        return Done(os.getpid())


class IsoOutcomes(FSM, name="iso_outcomes", queue="iso"):
    """Every outcome crosses the process boundary: Next, Retry, Await, Spawn, Done, Stop."""

    State = Acc

    @step(initial=True)
    def start(self, ctx: Context) -> Any:
        return Next(self.retried, state=Acc(ctx.state.n + 1, [os.getpid()]))

    @step
    def retried(self, ctx: Context) -> Any:
        if ctx.attempt == 0:
            return Retry(state=Acc(ctx.state.n + 1, ctx.state.pids), delay=0)
        return Await("go", then="woken", state=ctx.state, timeout=dt.timedelta(milliseconds=1))

    @step
    def woken(self, ctx: Context) -> Any:
        children = [Insert("iso_child", state={"k": i}) for i in range(2)]
        return Spawn(children, then="joined", state=Acc(ctx.state.n + 1, ctx.state.pids))

    @step
    def joined(self, ctx: Context) -> Any:
        results = sorted(c.result for c in ctx.children)
        return Done({"n": ctx.state.n, "children": results, "parent_pid": os.getpid()})


class IsoChild(FSM, name="iso_child", queue="iso"):
    @step
    def start(self, ctx: Context) -> Any:
        ctx.log.info("child %s runs in a step process", ctx.state["k"])
        if ctx.state["k"] < 0:
            return Stop("negative")
        return Done(ctx.state["k"] * 10)


class IsoRaises(FSM, name="iso_raises", queue="iso"):
    """What a step raises in its process reaches handle() in the worker, type and all."""

    @step
    def start(self, ctx: Context) -> Any:
        if ctx.state.get("unpicklable"):
            raise Unpicklable("no pickle", extra=1)
        raise Boom("bang")

    def handle(self, exc: BaseException, ctx: Context) -> Any:
        return Stop(f"handled {type(exc).__name__}: {exc}")


class IsoExits(FSM, name="iso_exits", queue="iso"):
    @step
    def start(self, ctx: Context) -> Any:
        os._exit(3)


class IsoAsync(FSM, name="iso_async", queue="iso"):
    """An async step on an isolated queue runs in the worker's loop, as anywhere."""

    @step(timeout=0.3)
    async def start(self, ctx: Context) -> Any:
        if ctx.state.get("hang"):
            await asyncio.sleep(3600)
        return Done(os.getpid())


@job(queue="iso")
def iso_quick(args: dict[str, Any]) -> Any:
    return {"pid": os.getpid(), "ppid": os.getppid()}
