"""Machines for the limit tests."""

from __future__ import annotations

from pgdurable import FSM, KEEP, Done, Next, job, step


@job(queue="lim")
def work(args: dict, ctx):
    return {"key": ctx.concurrency_key}


class Chain(FSM, name="chain", queue="lim"):
    """Moves to a rate-limited or gated step as its state says."""

    @step(initial=True)
    def first(self, ctx):
        return Next(
            self.second,
            rate_limit=ctx.state.get("rate"),
            weight=ctx.state.get("weight", 1),
            concurrency_key=ctx.state.get("key", KEEP),
        )

    @step
    def second(self, ctx):
        return Done({"key": ctx.concurrency_key})
