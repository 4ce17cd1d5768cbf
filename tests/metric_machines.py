"""Machines run by real supervisors in tests/test_metrics.py (imported by module name)."""

from __future__ import annotations

import asyncio
from typing import Any

from pgdurable import FSM, Cancel, Context, Done, Next, StepTimeout, Stop, job, step


class Metered(FSM, name="metered", queue="rt"):
    """Two steps: ``start`` moves on to ``finish``, which is done."""

    @step(initial=True)
    def start(self, ctx: Context) -> Any:
        return Next(self.finish, ctx.state)

    @step
    def finish(self, ctx: Context) -> Any:
        return Done({"n": ctx.state.get("n")})


@job(name="metered_job", queue="rt", max_attempts=1)
def metered_job(args: dict[str, Any], ctx: Context) -> Any:
    if args.get("cancel"):
        raise Cancel("refused")
    return {"ok": True}


class Slow(FSM, name="metered_slow", queue="rt", step_timeout=0.2):
    """An async step past its timeout: cancelled, and ``handle`` stops the instance."""

    @step
    async def start(self, ctx: Context) -> Any:
        await asyncio.sleep(3600)
        return Done(None)

    def handle(self, exc: BaseException, ctx: Context) -> Any:
        return Stop("timed out" if isinstance(exc, StepTimeout) else repr(exc))
