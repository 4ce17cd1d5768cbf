"""The machines the benchmark's supervisor runs (``runtime.modules = ["pgdurable_machines"]``).

All async, like the peers' jobs: a no-op job, a job that reports when it started (wake
latency), and a 5-step machine carrying its state through every step, once plainly and
once asking for inline run-ahead (``Next(..., inline=True)``).
"""

from __future__ import annotations

import msgspec
from harness import stamp

from pgdurable import FSM, Done, Next, job, step

QUEUE = "bench"


@job(name="bench_noop", queue=QUEUE)
async def noop(args: dict) -> None:
    return None


@job(name="bench_stamp", queue=QUEUE)
async def stamped(args: dict) -> None:
    stamp(args["seq"])


class FiveState(msgspec.Struct):
    n: int
    trail: list[int] = []


def advance(state: FiveState, i: int) -> FiveState:
    return FiveState(state.n, [*state.trail, i])


class Five(FSM, name="bench_five", queue=QUEUE):
    State = FiveState

    @step(initial=True)
    async def s1(self, ctx):
        return Next(self.s2, state=advance(ctx.state, 1))

    @step
    async def s2(self, ctx):
        return Next(self.s3, state=advance(ctx.state, 2))

    @step
    async def s3(self, ctx):
        return Next(self.s4, state=advance(ctx.state, 3))

    @step
    async def s4(self, ctx):
        return Next(self.s5, state=advance(ctx.state, 4))

    @step
    async def s5(self, ctx):
        return Done(advance(ctx.state, 5))


class FiveInline(FSM, name="bench_five_inline", queue=QUEUE):
    """The same machine asking the worker to run the next step on the claim it holds."""

    State = FiveState

    @step(initial=True)
    async def s1(self, ctx):
        return Next(self.s2, state=advance(ctx.state, 1), inline=True)

    @step
    async def s2(self, ctx):
        return Next(self.s3, state=advance(ctx.state, 2), inline=True)

    @step
    async def s3(self, ctx):
        return Next(self.s4, state=advance(ctx.state, 3), inline=True)

    @step
    async def s4(self, ctx):
        return Next(self.s5, state=advance(ctx.state, 4), inline=True)

    @step
    async def s5(self, ctx):
        return Done(advance(ctx.state, 5))
