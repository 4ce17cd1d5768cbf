"""Fault isolation of bad values: a value one row carries is never charged to another.

A value PostgreSQL refuses (a NUL character, a delay out of range), or one a worker cannot
decode (nested too deeply), fails its own instance with a clear error, while the rows that
were claimed and committed with it go on; and the client refuses such values, and inf/nan,
before anything is stored.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import re
import secrets
from typing import Any

import msgspec
import psycopg
import pytest

from pgdurable import FSM, Await, Child, Done, Insert, InvalidValue, Next, Registry, Retry, Spawn, Stop, step
from pgdurable.client import AsyncClient
from pgdurable.contract import values
from pgdurable.engine import Engine
from pgdurable.testing import assert_done, assert_failed, assert_status, drain

# --------------------------------------------------------------------------- helpers


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels deep (``[]`` is one level)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


POISONS: dict[str, Any] = {
    "state_nul": lambda: Next("after", {"note": "a\x00b"}),
    "state_key_nul": lambda: Next("after", {"k\x00": 1}),
    "result_nul": lambda: Done({"x": ["ok", "a\x00b"]}),
    "stop_reason_nul": lambda: Stop("bad\x00reason"),
    "stop_reason_surrogate": lambda: Stop("bad \ud800 reason"),
    "retry_error_nul": lambda: Retry(delay=1, error="e\x00"),
    "await_name_nul": lambda: Await("pi\x00ng", then="after"),
    "next_delay_huge": lambda: Next("after", delay=1e300),
    "next_delay_timedelta_max": lambda: Next("after", delay=dt.timedelta.max),
    "next_delay_nan": lambda: Next("after", delay=float("nan")),
    "retry_delay_huge": lambda: Retry(delay=-1e300),
    "await_timeout_huge": lambda: Await("ping", then="after", timeout=1e300),
    "await_timeout_nan": lambda: Await("ping", then="after", timeout=float("nan")),
    "next_weight_nan": lambda: Next("after", weight=float("nan")),
    "concurrency_key_nul": lambda: Next("after", concurrency_key=("k", "a\x00")),
    "state_deep": lambda: Next("after", {"deep": nested(values.MAX_DEPTH)}),
    "result_deep": lambda: Done(nested(values.MAX_DEPTH + 1)),
    "state_nan": lambda: Next("after", {"total": float("nan")}),
    "child_state_nul": lambda: Spawn([Child("poison", {"kind": "a\x00"}, queue="poison")], then="after"),
    "child_key_nul": lambda: Spawn([Child(Poison, {"kind": "ok"}, correlation_key="c\x00")], then="after"),
    "child_delay_huge": lambda: Spawn([Child(Poison, {"kind": "ok"}, schedule_in=1e300)], then="after"),
}
#: Refused by PostgreSQL although no value check could tell: too large for the key's index.
POISONS_UNCHECKED: dict[str, Any] = {
    "child_key_huge": lambda: Spawn(
        [Child(Poison, {"kind": "ok"}, correlation_key=secrets.token_hex(5000))], then="after"
    ),
}
#: What each poison's last_error names once prepare() refused it.
CAUGHT = {
    "state_nul": "state contains a NUL character (U+0000) at $.note, which PostgreSQL cannot store",
    "state_key_nul": "state contains a NUL character (U+0000) at $ (a key)",
    "result_nul": "Done result contains a NUL character (U+0000) at $.x[1]",
    "stop_reason_nul": "Stop reason contains a NUL character (U+0000)",
    "stop_reason_surrogate": "Stop reason is not valid text: it holds a lone surrogate",
    "retry_error_nul": "Retry error contains a NUL character (U+0000)",
    "await_name_nul": "Await signal name contains a NUL character (U+0000)",
    "next_delay_huge": "Next delay must be a finite number of seconds within 100 years",
    "next_delay_timedelta_max": "Next delay must be a finite number of seconds within 100 years",
    "next_delay_nan": "Next delay must be a finite number of seconds within 100 years",
    "retry_delay_huge": "Retry delay must be a finite number of seconds within 100 years",
    "await_timeout_huge": "Await timeout must be a finite number of seconds within 100 years",
    "await_timeout_nan": "Await timeout must be a finite number of seconds within 100 years",
    "next_weight_nan": "Next weight must be a positive finite number, got nan",
    "concurrency_key_nul": "concurrency_key contains a NUL character (U+0000)",
    "state_deep": "state is nested deeper than 256 levels",
    "result_deep": "Done result is nested deeper than 256 levels",
    "state_nan": "state holds inf or nan at $.total",
    "child_state_nul": "bad child 0 of Spawn ('poison'): state contains a NUL character (U+0000) at $.kind",
    "child_key_nul": "bad child 0 of Spawn ('poison'): correlation_key contains a NUL character (U+0000)",
    "child_delay_huge": "bad child 0 of Spawn ('poison'): schedule_in must be a finite number of seconds",
}


class Poison(FSM, name="poison", queue="poison"):
    """Returns the outcome its state names: ``ok`` rows are the innocent ones."""

    @step(initial=True)
    def go(self, ctx):
        kind = ctx.state["kind"]
        return Done("ok") if kind == "ok" else {**POISONS, **POISONS_UNCHECKED}[kind]()

    @step
    def after(self, ctx):
        return Done("after")


class Parent(FSM, name="poison_parent", queue="poison"):
    """Spawns innocent children and one that returns the poison its state names."""

    @step(initial=True)
    def spawn(self, ctx):
        kinds = ["ok", ctx.state["kind"], "ok"]
        return Spawn([Child(Poison, {"kind": k}) for k in kinds], then="joined")

    @step
    def joined(self, ctx):
        return Done(sorted(c.status for c in ctx.children))


class Parked(FSM, name="poison_parked", queue="parked"):
    """Waits for a ``go`` signal and finishes with its payload."""

    @step(initial=True)
    def wait(self, ctx):
        return Await("go", then="got")

    @step
    def got(self, ctx):
        return Done(ctx.awaited[0].payload if ctx.awaited else None)


@pytest.fixture
def no_validation(monkeypatch):
    """prepare() without the value checks: what a gap in them would let reach the flush."""
    for name in ("check_json", "check_text", "check_seconds", "check_positive", "check_finite"):
        monkeypatch.setattr(values, name, lambda *a, **k: None)


def _crashes(db, schema: str) -> int:
    return db.execute(f'SELECT coalesce(sum(crashes), 0) FROM "{schema}".instances').fetchone()[0]


def _claim_run_flush(dsn: str, schema: str, machines: list[type[FSM]], queue: str) -> Any:
    """One claim of every runnable row of ``queue``, their steps, and one group commit."""

    async def go():
        engine = Engine(Registry(machines), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, queue, 100)
            results = [await engine.run(r) for r in rows]
            return rows, results, await engine.flush(conn, results)

    return asyncio.run(go())


# --------------------------------------------------------------------------- 1. the executor


@pytest.mark.parametrize("kind", sorted(POISONS))
def test_a_value_postgres_would_refuse_fails_only_its_instance(dsn, schema, client, db, kind):
    """prepare() refuses it: the step's error goes to handle(), whose default fails the
    instance with the cause; the rows committed in the same group commit are untouched."""
    ids = client.insert_many([Insert(Poison, {"kind": k}) for k in ["ok", "ok", kind, "ok", "ok"]])
    rows, results, report = _claim_run_flush(dsn, schema, [Poison], "poison")
    inst = assert_failed(client, ids[2], "InvalidOutcome")
    assert CAUGHT[kind] in inst.last_error
    for iid in ids[:2] + ids[3:]:
        assert_done(client, iid, "ok")
    assert _crashes(db, schema) == 0
    assert len(rows) == 5 and report.committed == set(ids) and not report.rejected  # no flush refused


def test_handle_sees_the_refused_value_as_a_malformed_outcome(dsn, schema, client):
    class Handled(FSM, name="poison_handled", queue="poison"):
        @step(initial=True)
        def go(self, ctx):
            return Stop("nul\x00")

        def handle(self, exc, ctx):
            return Done({"handled": type(exc).__name__, "message": str(exc)})

    iid = client.insert(Handled)
    drain(dsn, [Handled], schema=schema)
    inst = assert_done(client, iid)
    assert inst.result["handled"] == "InvalidOutcome"
    assert "Stop reason contains a NUL character" in inst.result["message"]


def test_a_retry_error_that_is_not_text_is_kept_as_text(dsn, schema, client, db):
    """Retry(error=) given an exception, as Stop(reason) may be: stored as its text, not
    handed to the flush as an object it cannot encode (which failed the whole group)."""

    class Retrying(FSM, name="poison_retrying", queue="poison"):
        @step(initial=True)
        def go(self, ctx):
            return Retry(delay=60, error=ValueError("gateway said no"))

    ids = client.insert_many([Insert(Retrying), Insert(Poison, {"kind": "ok"})])
    _claim_run_flush(dsn, schema, [Retrying, Poison], "poison")
    inst = assert_status(client, ids[0], "runnable")
    assert (inst.attempt, inst.last_error) == (1, "gateway said no")
    assert_done(client, ids[1], "ok")


def test_delays_within_the_limit_are_kept(dsn, schema, client):
    """The limit is 100 years either way; a delay inside it is stored as given."""

    class Far(FSM, name="poison_far", queue="poison"):
        @step(initial=True)
        def go(self, ctx):
            return Next("later", delay=dt.timedelta(days=36500))

        @step
        def later(self, ctx):
            return Done()

    iid = client.insert(Far)
    drain(dsn, [Far], schema=schema, collapse_time=False)
    inst = assert_status(client, iid, "runnable")
    assert (inst.eligible_at - inst.updated_at).days == 36500


@pytest.mark.parametrize(
    "kind",
    ["state_nul", "result_nul", "stop_reason_nul", "retry_error_nul", "await_name_nul", "next_delay_huge",
     "next_delay_timedelta_max", "next_delay_nan", "await_timeout_huge", "concurrency_key_nul"],
)  # fmt: skip
def test_a_refused_flush_commits_every_other_row(dsn, schema, client, db, no_validation, kind):
    """The safety net, with prepare()'s checks turned off: PostgreSQL refuses the group
    commit; the flush commits it in halves, every innocent row lands, and the guilty one
    is failed at once, alone, naming the cause — no crash counted on anyone."""
    kinds = ["ok"] * 3 + [kind] + ["ok"] * 4 + ["await_timeout_huge" if kind == "state_nul" else "ok"]
    ids = client.insert_many([Insert(Poison, {"kind": k}) for k in kinds])
    guilty = {iid for iid, k in zip(ids, kinds, strict=True) if k != "ok"}
    rows, results, report = _claim_run_flush(dsn, schema, [Poison], "poison")
    assert len(rows) == len(ids)
    assert report.committed == set(ids) and set(report.rejected) == guilty
    for iid, k in zip(ids, kinds, strict=True):
        if k == "ok":
            assert_done(client, iid, "ok")
            continue
        inst = assert_failed(client, iid, "could not be stored, so the instance failed: PostgreSQL refused")
        assert inst.step == "go" and inst.crashes == 0
        assert inst.last_error == report.rejected[iid]
    # The step's Result now says what was committed: a Stop, not the refused outcome.
    assert {r.row.id for r in results if r.kind == "stop"} == guilty
    assert not any(r.inline for r in results if r.row.id in guilty)
    assert _crashes(db, schema) == 0


def test_the_cause_is_named(dsn, schema, client, no_validation):
    kinds = ["stop_reason_nul", "next_delay_huge", "ok"]
    ids = client.insert_many([Insert(Poison, {"kind": k}) for k in kinds])
    _claim_run_flush(dsn, schema, [Poison], "poison")
    assert_failed(client, ids[0], "unsupported Unicode escape sequence")
    assert_failed(client, ids[1], "out of range")
    assert_done(client, ids[2])


def test_a_refused_child_outcome_still_joins_its_parent(dsn, schema, client, db, no_validation):
    """The guilty child is failed by the same guarded commit as any Stop: its parent is
    told, and wakes when its other children are done."""
    parent = client.insert(Parent, {"kind": "result_nul"})
    drain(dsn, [Parent, Poison], schema=schema)
    assert_done(client, parent, ["done", "done", "failed"])
    (child,) = db.execute(
        f"SELECT id FROM \"{schema}\".instances WHERE parent_id = %s AND status = 'failed'", [parent]
    ).fetchone()
    assert_failed(client, child, "could not be stored")
    assert _crashes(db, schema) == 0


def test_a_value_no_check_foresees_is_isolated_too(dsn, schema, client, db):
    """Validation on: a child's correlation key too large for its unique index (a limit of
    the index, not of the value) is refused by PostgreSQL at the flush; the spawning row
    fails alone, and the rows committed with it land."""
    kinds = ["ok", "ok", "child_key_huge", "ok"]
    ids = client.insert_many([Insert(Poison, {"kind": k}) for k in kinds])
    _rows, _results, report = _claim_run_flush(dsn, schema, [Poison], "poison")
    assert set(report.rejected) == {ids[2]}
    inst = assert_failed(client, ids[2], "index row requires")
    assert "could not be stored" in inst.last_error and "[54000]" in inst.last_error
    for iid in ids[:2] + ids[3:]:
        assert_done(client, iid, "ok")
    (children,) = db.execute(
        f'SELECT count(*) FROM "{schema}".instances WHERE parent_id IS NOT NULL'
    ).fetchone()
    assert children == 0 and _crashes(db, schema) == 0


def test_drain_tallies_the_refused_outcome_as_a_stop(dsn, schema, client, no_validation):
    client.insert_many([Insert(Poison, {"kind": k}) for k in ["ok", "stop_reason_nul", "ok"]])
    tally = drain(dsn, [Poison], schema=schema)
    assert (tally.done, tally.stop, tally.stale) == (2, 1, 0)


# --------------------------------------------------------------------------- 2. what a worker reads


def test_an_undecodable_signal_fails_its_instance_alone(dsn, schema, client, db):
    """A payload nested deeper than Python decodes, stored behind the client's back: the
    batched inbox read of the claim marks that one row, which fails naming the signal; the
    19 others claimed with it run."""
    ids = client.insert_many([Insert(Parked, {}) for _ in range(20)])
    drain(dsn, [Parked], schema=schema)
    sids = [client.signal(iid, "go", {"i": i}) for i, iid in enumerate(ids)]
    db.execute(f'UPDATE "{schema}".signals SET payload = %s::jsonb WHERE id = %s', [deep_json(2000), sids[7]])
    drain(dsn, [Parked], schema=schema, batch=100)
    inst = assert_failed(client, ids[7], f"signal {sids[7]} ('go') payload cannot be decoded")
    assert "nested deeper than this process can decode (values are limited to 256 levels)" in inst.last_error
    for i, iid in enumerate(ids):
        if i != 7:
            assert_done(client, iid, {"i": i})
    assert _crashes(db, schema) == 0


def test_an_undecodable_child_fails_its_parent_alone(dsn, schema, client, db):
    parents = client.insert_many([Insert(Parent, {"kind": "ok"}) for _ in range(3)])
    drain(dsn, [Parent], schema=schema)  # the children wait: their machine is not drained
    child = db.execute(
        f'SELECT min(id) FROM "{schema}".instances WHERE parent_id = %s', [parents[1]]
    ).fetchone()[0]
    db.execute(f'UPDATE "{schema}".instances SET state = %s::jsonb WHERE id = %s', [deep_json(2000), child])
    drain(dsn, [Parent, Poison], schema=schema)
    assert_failed(client, parents[1], f"child {child} state cannot be decoded: nested deeper")
    assert_done(client, parents[0], ["done", "done", "done"])
    assert_done(client, parents[2], ["done", "done", "done"])


def test_an_undecodable_state_fails_its_instance_alone(dsn, schema, client, db):
    ids = client.insert_many([Insert(Poison, {"kind": "ok"}) for _ in range(5)])
    db.execute(f'UPDATE "{schema}".instances SET state = %s::jsonb WHERE id = %s', [deep_json(2000), ids[2]])
    tally = drain(dsn, [Poison], schema=schema)
    assert (tally.done, tally.stop) == (4, 1)
    (status, error) = db.execute(
        f'SELECT status, last_error FROM "{schema}".instances WHERE id = %s', [ids[2]]
    ).fetchone()
    assert status == "failed"
    assert error.startswith("state of poison does not decode: nested deeper than this worker can decode")
    with pytest.raises(InvalidValue, match=f"state of instance {ids[2]} cannot be decoded: nested deeper"):
        client.get(ids[2])
    assert _crashes(db, schema) == 0


# --------------------------------------------------------------------------- 2, 3. the client


def _stored(db, schema: str) -> tuple[int, int]:
    (n,) = db.execute(f'SELECT count(*) FROM "{schema}".instances').fetchone()
    (s,) = db.execute(f'SELECT count(*) FROM "{schema}".signals').fetchone()
    return n, s


REFUSED_STATES = [
    ({"deep": nested(values.MAX_DEPTH)}, "state is nested deeper than 256 levels"),
    (nested(990), "state is nested deeper than 256 levels"),
    (nested(5000), "state is nested deeper than 256 levels"),
    ({"note": "a\x00b"}, "state contains a NUL character (U+0000) at $.note"),
    ({"a": [{"k\x00": 1}]}, "state contains a NUL character (U+0000) at $.a[0] (a key)"),
    ({"total": float("inf")}, "state holds inf or nan at $.total; JSON cannot hold them"),
    ({"xs": [1.0, None, float("nan")]}, "state holds inf or nan at $.xs[2]"),
]


@pytest.mark.parametrize(("state", "message"), REFUSED_STATES)
def test_the_client_refuses_a_state_it_could_not_store_faithfully(dsn, schema, client, db, state, message):
    with pytest.raises(InvalidValue, match=re.escape(message)):
        client.insert(Poison, state)
    with pytest.raises(InvalidValue) as many:
        client.insert_many([Insert(Poison, {"kind": "ok"}), Insert(Poison, state)])
    assert str(many.value).startswith("insert_many row 1: ") and message in str(many.value)
    assert _stored(db, schema) == (0, 0)


def _two_rows_one_bad_key(c, t):
    return c.insert_many(
        [Insert(Poison, {}, correlation_key="a"), Insert(Poison, {}, correlation_key="\x00")]
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, t: c.signal(t, "go", {"d": nested(values.MAX_DEPTH)}), "signal payload is nested deeper"),
        (lambda c, t: c.signal(t, "go", nested(990)), "signal payload is nested deeper than 256 levels"),
        (lambda c, t: c.signal(t, "go", {"s": "\x00"}), "signal payload contains a NUL character"),
        (lambda c, t: c.signal(t, "go", {"n": float("nan")}), "signal payload holds inf or nan at $.n"),
        (lambda c, t: c.signal(t, "g\x00o", {}), "signal name contains a NUL character"),
        (lambda c, t: c.signal(t, "go", {}, dedup_key="d\x00"), "dedup_key contains a NUL character"),
        (lambda c, t: c.signal("key\x00", "go", {}), "signal target (a correlation key) contains a NUL"),
        (lambda c, t: c.insert(Poison, {}, correlation_key="k\x00"), "correlation_key contains a NUL"),
        (lambda c, t: c.insert(Poison, {}, concurrency_key=("k", "\x00")), "concurrency_key contains a NUL"),
        (lambda c, t: c.insert("poi\x00son", {}, queue="q"), "machine name contains a NUL"),
        (lambda c, t: c.insert(Poison, {}, queue="q\x00"), "queue contains a NUL"),
        (lambda c, t: c.insert(Poison, {}, schedule_in=1e300), "schedule_in must be a finite number"),
        (lambda c, t: c.insert(Poison, {}, weight=float("inf")), "weight must be a positive finite number"),
        (_two_rows_one_bad_key, "insert_many row 1: correlation_key contains a NUL"),
    ],
)  # fmt: skip
def test_the_client_refuses_other_values_it_could_not_store(dsn, schema, client, db, call, message):
    target = client.insert(Parked)
    before = _stored(db, schema)
    with pytest.raises(InvalidValue) as refused:
        call(client, target)
    assert message in str(refused.value)
    assert _stored(db, schema) == before


def test_the_async_client_refuses_the_same(dsn, schema, db):
    async def go():
        async with AsyncClient(dsn, schema=schema) as c:
            with pytest.raises(InvalidValue, match="state holds inf or nan"):
                await c.insert(Poison, {"x": float("-inf")})
            with pytest.raises(InvalidValue, match="insert_many row 0: state is nested deeper"):
                await c.insert_many([Insert(Poison, nested(300))])
            with pytest.raises(InvalidValue, match="signal payload contains a NUL"):
                await c.signal(1, "go", "\x00")

    asyncio.run(go())
    assert _stored(db, schema) == (0, 0)


def test_values_at_the_limit_are_stored_and_run(dsn, schema, client):
    """256 levels, a backslash before the text u0000 (not a NUL), None and ordinary floats."""

    class Echo(FSM, name="poison_echo", queue="poison"):
        @step(initial=True)
        def go(self, ctx):
            return Done(ctx.state)

    states = [
        nested(values.MAX_DEPTH),
        {"deep": nested(values.MAX_DEPTH - 1)},
        {"text": "\\u0000 is six characters here", "brackets": "[[[[{{{{" * 100},
        {"none": None, "pi": 3.25, "big": 10**30},
        [{"i": i} for i in range(1000)],
    ]
    ids = [client.insert(Echo, s) for s in states]
    ids += client.insert_many([Insert(Echo, s) for s in states])
    target = client.insert(Parked)
    client.signal(target, "go", nested(values.MAX_DEPTH))
    drain(dsn, [Echo, Parked], schema=schema)
    for iid, s in zip(ids, states + states, strict=True):
        assert_done(client, iid, s)
    assert_done(client, target, nested(values.MAX_DEPTH))


def test_bytes_are_stored_as_base64_text(dsn, schema, client):
    """Documented, not refused: JSON has no bytes, so msgspec writes them as base64 text. A
    State field typed ``bytes`` decodes them back; a plain dict state keeps the text."""

    class Blob(FSM, name="poison_blob", queue="poison"):
        class State(msgspec.Struct):
            data: bytes

        @step(initial=True)
        def go(self, ctx):
            return Done({"type": type(ctx.state.data).__name__, "len": len(ctx.state.data)})

    typed = client.insert(Blob, {"data": b"\x00\x01\xff"})
    plain = client.insert("poison_plain", {"data": b"\x00\x01\xff"}, queue="elsewhere")
    assert client.get(typed).state == {"data": base64.b64encode(b"\x00\x01\xff").decode()} == {"data": "AAH/"}
    assert client.get(plain).state == {"data": "AAH/"}
    drain(dsn, [Blob], schema=schema)
    assert_done(client, typed, {"type": "bytes", "len": 3})


# --------------------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(
    ("doc", "depth"),
    [(b"1", 0), (b"[]", 1), (b'{"a":[1,{"b":[]}]}', 4), (b'["[[[[", {"x": "]]"}]', 2), (b'["\\"[["]', 1)],
)
def test_json_depth_ignores_brackets_in_strings(doc, depth):
    assert values.json_depth(doc) == depth


def test_a_nul_escape_is_told_from_an_escaped_backslash():
    values.check_json(msgspec.json.encode("\\u0000"), "x")  # a backslash, then the text u0000
    with pytest.raises(InvalidValue, match="NUL"):
        values.check_json(msgspec.json.encode("\\\x00"), "x")  # a backslash, then a NUL
