"""Machines with compensations (tests/test_sagas.py). Each step appends what it did to the
file named by state['log'], so a test (or a test of another process) reads what ran."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pgdurable import FSM, Await, Done, Next, Stop, saga, step


def note(ctx, what: str) -> None:
    with open(ctx.state["log"], "a") as f:
        f.write(what + "\n")


class Trip(FSM, name="trip", queue="sagas", compensation_attempts=2):
    """Book a flight, then a hotel, then charge; charging fails when state['fail'] is set.
    A compensation fails while state['stuck'] names it; one kills its worker on its first
    run when state['kill'] names it (a marker file beside the log remembers the kill)."""

    @step(initial=True, compensate="cancel_flight")
    def book_flight(self, ctx):
        note(ctx, "book_flight")
        return Next(self.book_hotel)

    @step(compensate="cancel_hotel")
    def book_hotel(self, ctx):
        note(ctx, "book_hotel")
        if ctx.state.get("park"):
            return Await("go", then=self.charge)
        return Next(self.charge)

    @step
    def charge(self, ctx):
        if ctx.state.get("fail"):
            raise RuntimeError("card declined")
        note(ctx, "charge")
        return Done("booked")

    @step
    def cancel_hotel(self, ctx):
        self._undo(ctx, "cancel_hotel")

    @step
    def cancel_flight(self, ctx):
        self._undo(ctx, "cancel_flight")

    def _undo(self, ctx, name: str) -> None:
        if ctx.state.get("kill") == name:
            marker = Path(ctx.state["log"] + ".killed")
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        if ctx.state.get("stuck") == name:
            raise ConnectionError(f"{name}: service down")
        note(ctx, f"{name} ({ctx.compensating})")

    def backoff(self, attempt: int) -> float:
        return 0.0


class Hooked(FSM, name="hooked", queue="sagas"):
    """A machine with both an on_cancel step and a compensation: the hook runs first."""

    on_cancel = "tidy"

    @step(initial=True, compensate="undo_reserve")
    def reserve(self, ctx):
        note(ctx, "reserve")
        return Await("never", then=self.finish)

    @step
    def finish(self, ctx):
        return Done(None)

    @step
    def tidy(self, ctx):
        note(ctx, f"tidy ({ctx.cancel_reason})")
        return Done(None)

    @step
    def undo_reserve(self, ctx):
        note(ctx, "undo_reserve")


class Doomed(FSM, name="doomed", queue="sagas", max_crashes=1):
    """Its second step kills its worker every time: past max_crashes, it compensates."""

    @step(initial=True, compensate="undo")
    def first(self, ctx):
        note(ctx, "first")
        return Next(self.second)

    @step
    def second(self, ctx):
        os.kill(os.getpid(), signal.SIGKILL)
        return Stop("unreachable")

    @step
    def undo(self, ctx):
        note(ctx, f"undo ({ctx.compensating})")


def reserve_stock(state, ctx):
    note(ctx, "reserve_stock")
    return {**state, "reserved": True}


def release_stock(state, ctx):
    note(ctx, "release_stock")


def charge_card(state, ctx):
    if state.get("declined"):
        raise RuntimeError("declined")
    note(ctx, "charge_card")
    return {**state, "charged": True}


Order = saga("saga_order", [(reserve_stock, release_stock), (charge_card, None)], queue="sagas", attempts=2)

ALL = [Trip, Hooked, Doomed, Order]


class Leased(FSM, name="leased", queue="sagas"):
    """Leases a car, then waits for a return that never comes; its undo is async."""

    @step(initial=True, compensate="end_lease")
    def lease(self, ctx):
        note(ctx, "lease")
        return Await("returned", then=self.close)

    @step
    def close(self, ctx):
        return Done(None)

    @step
    async def end_lease(self, ctx):
        note(ctx, f"end_lease ({ctx.compensating})")


ALL.append(Leased)
