"""The machines of the chaos run (bench/chaos.py), imported by its supervisors by name
(``runtime.modules = ["chaos_machines"]``, bench/ on PYTHONPATH).

``chaos`` has five steps s1 … s5 and ``chaos_child`` two, c1 and c2. Every step run draws a
token, appends one row to the side table ``chaos_runs`` before its work and one after it —
on a connection of its own, never the engine's — and returns the state with ``n`` one
higher and its token appended to ``trail``. So after the run the side table holds every
run of every step, finished or killed, and each final ``trail`` names the one run of each
step whose outcome committed. The kind of an instance (its state's ``kind``) decides what
else its steps do:

- ``keyed``: inserted with a concurrency key ``acct:<k>`` (unconfigured: one at a time);
- ``gated``: inserted with ``gate:<k>`` (``[concurrency_limits] gate``);
- ``rated``: s2 moves to s3 through the rate limit ``chaosrate``;
- ``parent``: s3 spawns two ``chaos_child`` instances, s4 checks that both are done;
- ``plain``: none of these.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgdurable import FSM, Child, Done, Next, Spawn, Stop, step

QUEUE = "chaos"
RATE = "chaosrate"
STEPS = ("s1", "s2", "s3", "s4", "s5")
CHILD_STEPS = ("c1", "c2")
CHILDREN = 2
RECORD_PATIENCE = 120.0  # seconds a side-table write keeps trying (a server restart is shorter)

_INSERT = """
INSERT INTO chaos_runs (token, what, iid, fsm, step, n, trail, pid, key, admitted_at, at)
VALUES (%(token)s, %(what)s, %(iid)s, %(fsm)s, %(step)s, %(n)s, %(trail)s, %(pid)s, %(key)s,
        CASE WHEN %(rated)s THEN (SELECT updated_at FROM {schema}.instances WHERE id = %(iid)s) END,
        clock_timestamp())
ON CONFLICT (token, what) DO NOTHING
"""


class _Side:
    """One side connection per step thread, reopened after the server dropped it."""

    def __init__(self) -> None:
        self.local = threading.local()
        schema = os.environ.get("CHAOS_SCHEMA", "pgdurable")
        self.sql = _INSERT.format(schema=f'"{schema}"')

    def _conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self.local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                os.environ["CHAOS_DSN"], autocommit=True, connect_timeout=5, application_name="chaos side"
            )
            self.local.conn = conn
        return conn

    def record(self, **row: Any) -> None:
        # The token and `what` make the row's key: a retry after a write that committed but
        # whose answer was lost adds nothing.
        deadline = time.monotonic() + RECORD_PATIENCE
        delay = 0.05
        while True:
            try:
                self._conn().execute(self.sql, row)
                return
            except psycopg.Error:
                conn = getattr(self.local, "conn", None)
                if conn is not None:
                    conn.close()
                self.local.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(1.0, delay * 2)


_side = _Side()


def _run(ctx: Any, work: float) -> dict[str, Any]:
    """One step's body: record the start, work, record the end; the state it commits."""
    state = ctx.state
    token = secrets.token_hex(8)
    row = {
        "token": token,
        "iid": ctx.id,
        "fsm": ctx.fsm,
        "step": ctx.step,
        "n": state["n"],
        "trail": Jsonb(state["trail"]),
        "pid": os.getpid(),
        "key": ctx.concurrency_key,
        "rated": state.get("kind") == "rated" and ctx.step == "s3",
    }
    _side.record(what="start", **row)
    time.sleep(work)
    _side.record(what="end", **row)
    return {**state, "n": state["n"] + 1, "trail": [*state["trail"], token]}


def _work(ctx: Any) -> float:
    """Seconds a step works: long enough that a kill often lands mid-step and that a second
    holder of a key would overlap; keyed steps shorter, as their keys run one at a time."""
    if ctx.concurrency_key is not None:
        return random.uniform(0.03, 0.1)
    return random.uniform(0.02, 0.2)


class Chaos(FSM, name="chaos", queue=QUEUE):
    @step(initial=True)
    def s1(self, ctx):
        return Next(self.s2, _run(ctx, _work(ctx)))

    @step
    def s2(self, ctx):
        state = _run(ctx, _work(ctx))
        if state["kind"] == "rated":
            return Next(self.s3, state, rate_limit=RATE)
        return Next(self.s3, state)

    @step
    def s3(self, ctx):
        state = _run(ctx, _work(ctx))
        if state["kind"] == "parent":
            children = [
                Child("chaos_child", {"kind": "child", "n": 0, "trail": [], "of": ctx.id})
                for _ in range(CHILDREN)
            ]
            return Spawn(children, then=self.s4, state=state)
        return Next(self.s4, state)

    @step
    def s4(self, ctx):
        if ctx.state["kind"] == "parent":
            done = [c for c in ctx.children if c.status == "done" and c.result["n"] == len(CHILD_STEPS)]
            if len(ctx.children) != CHILDREN or len(done) != CHILDREN:
                seen = [(c.id, c.status, c.error) for c in ctx.children]
                return Stop(f"expected {CHILDREN} children done, saw {seen}")
        return Next(self.s5, _run(ctx, _work(ctx)))

    @step
    def s5(self, ctx):
        state = _run(ctx, _work(ctx))
        return Done({"n": state["n"], "trail": state["trail"]})


class ChaosChild(FSM, name="chaos_child", queue=QUEUE):
    @step(initial=True)
    def c1(self, ctx):
        return Next(self.c2, _run(ctx, _work(ctx)))

    @step
    def c2(self, ctx):
        state = _run(ctx, _work(ctx))
        return Done({"n": state["n"], "trail": state["trail"]})
