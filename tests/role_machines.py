"""Machines run by a supervisor connected as the least-privileged worker role (test_roles.py).

Between them they reach every table the worker writes: plain jobs, a gated and rate-limited
key (gate_slots, rate_buckets), an await woken by a signal or by its deadline (the
maintenance sweep), children and their join, and a worker that dies in a step (the
supervisor's reclaim).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pgdurable import FSM, Await, Child, Done, Spawn, job, step


@job(name="role_echo", queue="rt")
def echo(args: dict, ctx):
    return {"n": args["n"], "key": ctx.concurrency_key}


@job(name="role_crash_once", queue="rt")
def crash_once(args: dict, ctx):
    """The first run kills its own worker (the supervisor returns the row); the next finishes."""
    marker = Path(args["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempt": ctx.attempt}


class Gate(FSM, name="role_gate", queue="rt"):
    """Parks until an `open` signal, or until its timeout (fired by the maintenance sweep)."""

    @step(initial=True)
    def start(self, ctx):
        return Await("open", then=self.opened, timeout=ctx.state.get("timeout"))

    @step
    def opened(self, ctx):
        return Done({"payloads": [s.payload for s in ctx.awaited], "timed_out": not ctx.awaited})


class Brood(FSM, name="role_brood", queue="rt"):
    """Spawns `n` echo children and joins them."""

    @step(initial=True)
    def fan_out(self, ctx):
        return Spawn([Child(echo, {"n": n}) for n in range(ctx.state["n"])], then=self.join)

    @step
    def join(self, ctx):
        return Done(sorted(c.result["n"] for c in ctx.children))
