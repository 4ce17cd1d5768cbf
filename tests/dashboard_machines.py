"""Machines for the dashboard's tests (queue ``rt``, so a supervisor of tests/supervised.py
runs them)."""

from __future__ import annotations

from pathlib import Path

from pgdurable import FSM, Done, Next, step


class Charge(FSM, name="dash_charge", queue="rt"):
    """Logs, then fails until the file its state names exists: retried, it finishes."""

    @step(initial=True)
    def prepare(self, ctx):
        ctx.log.info("preparing order %s", ctx.state["order"])
        return Next(self.charge)

    @step
    def charge(self, ctx):
        ctx.log.warning("charging order %s", ctx.state["order"])
        if not Path(ctx.state["unlock"]).exists():
            raise RuntimeError("card declined <b>for order</b>")
        return Done({"charged": ctx.state["order"]})
