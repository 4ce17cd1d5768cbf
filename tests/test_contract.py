"""The step contract, end to end against a real database.

Declaration (machines, steps, jobs, versions), outcomes, error routing, held rows, drain
limits, step timeouts and the assertion helpers of ``pgdurable.testing``. Every test runs
through ``drain()``: the real claim / run / flush path on a fresh schema.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import msgspec
import pytest

from pgdurable import (
    FSM,
    Cancel,
    DefinitionError,
    Done,
    DrainLimitExceeded,
    Next,
    Registry,
    Retry,
    Stop,
    job,
    step,
)
from pgdurable.client import Instance
from pgdurable.contract.fsm import default_backoff
from pgdurable.testing import assert_done, assert_failed, assert_status, drain

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def run(dsn, schema):
    """drain() bound to this test's database and schema."""

    def _run(machines, **kwargs):
        return drain(dsn, machines, schema=schema, **kwargs)

    return _run


def parked_for(inst: Instance) -> float:
    """Seconds between the last write and eligibility (both set from the same now())."""
    return (inst.eligible_at - inst.updated_at).total_seconds()


def make_due(db, schema: str, iid: int) -> None:
    """Pretend the time an instance was parked for has passed."""
    db.execute(f'UPDATE "{schema}".instances SET eligible_at = now() WHERE id = %s', (iid,))


def set_state(db, schema: str, iid: int, state: Any) -> None:
    db.execute(
        f'UPDATE "{schema}".instances SET state = %s::jsonb WHERE id = %s',
        (msgspec.json.encode(state).decode(), iid),
    )


# --------------------------------------------------------------------------- machines


class OrderLine(msgspec.Struct):
    sku: str
    qty: int


class Order(FSM, name="contract_order", version=3, queue="orders"):
    """Typed state, initial step declared second, a sync then an async step."""

    class State(msgspec.Struct):
        customer: str
        lines: list[OrderLine] = []
        total: int = 0
        seen: list[str] = []

    @step
    async def price(self, ctx):
        await asyncio.sleep(0)
        s = ctx.state
        return Done(
            {
                "total": s.total,
                "seen": [*s.seen, f"{ctx.step}:{type(s).__name__}:async"],
                "fsm": ctx.fsm,
                "version": ctx.version,
                "queue": ctx.queue,
            }
        )

    @step(initial=True)
    def validate(self, ctx):
        s = ctx.state
        total = sum(line.qty for line in s.lines)
        seen = [*s.seen, f"{ctx.step}:{type(s).__name__}:sync"]
        return Next(self.price, msgspec.structs.replace(s, total=total, seen=seen))


class DictMachine(FSM):
    """No State: a plain dict. No name, version or queue: the defaults."""

    @step(initial=True)
    async def first(self, ctx):
        return Next(self.second, {**ctx.state, "visited": [type(ctx.state).__name__]})

    @step
    def second(self, ctx):
        return Done(ctx.state)


class SingleStep(FSM, name="contract_single"):
    @step
    def only(self, ctx):
        return Done("only")


class PipelineV1(FSM, name="contract_pipeline", version=1, queue="pipe"):
    @step(initial=True)
    def start(self, ctx):
        return Next(self.legacy, {"path": ["v1.start"]})

    @step
    def legacy(self, ctx):
        return Done({"version": ctx.version, "path": [*ctx.state["path"], "v1.legacy"]})


class PipelineV2(FSM, name="contract_pipeline", version=2, queue="pipe"):
    @step(initial=True)
    def begin(self, ctx):
        return Next(self.modern, {"path": ["v2.begin"]})

    @step
    async def modern(self, ctx):
        return Done({"version": ctx.version, "path": [*ctx.state["path"], "v2.modern"]})


class ChargeArgs(msgspec.Struct):
    amount: int
    fail_times: int = 0


@job(name="contract_charge", queue="jobs", max_attempts=3)
def charge(args: ChargeArgs, ctx):
    if ctx.attempt < args.fail_times:
        raise ConnectionError(f"gateway down (attempt {ctx.attempt})")
    return {"charged": args.amount, "attempt": ctx.attempt}


@job(name="contract_refuse", queue="jobs")
def refuse(args: dict):
    raise Cancel("x")


@job(name="contract_async_job", queue="jobs")
async def async_echo(args: dict, ctx):
    await asyncio.sleep(0)
    return {"echo": args["x"], "attempt": ctx.attempt}


@job(name="contract_slow_backoff", queue="jobs", max_attempts=3, backoff=lambda a: 100.0 * (a + 1))
def always_down(args: dict):
    raise ConnectionError("still down")


class Sleeper(FSM, name="contract_sleeper"):
    @step(initial=True)
    def start(self, ctx):
        return Next(self.wake, {"slept": True}, delay=dt.timedelta(hours=1))

    @step
    def wake(self, ctx):
        return Done(ctx.state)


class Retrier(FSM, name="contract_retrier"):
    @step(initial=True)
    def work(self, ctx):
        seen = [*ctx.state.get("seen", []), ctx.attempt]
        if ctx.attempt < 2:
            return Retry({"seen": seen}, delay=60, error=f"not yet {ctx.attempt}")
        return Next(self.finish, {"seen": seen})

    @step
    def finish(self, ctx):
        return Done({"seen": ctx.state["seen"], "attempt_at_finish": ctx.attempt})


class PatientRetrier(FSM, name="contract_patient"):
    """Retry() without a delay uses the machine's backoff()."""

    @step(initial=True)
    def work(self, ctx):
        return Retry() if ctx.attempt == 0 else Done(ctx.attempt)

    def backoff(self, attempt):
        return 42.0 + attempt


RICH_RESULT = {"nested": {"list": [1, 2.5, None, "x"]}, "ok": True}


class Finisher(FSM, name="contract_finisher"):
    @step(initial=True)
    def go(self, ctx):
        return Done(RICH_RESULT)


class Refuser(FSM, name="contract_refuser"):
    @step(initial=True)
    def go(self, ctx):
        return Stop("business says no")


class Hopper(FSM, name="contract_hopper"):
    @step(initial=True)
    def start(self, ctx):
        return Next(self.middle, {"path": [ctx.step]})

    @step
    def middle(self, ctx):
        return Next(self.end, {"path": [*ctx.state["path"], ctx.step]})

    @step
    def end(self, ctx):
        return Done([*ctx.state["path"], ctx.step])


class Exploder(FSM, name="contract_exploder"):
    @step(initial=True)
    def go(self, ctx):
        raise ValueError("kaboom")


class Recovering(FSM, name="contract_recovering"):
    @step(initial=True)
    def go(self, ctx):
        raise KeyError("missing")

    @step
    def recovered(self, ctx):
        return Done(ctx.state)

    def handle(self, exc, ctx):
        return Next(self.recovered, {"caught": repr(exc), "in_step": ctx.step})


class DoubleFault(FSM, name="contract_double_fault"):
    @step(initial=True)
    def go(self, ctx):
        raise ValueError("first")

    def handle(self, exc, ctx):
        raise RuntimeError("second")


class ReturnsDict(FSM, name="contract_returns_dict"):
    @step(initial=True)
    def go(self, ctx):
        return {"not": "an outcome"}


class NextUnknownStep(FSM, name="contract_next_unknown"):
    @step(initial=True)
    def go(self, ctx):
        return Next("unknown_step", {"v": 2})


class UnencodableState(FSM, name="contract_unencodable"):
    @step(initial=True)
    def go(self, ctx):
        return Next(self.go, {"v": 2, "x": object()})


class UnencodableResult(FSM, name="contract_unencodable_result"):
    @step(initial=True)
    def go(self, ctx):
        return Done(object())


class WrongStateType(FSM, name="contract_wrong_state_type"):
    class State(msgspec.Struct):
        v: int

    @step(initial=True)
    def go(self, ctx):
        return Next(self.go, 5)


class MalformedHandled(FSM, name="contract_malformed_handled"):
    @step(initial=True)
    def go(self, ctx):
        return {"oops": 1}

    @step
    def recovered(self, ctx):
        return Done(ctx.state)

    def handle(self, exc, ctx):
        return Next(self.recovered, {"handled": type(exc).__name__, "message": str(exc)})


class TypedBadDict(FSM, name="contract_typed_bad_dict"):
    class State(msgspec.Struct):
        v: int

    @step(initial=True)
    def go(self, ctx):
        return Next(self.after, {"v": "not an int"})

    @step
    def after(self, ctx):
        return Done(ctx.state.v)


class OwnTimeout(FSM, name="contract_own_timeout"):
    """No step timeout: the TimeoutError comes from the step's own code."""

    @step(initial=True)
    def go(self, ctx):
        raise TimeoutError("upstream took too long")


class ShipItem(msgspec.Struct):
    qty: int


class Shipment(FSM, name="contract_shipment", queue="ship"):
    class State(msgspec.Struct):
        to: str
        items: list[ShipItem] = []
        count: int = 0

    @step(initial=True)
    def go(self, ctx):
        return Done({"to": ctx.state.to})


class Ghost(FSM, name="contract_ghost", queue="ghosts"):
    @step(initial=True)
    def go(self, ctx):
        return Done({"ran": ctx.step, "version": ctx.version})


class HeldV1(FSM, name="contract_heldver", version=1, queue="held"):
    @step(initial=True)
    def go(self, ctx):
        return Done({"version": ctx.version})


class HeldV2(FSM, name="contract_heldver", version=2, queue="held"):
    @step(initial=True)
    def go(self, ctx):
        return Done({"version": ctx.version})


class Evolving(FSM, name="contract_evolving", queue="held"):
    @step(initial=True)
    def go(self, ctx):
        return Done("go")


class EvolvingWithLater(FSM, name="contract_evolving", queue="held"):
    """The same name and version, as a later deploy defines it: one more step."""

    @step(initial=True)
    def go(self, ctx):
        return Done("go")

    @step
    def later(self, ctx):
        return Done("later")


class Endless(FSM, name="contract_endless"):
    @step(initial=True)
    def loop(self, ctx):
        return Next(self.loop)


class SlowAsync(FSM, name="contract_slow_async"):
    @step(initial=True, timeout=0.2)
    async def slow(self, ctx):
        await asyncio.sleep(5)
        return Done("too late")


class SlowSync(FSM, name="contract_slow_sync"):
    @step(initial=True, timeout=0.1)
    def slow(self, ctx):
        time.sleep(0.6)
        return Done("too late")


# --------------------------------------------------------------------------- 1. declaration


def test_typed_machine_declaration_and_run(run, client):
    info = Order.__pgdurable__
    assert (info.name, info.version, info.queue, info.initial) == (
        "contract_order",
        3,
        "orders",
        "validate",
    )
    assert set(info.steps) == {"validate", "price"}
    assert info.state_type is Order.State
    steps = Order.__pgdurable_steps__
    assert steps["price"].is_async and not steps["validate"].is_async

    iid = client.insert(Order, {"customer": "ann", "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 5}]})
    inst = assert_status(client, iid, "runnable")
    assert (inst.fsm, inst.version, inst.queue, inst.step) == ("contract_order", 3, "orders", "validate")
    # Inserting through the class validates and fills in the State's defaults.
    assert inst.state["total"] == 0 and inst.state["seen"] == []

    tally = run([Order])
    assert tally.next == 1 and tally.done == 1
    assert_done(
        client,
        iid,
        {
            "total": 7,
            "seen": ["validate:State:sync", "price:State:async"],
            "fsm": "contract_order",
            "version": 3,
            "queue": "orders",
        },
    )


def test_typed_insert_rejects_bad_state(client):
    with pytest.raises(msgspec.ValidationError, match="customer"):
        client.insert(Order, {"lines": []})


def test_plain_dict_machine_with_defaults(run, client):
    info = DictMachine.__pgdurable__
    assert (info.name, info.version, info.queue, info.state_type) == ("DictMachine", 1, "default", None)

    iid = client.insert(DictMachine, {"anything": {"goes": [1, "two"]}})
    inst = assert_status(client, iid, "runnable")
    assert (inst.fsm, inst.version, inst.queue, inst.step) == ("DictMachine", 1, "default", "first")

    run([DictMachine])
    assert_done(client, iid, {"anything": {"goes": [1, "two"]}, "visited": ["dict"]})


def test_a_single_step_is_initial_without_marking(run, client):
    assert SingleStep.__pgdurable__.initial == "only"
    iid = client.insert(SingleStep)
    assert client.get(iid).step == "only"
    run([SingleStep])
    assert_done(client, iid, "only")


def test_definition_error_without_steps():
    with pytest.raises(DefinitionError, match="at least one @step"):

        class NoSteps(FSM):
            def go(self, ctx):
                return Done()


def test_definition_error_two_initial_steps():
    with pytest.raises(DefinitionError, match="several initial steps"):

        class TwoInitials(FSM):
            @step(initial=True)
            def a(self, ctx):
                return Done()

            @step(initial=True)
            def b(self, ctx):
                return Done()


def test_definition_error_several_steps_without_initial():
    with pytest.raises(DefinitionError, match="initial=True"):

        class NoInitial(FSM):
            @step
            def a(self, ctx):
                return Done()

            @step
            def b(self, ctx):
                return Done()


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True, None])
def test_definition_error_bad_version(version):
    with pytest.raises(DefinitionError, match="version must be a positive integer"):

        class BadVersion(FSM, version=version):
            @step
            def a(self, ctx):
                return Done()


def test_definition_error_other_declarations():
    with pytest.raises(DefinitionError, match="queue"):

        class NoQueue(FSM, queue=""):
            @step
            def a(self, ctx):
                return Done()

    with pytest.raises(DefinitionError, match="timeout"):
        step(lambda self, ctx: Done(), timeout=0)
    with pytest.raises(DefinitionError, match="max_attempts"):
        job(lambda args: None, max_attempts=0)

    class Clash(FSM, name="contract_pipeline", version=1):
        @step
        def go(self, ctx):
            return Done()

    with pytest.raises(DefinitionError, match="defined twice"):
        Registry([PipelineV1, Clash])


# --------------------------------------------------------------------------- 2. versions


def test_each_version_runs_its_own_steps(run, client):
    old = client.insert(PipelineV1)
    new = client.insert(PipelineV2)
    assert (client.get(old).version, client.get(old).step) == (1, "start")
    assert (client.get(new).version, client.get(new).step) == (2, "begin")

    tally = run(Registry([PipelineV1, PipelineV2]))
    assert tally.done == 2 and tally.hold == 0
    assert_done(client, old, {"version": 1, "path": ["v1.start", "v1.legacy"]})
    assert_done(client, new, {"version": 2, "path": ["v2.begin", "v2.modern"]})


def test_insert_by_name_pins_the_newest_version(run, client):
    run([PipelineV1, PipelineV2])  # nothing to run: registers both versions
    iid = client.insert("contract_pipeline")
    inst = client.get(iid)
    assert (inst.version, inst.step, inst.queue) == (2, "begin", "pipe")

    pinned = client.insert("contract_pipeline", version=1)
    assert (client.get(pinned).version, client.get(pinned).step) == (1, "start")

    run([PipelineV1, PipelineV2])
    assert_done(client, iid, {"version": 2, "path": ["v2.begin", "v2.modern"]})
    assert_done(client, pinned, {"version": 1, "path": ["v1.start", "v1.legacy"]})


# --------------------------------------------------------------------------- 3. jobs


def test_job_return_value_is_the_result(run, client):
    iid = client.insert(charge, ChargeArgs(amount=10))
    tally = run([charge])
    assert tally.done == 1 and tally.retry == 0
    inst = assert_done(client, iid, {"charged": 10, "attempt": 0})
    assert inst.last_error is None


def test_job_retries_then_succeeds(run, client):
    iid = client.insert(charge, {"amount": 5, "fail_times": 2})
    tally = run([charge])
    assert tally.retry == 2 and tally.done == 1
    assert assert_done(client, iid, {"charged": 5, "attempt": 2}).attempt == 2


def test_job_gives_up_after_max_attempts(run, client):
    iid = client.insert(charge, {"amount": 5, "fail_times": 99})
    tally = run([charge])
    assert tally.retry == 2 and tally.stop == 1
    inst = assert_failed(client, iid, "gave up after 3 attempts")
    assert "ConnectionError('gateway down (attempt 2)')" in inst.last_error
    assert inst.attempt == 2


def test_job_retry_keeps_the_error_while_parked(run, client):
    iid = client.insert(charge, {"amount": 5, "fail_times": 99})
    run([charge], collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert inst.attempt == 1
    assert inst.last_error == "ConnectionError('gateway down (attempt 0)')"
    # default_backoff(0): one second, less up to a quarter of jitter
    assert 0.75 - 0.01 <= parked_for(inst) <= 1.0 + 0.01


def test_job_cancel_fails_at_once(run, client):
    iid = client.insert(refuse, {})
    tally = run([refuse])
    assert tally.stop == 1 and tally.retry == 0
    inst = assert_failed(client, iid)
    assert inst.last_error == "x"
    assert inst.attempt == 0


def test_async_job(run, client):
    assert async_echo.__pgdurable_steps__["perform"].is_async
    iid = client.insert(async_echo, {"x": [1, 2]})
    run([async_echo])
    assert_done(client, iid, {"echo": [1, 2], "attempt": 0})


def test_job_custom_backoff_is_used(run, client, db, schema):
    iid = client.insert(always_down, {})

    run([always_down], collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert inst.attempt == 1
    assert parked_for(inst) == pytest.approx(100.0, abs=0.01)  # backoff(0)
    assert inst.eligible_at > inst.updated_at

    # Nothing is due: a non-collapsing drain leaves it parked.
    assert run([always_down], collapse_time=False).steps == 0
    assert client.get(iid).attempt == 1

    make_due(db, schema, iid)
    run([always_down], collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert inst.attempt == 2
    assert parked_for(inst) == pytest.approx(200.0, abs=0.01)  # backoff(1)

    run([always_down])
    assert_failed(client, iid, "gave up after 3 attempts: ConnectionError('still down')")


def test_default_backoff_is_capped_and_jittered():
    for attempt in range(8):
        samples = [default_backoff(attempt) for _ in range(200)]
        nominal = 2.0**attempt
        assert all(0.75 * nominal <= d <= nominal for d in samples), attempt
        assert max(samples) - min(samples) > 0.1 * nominal  # jittered, not a constant
    for attempt in (9, 50, 10**6):
        assert 225.0 <= default_backoff(attempt) <= 300.0
    assert 1.5 <= default_backoff(3, base=0.5, cap=2.0) <= 2.0
    assert 0.375 <= default_backoff(0, base=0.5) <= 0.5


# --------------------------------------------------------------------------- 4. outcomes


def test_next_with_delay_parks_unless_time_is_collapsed(run, client):
    iid = client.insert(Sleeper)
    tally = run([Sleeper], collapse_time=False)
    assert tally.next == 1 and tally.done == 0
    inst = assert_status(client, iid, "runnable")
    assert inst.step == "wake" and inst.state == {"slept": True}
    assert parked_for(inst) == pytest.approx(3600.0, abs=0.01)

    assert run([Sleeper], collapse_time=False).steps == 0
    assert_status(client, iid, "runnable")

    tally = run([Sleeper])
    assert tally.done == 1
    assert_done(client, iid, {"slept": True})


def test_retry_keeps_step_and_bumps_attempt(run, client):
    iid = client.insert(Retrier, {"seen": []})
    run([Retrier], collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert (inst.step, inst.attempt) == ("work", 1)
    assert inst.state == {"seen": [0]}
    assert inst.last_error == "not yet 0"
    assert parked_for(inst) == pytest.approx(60.0, abs=0.01)

    tally = run([Retrier])
    assert tally.retry == 1 and tally.next == 1 and tally.done == 1
    # Next resets the attempt counter.
    inst = assert_done(client, iid, {"seen": [0, 1, 2], "attempt_at_finish": 0})
    assert inst.last_error is None


def test_retry_without_delay_uses_machine_backoff(run, client):
    iid = client.insert(PatientRetrier)
    run([PatientRetrier], collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert inst.attempt == 1
    assert parked_for(inst) == pytest.approx(42.0, abs=0.01)
    run([PatientRetrier])
    assert_done(client, iid, 1)


def test_done_stores_the_result(run, client):
    iid = client.insert(Finisher)
    assert run([Finisher]).done == 1
    inst = assert_done(client, iid, RICH_RESULT)
    assert inst.last_error is None and inst.step == "go"


def test_stop_fails_with_the_reason(run, client):
    iid = client.insert(Refuser)
    assert run([Refuser]).stop == 1
    inst = assert_failed(client, iid)
    assert inst.last_error == "business says no"
    assert inst.result is None


def test_next_accepts_bound_methods(run, client):
    iid = client.insert(Hopper)
    assert run([Hopper]).next == 2
    assert_done(client, iid, ["start", "middle", "end"])


# --------------------------------------------------------------------------- 5. errors


def test_step_exception_fails_by_default(run, client):
    iid = client.insert(Exploder)
    assert run([Exploder]).stop == 1
    inst = assert_failed(client, iid)
    assert inst.last_error == "ValueError('kaboom')"


def test_custom_handle_can_continue(run, client):
    iid = client.insert(Recovering)
    tally = run([Recovering])
    assert tally.next == 1 and tally.done == 1
    assert_done(client, iid, {"caught": "KeyError('missing')", "in_step": "go"})


def test_failing_handle_fails_with_both_errors(run, client):
    iid = client.insert(DoubleFault)
    run([DoubleFault])
    inst = assert_failed(client, iid, "ValueError('first')")
    assert "RuntimeError('second')" in inst.last_error
    assert "handle() failed" in inst.last_error


@pytest.mark.parametrize(
    ("machine", "state", "message"),
    [
        (ReturnsDict, {"v": 1}, "returned {'not': 'an outcome'}"),
        (NextUnknownStep, {"v": 1}, "unknown step 'unknown_step'"),
        (UnencodableState, {"v": 1}, "state does not encode to JSON"),
        (UnencodableResult, {"v": 1}, "Done result does not encode to JSON"),
        (WrongStateType, {"v": 1}, "state does not fit State: Expected `object`, got `int`"),
    ],
)
def test_malformed_outcome_fails_without_half_commit(run, client, machine, state, message):
    iid = client.insert(machine, state)
    before = client.get(iid)
    tally = run([machine])
    assert tally.stop == 1 and tally.next == 0
    inst = assert_failed(client, iid, "InvalidOutcome")
    assert message in inst.last_error
    assert inst.state == before.state == {"v": 1}
    assert (inst.step, inst.attempt, inst.result) == ("go", 0, None)


def test_dict_state_not_matching_state_type_is_malformed(run, client):
    iid = client.insert(TypedBadDict, {"v": 1})
    run([TypedBadDict])
    inst = assert_failed(client, iid, "InvalidOutcome")
    assert (inst.step, inst.state) == ("go", {"v": 1})


def test_malformed_outcome_is_routed_to_handle(run, client):
    iid = client.insert(MalformedHandled)
    run([MalformedHandled])
    inst = assert_done(client, iid)
    assert inst.result["handled"] == "InvalidOutcome"
    assert "returned {'oops': 1}" in inst.result["message"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"to": "x", "count": "lots"}, "field 'count'"),
        ({"to": "x", "items": [{"qty": "many"}]}, "field 'items[0].qty'"),
        ({"count": 1}, "missing required field `to`"),
    ],
)
def test_state_that_does_not_decode_fails_naming_the_field(run, client, raw, expected):
    iid = client.insert("contract_shipment", raw, queue="ship")  # by name: not validated
    tally = run([Shipment])
    assert tally.stop == 1 and tally.done == 0
    inst = assert_failed(client, iid, "state of contract_shipment does not decode")
    assert expected in inst.last_error
    assert inst.state == raw and inst.result is None


def test_state_changed_in_the_database_fails_naming_the_field(run, client, db, schema):
    iid = client.insert(Shipment, {"to": "x"})
    set_state(db, schema, iid, {"to": ["not", "a", "string"]})
    run([Shipment])
    assert_failed(client, iid, "field 'to'")


# --------------------------------------------------------------------------- 5b. held rows


def assert_held(client, iid: int, *fragments: str) -> Instance:
    inst = assert_status(client, iid, "held")
    for fragment in fragments:
        assert fragment in (inst.last_error or ""), (fragment, inst.last_error)
    return inst


def test_unknown_machine_is_held_then_released(run, client):
    iid = client.insert("contract_ghost", {}, queue="ghosts")
    tally = run([Finisher], max_steps=5)  # would raise if the drain spun on the row
    assert tally.hold == 1 and tally.steps == 0
    assert_held(client, iid, "unknown machine 'contract_ghost'")

    assert run([Finisher], max_steps=5).hold == 0  # held rows are not claimed again

    tally = run([Ghost])
    assert tally.done == 1
    inst = assert_done(client, iid, {"ran": "go", "version": 1})
    assert inst.last_error is None


def test_unknown_version_is_held_then_released(run, client):
    iid = client.insert(HeldV1)
    tally = run([HeldV2], max_steps=5)
    assert tally.hold == 1 and tally.steps == 0
    assert_held(client, iid, "has no version 1", "known: [2]")

    tally = run([HeldV1, HeldV2])
    assert tally.done == 1
    assert_done(client, iid, {"version": 1})


def test_unknown_step_is_held_then_released(run, client):
    iid = client.insert(Evolving, step="later")
    tally = run([Evolving], max_steps=5)
    assert tally.hold == 1 and tally.steps == 0
    assert_held(client, iid, "has no step 'later'")

    tally = run([EvolvingWithLater])
    assert tally.done == 1
    assert_done(client, iid, "later")


# --------------------------------------------------------------------------- 6. drain limit


def test_drain_limit_names_the_machine(run, client):
    iid = client.insert(Endless)
    with pytest.raises(DrainLimitExceeded) as caught:
        run([Endless], max_steps=25)
    assert isinstance(caught.value, AssertionError)
    message = str(caught.value)
    assert "max_steps=25" in message
    assert f"contract_endless#{iid}" in message
    assert_status(client, iid, "runnable")


# --------------------------------------------------------------------------- 7. step timeout


def test_async_step_timeout_goes_to_handle(run, client):
    iid = client.insert(SlowAsync)
    started = time.monotonic()
    assert run([SlowAsync]).stop == 1
    assert time.monotonic() - started < 3.0  # cancelled, not awaited for 5 s
    inst = assert_failed(client, iid, "timed out")
    assert "step 'slow' timed out" in inst.last_error


def test_timeout_error_raised_by_the_step_keeps_its_message(run, client):
    iid = client.insert(OwnTimeout)
    run([OwnTimeout])
    inst = assert_failed(client, iid)
    assert inst.last_error == "TimeoutError('upstream took too long')"


def test_sync_step_timeout_goes_to_handle(run, client):
    iid = client.insert(SlowSync)
    assert run([SlowSync]).stop == 1
    assert_failed(client, iid, "step 'slow' timed out")


# --------------------------------------------------------------------------- 8. helpers


def test_assertion_helpers(run, client):
    done = client.insert(Finisher)
    failed = client.insert(Refuser)
    run([Finisher, Refuser])

    assert assert_done(client, done).id == done
    assert assert_done(client, done, RICH_RESULT).result == RICH_RESULT
    assert assert_failed(client, failed, "says no").id == failed
    assert assert_status(client, failed, "failed").status == "failed"

    with pytest.raises(AssertionError, match=r"is done with .*'ok': True.*expected \{'other': 1\}"):
        assert_done(client, done, {"other": 1})
    with pytest.raises(
        AssertionError, match=rf"instance {done} \(contract_finisher at go\) is 'done', expected 'failed'"
    ):
        assert_failed(client, done)
    with pytest.raises(AssertionError, match=r"is 'failed', expected 'done'; last_error: business says no"):
        assert_done(client, failed)
    with pytest.raises(
        AssertionError,
        match=r"failed with 'business says no', expected it to mention 'timeout'",
    ):
        assert_failed(client, failed, "timeout")
    with pytest.raises(AssertionError, match=r"is 'failed', expected 'runnable'"):
        assert_status(client, failed, "runnable")
    with pytest.raises(AssertionError, match="instance 987654321 does not exist"):
        assert_status(client, 987654321, "done")
