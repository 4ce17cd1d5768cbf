"""The machines the benchmark's supervisor runs (``runtime.modules = ["pgdurable_machines"]``).

All async, like the peers' jobs: a no-op job, a job that reports when it started (wake
latency), and a 5-step machine carrying its state through every step, once plainly and
once asking for inline run-ahead (``Next(..., inline=True)``); the same machine inserting a
row in every step, in the step's transaction (``transactional=True``) or on a connection of
its own.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
from harness import stamp
from psycopg_pool import AsyncConnectionPool

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


# -- a row in every step: in the step's transaction, or on a connection of its own --------
ROWS_DSN = "BENCH_ROWS_DSN"  # set by workloads_pgdurable.py; the workers inherit it
_ROW = "INSERT INTO bench_rows (iid, step) VALUES (%s, %s)"


class FiveRows(FSM, name="bench_five_rows", queue=QUEUE):
    """Every step inserts a row in its own transaction, which commits with its outcome."""

    State = FiveState

    @step(initial=True, transactional=True)
    async def s1(self, ctx):
        await ctx.conn.execute(_ROW, [ctx.id, 1], prepare=True)
        return Next(self.s2, state=advance(ctx.state, 1))

    @step(transactional=True)
    async def s2(self, ctx):
        await ctx.conn.execute(_ROW, [ctx.id, 2], prepare=True)
        return Next(self.s3, state=advance(ctx.state, 2))

    @step(transactional=True)
    async def s3(self, ctx):
        await ctx.conn.execute(_ROW, [ctx.id, 3], prepare=True)
        return Next(self.s4, state=advance(ctx.state, 3))

    @step(transactional=True)
    async def s4(self, ctx):
        await ctx.conn.execute(_ROW, [ctx.id, 4], prepare=True)
        return Next(self.s5, state=advance(ctx.state, 4))

    @step(transactional=True)
    async def s5(self, ctx):
        await ctx.conn.execute(_ROW, [ctx.id, 5], prepare=True)
        return Done(advance(ctx.state, 5))


class _OwnPool:
    """The application's own pool in a worker process (what a step without
    ``transactional`` would use), opened on first use."""

    pool: AsyncConnectionPool | None = None
    lock: asyncio.Lock | None = None

    @classmethod
    async def insert(cls, iid: int, k: int) -> None:
        if cls.pool is None:
            cls.lock = cls.lock or asyncio.Lock()
            async with cls.lock:
                if cls.pool is None:
                    pool = AsyncConnectionPool(
                        os.environ[ROWS_DSN], min_size=4, max_size=10, kwargs={"autocommit": True}, open=False
                    )
                    await pool.open(wait=True)
                    cls.pool = pool
        async with cls.pool.connection() as conn:
            await conn.execute(_ROW, [iid, k], prepare=True)


class FiveRowsOwn(FSM, name="bench_five_rows_own", queue=QUEUE):
    """The same inserts, each committed on the application's own connection, then the step
    returns and its outcome goes to the group commit (at-least-once: a crash in between
    inserts the row twice)."""

    State = FiveState

    @step(initial=True)
    async def s1(self, ctx):
        await _OwnPool.insert(ctx.id, 1)
        return Next(self.s2, state=advance(ctx.state, 1))

    @step
    async def s2(self, ctx):
        await _OwnPool.insert(ctx.id, 2)
        return Next(self.s3, state=advance(ctx.state, 2))

    @step
    async def s3(self, ctx):
        await _OwnPool.insert(ctx.id, 3)
        return Next(self.s4, state=advance(ctx.state, 3))

    @step
    async def s4(self, ctx):
        await _OwnPool.insert(ctx.id, 4)
        return Next(self.s5, state=advance(ctx.state, 4))

    @step
    async def s5(self, ctx):
        await _OwnPool.insert(ctx.id, 5)
        return Done(advance(ctx.state, 5))
