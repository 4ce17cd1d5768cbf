"""Machines for tests/test_inputs.py: awaits that ask for input (on queue ``rt``, so a
supervisor of tests/supervised.py runs them)."""

from __future__ import annotations

from typing import Literal

import msgspec

from pgdurable import FSM, Await, Done, Next, Stop, step


class Approval(msgspec.Struct):
    approved: bool
    amount: int
    note: str = ""


class Expense(FSM, name="in_expense", queue="rt"):
    """Asks for an Approval (its type declared by the step that receives it)."""

    @step(initial=True)
    def ask(self, ctx):
        return Await(
            "approval",
            then=self.decide,
            prompt=f"Approve {ctx.state['amount']} EUR?",
            timeout=ctx.state.get("timeout"),
        )

    @step(input=Approval)
    def decide(self, ctx):
        if ctx.input is None:
            return Stop("no answer in time")
        got = ctx.input
        return Done({"type": type(got).__name__, "approved": got.approved, "amount": got.amount})


class Size(FSM, name="in_size", queue="rt"):
    """Asks for one of a few values: a Literal schema and fewer choices than it allows."""

    @step(initial=True)
    def ask(self, ctx):
        return Await(
            ["size", "skip"],
            then=self.done,
            prompt="Which size?",
            schema=Literal["S", "M", "L"],
            choices=["S", "M"],
        )

    @step
    def done(self, ctx):
        return Done({"size": ctx.input, "woken_by": [s.name for s in ctx.awaited]})


class Survey(FSM, name="in_survey", queue="rt"):
    """Asks three questions on one name, one after the other."""

    @step(initial=True)
    def ask(self, ctx):
        n = ctx.state.get("n", 0)
        return Await("answer", then=self.got, prompt=f"question {n}", schema=int)

    @step(input=int)
    def got(self, ctx):
        n = ctx.state.get("n", 0)
        answers = [*ctx.state.get("answers", []), ctx.input]
        if n < 2:
            return Next(self.ask, {"n": n + 1, "answers": answers})
        return Done(answers)
