"""Machines for the signal, await and children tests. Steps record what they saw."""

from __future__ import annotations

import msgspec

from pgdurable import FSM, Await, Child, Done, Next, Retry, Spawn, Stop, step


class Payment(FSM, name="payment", queue="pay"):
    """Waits for `paid` (or `cancelled`) with an optional timeout."""

    class State(msgspec.Struct):
        timeout: float | None = None
        seen: list[str] = []
        inbox_seen: list[str] = []

    @step(initial=True)
    def start(self, ctx):
        return Await(["paid", "cancelled"], then=self.settle, state=ctx.state, timeout=ctx.state.timeout)

    @step
    def settle(self, ctx):
        s = ctx.state
        s.seen = [f"{sig.name}:{sig.payload.get('n')}" for sig in ctx.awaited]
        s.inbox_seen = [sig.name for sig in ctx.inbox]
        if not ctx.awaited:
            return Done({"timed_out": True, "attempt": ctx.attempt, "inbox": s.inbox_seen})
        return Done({"seen": s.seen, "inbox": s.inbox_seen})


class Pack(FSM, name="pack", queue="pay"):
    """Accumulates `item` signals by re-awaiting until it has `want` of them."""

    class State(msgspec.Struct):
        want: int = 3
        wakes: int = 0

    @step(initial=True)
    def start(self, ctx):
        return Await("item", then=self.collect, state=ctx.state)

    @step
    def collect(self, ctx):
        s = ctx.state
        s.wakes += 1
        if len(ctx.awaited) < s.want:
            return Await("item", then=self.collect, state=s)
        return Next(self.finish, s)

    @step
    def finish(self, ctx):
        return Done({"wakes": ctx.state.wakes, "left": [x.payload["n"] for x in ctx.inbox]})


class TwoPings(FSM, name="two_pings", queue="pay"):
    """Awaits `ping` twice; moving on from the first consumes it."""

    class State(msgspec.Struct):
        seen: list[int] = []

    @step(initial=True)
    def start(self, ctx):
        return Await("ping", then=self.first, state=ctx.state)

    @step
    def first(self, ctx):
        s = ctx.state
        s.seen += [sig.payload["n"] for sig in ctx.awaited]
        return Next(self.again, s)

    @step
    def again(self, ctx):
        return Await("ping", then=self.second, state=ctx.state)

    @step
    def second(self, ctx):
        s = ctx.state
        s.seen += [sig.payload["n"] for sig in ctx.awaited]
        return Done({"seen": s.seen, "inbox": [sig.payload["n"] for sig in ctx.inbox]})


class RetryOnce(FSM, name="retry_once", queue="pay"):
    """Retries its woken step once: the retry must see the same signal again."""

    @step(initial=True)
    def start(self, ctx):
        return Await("go", then=self.woken, state=ctx.state)

    @step
    def woken(self, ctx):
        names = [s.name for s in ctx.awaited]
        if ctx.attempt == 0:
            return Retry(delay=0)
        return Done({"attempt": ctx.attempt, "awaited": names})


class Leaf(FSM, name="leaf", queue="kids"):
    class State(msgspec.Struct):
        value: int = 0
        fail: bool = False

    @step(initial=True)
    def run(self, ctx):
        if ctx.state.fail:
            return Stop(f"leaf {ctx.state.value} failed")
        return Done({"double": ctx.state.value * 2})


class Parent(FSM, name="parent", queue="parents"):
    class State(msgspec.Struct):
        values: list[int] = []
        fail: list[int] = []
        by_name: bool = False

    @step(initial=True)
    def fan_out(self, ctx):
        kids = [
            Child("leaf" if ctx.state.by_name else Leaf, {"value": v, "fail": v in ctx.state.fail})
            for v in ctx.state.values
        ]
        return Spawn(kids, then=self.join, state=ctx.state)

    @step
    def join(self, ctx):
        return Done(
            {
                "statuses": [c.status for c in ctx.children],
                "results": [c.result for c in ctx.children],
                "errors": [c.error for c in ctx.children],
            }
        )


class GrandParent(FSM, name="grandparent", queue="parents"):
    @step(initial=True)
    def start(self, ctx):
        return Spawn([Child(Parent, {"values": [1, 2]}), Child(Parent, {"values": [3]})], then=self.end)

    @step
    def end(self, ctx):
        return Done([c.result["results"] for c in ctx.children])
