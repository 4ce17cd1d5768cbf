"""Machines for tests/test_operate.py: cancel, retry, rewind, pause."""

from __future__ import annotations

from pathlib import Path

from pgdurable import FSM, Await, Child, Done, Next, Spawn, job, step


class Plain(FSM, name="op_plain", queue="op"):
    """Awaits `go`, then finishes with the names in its inbox. No on_cancel."""

    @step(initial=True)
    def wait(self, ctx):
        return Await("go", then=self.end)

    @step
    def end(self, ctx):
        return Done([s.name for s in ctx.inbox])


class Order(FSM, name="op_order", queue="op"):
    """Reserves, awaits payment, ships; a cancel sends it to `refund`."""

    on_cancel = "refund"

    @step(initial=True)
    def reserve(self, ctx):
        return Await("paid", then=self.ship, state={**ctx.state, "reserved": True})

    @step
    def ship(self, ctx):
        return Done({"shipped": True})

    @step
    def refund(self, ctx):
        return Done({"refunded": ctx.state.get("reserved", False), "reason": ctx.cancel_reason})


class Leaf(FSM, name="op_leaf", queue="op_kids"):
    """Awaits `go`, then finishes with its value."""

    @step(initial=True)
    def wait(self, ctx):
        return Await("go", then=self.end)

    @step
    def end(self, ctx):
        return Done(ctx.state["value"])


class Tree(FSM, name="op_tree", queue="op"):
    """Spawns an op_leaf per value (a sub-tree per list), then reports its children."""

    @step(initial=True)
    def fan_out(self, ctx):
        kids = [
            Child(Tree, {"values": v}) if isinstance(v, list) else Child(Leaf, {"value": v})
            for v in ctx.state["values"]
        ]
        return Spawn(kids, then=self.collect)

    @step
    def collect(self, ctx):
        return Done(sorted(c.status for c in ctx.children))


class CareTree(Tree, name="op_care_tree"):
    """A Tree whose cancel runs `undo`, which sees how its children ended."""

    @step
    def undo(self, ctx):
        return Done({"children": sorted(c.status for c in ctx.children), "reason": ctx.cancel_reason})

    on_cancel = undo


class Flaky(FSM, name="op_flaky", queue="op"):
    """`second` fails while the file named by state['flag'] exists."""

    @step(initial=True)
    def first(self, ctx):
        return Next(self.second, {**ctx.state, "firsts": ctx.state.get("firsts", 0) + 1})

    @step
    def second(self, ctx):
        if Path(ctx.state["flag"]).exists():
            raise RuntimeError("flag is up")
        return Done({"firsts": ctx.state["firsts"], "attempt": ctx.attempt, "state": ctx.state})


class FlakyQuiet(FSM, name="op_flaky_quiet", queue="op", history=False):
    """Flaky's counting, without step history."""

    @step(initial=True)
    def first(self, ctx):
        return Next(self.end, {**ctx.state, "firsts": ctx.state.get("firsts", 0) + 1})

    @step
    def end(self, ctx):
        return Done({"firsts": ctx.state["firsts"]})


@job(name="op_quick", queue="op")
def quick(args: dict, ctx):
    return args


ALL = [Plain, Order, Leaf, Tree, CareTree, Flaky, FlakyQuiet, quick]
