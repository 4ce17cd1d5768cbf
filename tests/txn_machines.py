"""Machines of the transactional-step tests. Each writes rows of an application table,
``effects`` in the test's schema (named in its state), on ``ctx.conn``."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgspec
from psycopg import sql

from pgdurable import FSM, Await, Done, Next, Retry, Spawn, job, step
from pgdurable.contract.spec import Insert

#: Interleaving tests hold a step at its critical point: instance id -> (reached, go on).
HOLD: dict[int, tuple[asyncio.Event, asyncio.Event]] = {}


def effects_table(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {}.effects (iid bigint, step text, attempt int, pid int)"
    ).format(sql.Identifier(schema))


def _insert(schema: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {}.effects (iid, step, attempt, pid) VALUES (%s, %s, %s, %s)").format(
        sql.Identifier(schema)
    )


async def write(ctx: Any, schema: str) -> None:
    await ctx.conn.execute(_insert(schema), [ctx.id, ctx.step, ctx.attempt, os.getpid()])


def write_sync(ctx: Any, schema: str) -> None:
    ctx.conn.execute(_insert(schema), [ctx.id, ctx.step, ctx.attempt, os.getpid()])


class In(msgspec.Struct):
    schema: str
    marker: str = ""
    fail_once: bool = False


class Five(FSM, name="txn_five", queue="rt"):
    """Five transactional steps, async and sync, each inserting a row."""

    State = In

    @step(initial=True, transactional=True)
    async def s1(self, ctx):
        await write(ctx, ctx.state.schema)
        return Next(self.s2, inline=True)  # asked for, but never run ahead: claimed again

    @step(transactional=True)
    def s2(self, ctx):
        write_sync(ctx, ctx.state.schema)
        return Next(self.s3)

    @step(transactional=True)
    async def s3(self, ctx):
        await write(ctx, ctx.state.schema)
        if ctx.state.fail_once and ctx.attempt == 0:
            raise RuntimeError("after the insert")  # its insert must not stay
        return Next(self.s4)

    @step(transactional=True)
    def s4(self, ctx):
        write_sync(ctx, ctx.state.schema)
        if ctx.state.fail_once and ctx.attempt == 0:
            raise RuntimeError("after the insert")
        return Next(self.s5)

    @step(transactional=True)
    async def s5(self, ctx):
        await write(ctx, ctx.state.schema)
        return Done({"pid": os.getpid()})

    def handle(self, exc, ctx):
        return Retry(delay=0)


class Blocking(FSM, name="txn_blocking", queue="rt"):
    """Its first run inserts its row, marks a file with its pid and blocks, to be killed
    between its write and its commit; later runs finish."""

    State = In

    @step(initial=True, transactional=True)
    def work(self, ctx):
        write_sync(ctx, ctx.state.schema)
        marker = Path(ctx.state.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(600)
        return Done({"pid": os.getpid()})


class Held(FSM, name="txn_held", queue="rt"):
    """Parks for a signal, then writes, spawns two children and waits at ``HOLD``."""

    State = In

    @step(initial=True)
    def start(self, ctx):
        return Await("go", then=self.work)

    @step(transactional=True)
    async def work(self, ctx):
        await write(ctx, ctx.state.schema)
        gate = HOLD.get(ctx.id)
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        return Spawn([Insert("txn_child", {}), Insert("txn_child", {})], then=self.joined)

    @step
    def joined(self, ctx):
        return Done(len(ctx.children))


@job(name="txn_child", queue="rt")
def child(args: dict, ctx):
    return "ok"


class Counted(msgspec.Struct):
    schema: str
    key: str


class Serial(FSM, name="txn_serial", queue="rt"):
    """Reads the total of its key and inserts the next number, serializable: two of them
    interleaved conflict; held at ``HOLD`` between its read and its write."""

    State = Counted

    @step(initial=True, transactional=True, isolation="serializable")
    async def work(self, ctx):
        table = sql.Identifier(ctx.state.schema)
        cur = await ctx.conn.execute(
            sql.SQL("SELECT count(*) FROM {}.effects WHERE step = %s").format(table), [ctx.state.key]
        )
        (n,) = await cur.fetchone()
        gate = HOLD.get(ctx.id)
        if gate is not None and ctx.attempt == 0 and not gate[0].is_set():
            gate[0].set()
            await gate[1].wait()
        await ctx.conn.execute(_insert(ctx.state.schema), [ctx.id, ctx.state.key, n, os.getpid()])
        return Done(n)

    def backoff(self, attempt):
        return 0.0


class Misuse(FSM, name="txn_misuse", queue="rt"):
    """Commits ``ctx.conn`` itself (``how``: commit, rollback, sql)."""

    class State(msgspec.Struct):
        schema: str
        how: str

    @step(initial=True, transactional=True)
    def work(self, ctx):
        write_sync(ctx, ctx.state.schema)
        if ctx.state.how == "commit":
            ctx.conn.commit()
        elif ctx.state.how == "rollback":
            ctx.conn.rollback()
        else:
            ctx.conn.execute("COMMIT")
        return Done("committed")


class AsyncMisuse(FSM, name="txn_misuse_async", queue="rt"):
    State = In

    @step(initial=True, transactional=True)
    async def work(self, ctx):
        await write(ctx, ctx.state.schema)
        await ctx.conn.commit()
        return Done("committed")


@job(queue="rt", transactional=True)
async def txn_job(args: In, ctx):
    await write(ctx, args.schema)
    return "written"


class SlowSerial(FSM, name="txn_slow_serial", queue="rt"):
    """A serializable step that runs through several heartbeats of its worker."""

    State = In

    @step(initial=True, transactional=True, isolation="serializable")
    async def work(self, ctx):
        await write(ctx, ctx.state.schema)
        await asyncio.sleep(3)  # the worker's heartbeat is 1 s
        return Done(ctx.attempt)

    def backoff(self, attempt):
        return 0.0


class SlowSync(FSM, name="txn_slow_sync", queue="rt"):
    """A sync transactional step whose statement runs past the step's timeout."""

    State = In

    @step(initial=True, transactional=True, timeout=0.5)
    def work(self, ctx):
        write_sync(ctx, ctx.state.schema)
        ctx.conn.execute("SELECT pg_sleep(60)")
        return Done("late")
