"""Machines shared by the tests."""

from __future__ import annotations

import msgspec

from pgdurable import FSM, Cancel, Done, Next, Retry, Stop, job, step


class Counter(FSM, name="counter", queue="counting"):
    class State(msgspec.Struct):
        n: int = 0
        limit: int = 3

    @step(initial=True)
    def bump(self, ctx):
        s = ctx.state
        if s.n >= s.limit:
            return Next("finish", s)
        return Next(self.bump, Counter.State(n=s.n + 1, limit=s.limit))

    @step
    async def finish(self, ctx):
        return Done({"n": ctx.state.n})


class Flaky(FSM, name="flaky"):
    class State(msgspec.Struct):
        fail_times: int = 2

    @step(initial=True)
    def go(self, ctx):
        if ctx.attempt < ctx.state.fail_times:
            return Retry(delay=30)
        return Done({"attempts": ctx.attempt + 1})


class EmailArgs(msgspec.Struct):
    to: str
    fail: int = 0


@job(name="send_email", queue="email", max_attempts=3)
def send_email(args: EmailArgs, ctx):
    if ctx.attempt < args.fail:
        raise ConnectionError(f"smtp down ({ctx.attempt})")
    return {"sent_to": args.to, "attempt": ctx.attempt}


@job(name="cancel_me")
def cancel_me(args: dict):
    raise Cancel("not wanted")


@job(queue="email")
async def async_job(args: dict, ctx):
    return {"echo": args.get("x")}


class Endless(FSM, name="endless"):
    @step(initial=True)
    def loop(self, ctx):
        return Next(self.loop)


class Boom(FSM, name="boom"):
    @step(initial=True)
    def go(self, ctx):
        raise ValueError("kaboom")


class Handled(FSM, name="handled"):
    @step(initial=True)
    def go(self, ctx):
        raise KeyError("missing")

    @step
    def recovered(self, ctx):
        return Done("recovered")

    def handle(self, exc, ctx):
        return Next(self.recovered)


class Malformed(FSM, name="malformed"):
    @step(initial=True)
    def go(self, ctx):
        return {"not": "an outcome"}


class BadStep(FSM, name="badstep"):
    @step(initial=True)
    def go(self, ctx):
        return Next("nowhere")


class Unencodable(FSM, name="unencodable"):
    @step(initial=True)
    def go(self, ctx):
        return Next(self.go, state={"x": object()})


class Stopper(FSM, name="stopper"):
    @step(initial=True)
    def go(self, ctx):
        return Stop("business says no")
