"""Fan-outs for tests/test_parallel.py."""

from __future__ import annotations

import asyncio

from pgdurable import FSM, Await, Child, Done, Stop, job, parallel, step


@job(name="par_square", queue="par", max_attempts=1)
def square(args: dict, ctx):
    if args.get("fail"):
        raise ValueError(f"no square for {args['n']}")
    return args["n"] * args["n"]


class Waiter(FSM, name="par_waiter", queue="par"):
    """A child that waits for a signal that never comes."""

    @step(initial=True)
    def wait(self, ctx):
        return Await("never", then=self.end)

    @step
    def end(self, ctx):
        return Done("woken")


@job(name="par_slow", queue="par", max_attempts=1)
async def slow(args: dict, ctx):
    await asyncio.sleep(args["seconds"])
    return "slept"


class Fan(FSM, name="par_fan", queue="par"):
    """Spawns state['children'] ([machine name, state] pairs), keyed so that the insert's
    order (by key) is the reverse of the Spawn's, and collects ctx.results()."""

    @step(initial=True)
    def fan_out(self, ctx):
        kids = [
            Child(KINDS[kind], args, correlation_key=f"{ctx.id}:{99 - i:02d}")
            for i, (kind, args) in enumerate(ctx.state["children"])
        ]
        return parallel(kids, then=self.collect, fail_fast=ctx.state.get("fail_fast", False))

    @step
    def collect(self, ctx):
        results = ctx.results()
        if ctx.state.get("strict"):
            return Done(ctx.results(int).values())
        return Done([[r.index, r.status, r.value, r.error] for r in results])

    def handle(self, exc, ctx):
        return Stop(f"{type(exc).__name__}: {exc}")


class Twice(FSM, name="par_twice", queue="par"):
    """Two fan-outs in a row: the second's results are its own."""

    @step(initial=True)
    def first(self, ctx):
        return parallel([(square, {"n": 2}), (square, {"n": 3})], then=self.second)

    @step
    def second(self, ctx):
        return parallel([(square, {"n": 10})], then=self.end, state={"first": ctx.results(int).values()})

    @step
    def end(self, ctx):
        return Done({**ctx.state, "second": ctx.results(int).values(), "all": len(ctx.children)})


KINDS = {"square": square, "waiter": Waiter, "slow": slow}
ALL = [square, Waiter, slow, Fan, Twice]
