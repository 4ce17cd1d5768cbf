"""Machines run by real supervisors in tests/test_runtime.py (imported by module name)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg

from pgdurable import FSM, Await, Done, Next, Retry, job, step


def _record(args: dict, what: str) -> None:
    """Append a run record to the test's side table (its own connection, not the engine's)."""
    dsn = os.environ["RUNTIME_TEST_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO runtime_runs (tag, what, pid, at) VALUES (%s, %s, %s, clock_timestamp())",
            [args["tag"], what, os.getpid()],
        )


@job(queue="rt", max_attempts=1)
def sleepy(args: dict, ctx):
    """Sleeps args['sleep'] seconds, recording start and end."""
    _record(args, "start")
    time.sleep(args.get("sleep", 0))
    _record(args, "end")
    return {"pid": os.getpid(), "started": time.time()}


@job(queue="rt", max_attempts=1)
def once_blocking(args: dict, ctx):
    """The first run marks a file and blocks (to be killed); later runs finish at once."""
    marker = Path(args["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return {"crash_free_run_pid": os.getpid()}


@job(queue="rt", max_attempts=5)
def suicide(args: dict, ctx):
    """Kills its own worker every time."""
    os.kill(os.getpid(), signal.SIGKILL)


@job(queue="rt")
def gc_settings(args: dict, ctx):
    """What the worker process's garbage collector runs with."""
    import gc

    return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count(), "pid": os.getpid()}


@job(queue="rt")
def stamp(args: dict, ctx):
    return {"started": time.time()}


class Waiter(FSM, name="waiter", queue="rt"):
    @step(initial=True)
    def start(self, ctx):
        return Await("never", then=self.after, timeout=ctx.state["timeout"])

    @step
    def after(self, ctx):
        return Done({"timed_out": not ctx.awaited, "at": time.time()})


class Relay(FSM, name="relay", queue="rt"):
    """Three steps run ahead inline on one claim, recording the worker of each."""

    @step(initial=True)
    def a(self, ctx):
        return Next(self.b, {"pids": [os.getpid()]}, inline=True)

    @step
    def b(self, ctx):
        return Next(self.c, {"pids": [*ctx.state["pids"], os.getpid()]}, inline=True)

    @step
    def c(self, ctx):
        return Done({"pids": [*ctx.state["pids"], os.getpid()]})


class Later(FSM, name="later", queue="rt"):
    """Moves on after a delay (``Next``) or retries once after one (``Retry``), and says how
    late its second step started against when it was due."""

    @step(initial=True)
    def first(self, ctx):
        delay = ctx.state["delay"]
        due = {"due": time.time() + delay}
        if ctx.state["how"] == "retry" and ctx.attempt == 0:
            return Retry({**ctx.state, **due}, delay=delay)
        if ctx.state["how"] == "retry":
            return Done({"late": time.time() - ctx.state["due"]})
        return Next(self.second, {**ctx.state, **due}, delay=delay)

    @step
    def second(self, ctx):
        return Done({"late": time.time() - ctx.state["due"]})


@job(queue="rt", max_attempts=1)
def gated(args: dict, ctx):
    """Marks that it started, then waits (at most a minute) for the test to open the gate."""
    Path(args["started"]).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not Path(args["gate"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"pid": os.getpid()}
