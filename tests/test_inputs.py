"""Human input: awaits that ask for input are listed (client, SQL, CLI), answered by
``respond`` after a check against the stored JSON Schema and choices, and seen typed by the
step; nothing stays pending once the instance woke, finished, was cancelled or timed out."""

from __future__ import annotations

import json

import pytest

from pgdurable import InvalidInput, NoTarget
from pgdurable.client.inputs import check_answer, respond_params, target_params
from pgdurable.testing import assert_done, assert_failed, assert_status, drain

from .input_machines import Expense, Size, Survey
from .supervised import start
from .test_cli import cli, ok
from .test_races import Background, _dbname, wait_until_blocked

ALL = [Expense, Size, Survey]


def _signals(db, schema, iid) -> int:
    return db.execute(f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', [iid]).fetchone()[0]


def test_a_pending_input_is_listed_with_what_it_asks(dsn, schema, client, db):
    e = client.insert(Expense, {"amount": 120, "timeout": 3600}, correlation_key="exp:1")
    s = client.insert(Size, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    pending = {p.instance: p for p in client.inputs()}
    assert set(pending) == {e, s}
    exp = pending[e]
    assert (exp.fsm, exp.step, exp.name, exp.prompt) == (
        "in_expense",
        "decide",
        "approval",
        "Approve 120 EUR?",
    )
    assert exp.correlation_key == "exp:1" and exp.choices is None and exp.deadline is not None
    assert exp.deadline == client.get(e).await_deadline
    # the schema comes from the input type the receiving step declares
    assert exp.schema["$defs"]["Approval"]["required"] == ["approved", "amount"]
    size = pending[s]
    assert (size.name, size.schema, size.choices, size.deadline) == (
        "size",
        {"enum": ["L", "M", "S"]},
        ["S", "M"],
        None,
    )
    assert [p.instance for p in client.inputs(machine=Size)] == [s]
    assert [p.instance for p in client.inputs(machine="in_expense", queue="rt")] == [e]
    assert client.inputs(queue="elsewhere") == []
    assert [p.instance for p in client.inputs(after=min(e, s))] == [max(e, s)]
    # the same from SQL
    rows = db.execute(
        f'SELECT instance_id, name, prompt, choices FROM "{schema}".pending_inputs ORDER BY 1'
    ).fetchall()
    assert rows == [(e, "approval", "Approve 120 EUR?", None), (s, "size", "Which size?", ["S", "M"])]


def test_respond_refuses_a_bad_answer_before_storing_anything(dsn, schema, client, db):
    e = client.insert(Expense, {"amount": 5})
    s = client.insert(Size, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)

    with pytest.raises(InvalidInput) as wrong:
        client.respond(e, "approval", {"approved": "yes", "amount": 5})
    assert wrong.value.field == "$.approved" and "is not of type 'boolean'" in str(wrong.value)
    with pytest.raises(InvalidInput) as missing:
        client.respond(e, "approval", {"approved": True})
    assert missing.value.field == "$.amount" and "missing" in str(missing.value)
    with pytest.raises(InvalidInput) as whole:
        client.respond(e, "approval", [True, 5])
    assert whole.value.field == "$"
    with pytest.raises(InvalidInput) as outside:
        client.respond(s, "size", "L")  # the schema allows L, the choices do not
    assert "is not one of the choices ['S', 'M']" in str(outside.value)
    with pytest.raises(InvalidInput):
        client.respond(s, "size", "XL")

    for iid in (e, s):
        assert _signals(db, schema, iid) == 0
        assert_status(client, iid, "awaiting_signal")
    assert len(client.inputs()) == 2


def test_respond_wakes_the_step_with_the_typed_value(dsn, schema, client):
    e = client.insert(Expense, {"amount": 70}, correlation_key="exp:70")
    s = client.insert(Size, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    assert client.respond("exp:70", "approval", {"approved": True, "amount": 70}) > 0
    assert client.respond(s, "size", "M") > 0
    assert [p.instance for p in client.inputs()] == []  # answered: no longer pending
    drain(dsn, ALL, schema=schema)
    assert_done(client, e, {"type": "Approval", "approved": True, "amount": 70})
    assert_done(client, s, {"size": "M", "woken_by": ["size"]})


def test_respond_to_what_does_not_await_it_is_no_target(dsn, schema, client):
    e = client.insert(Expense, {"amount": 1})
    with pytest.raises(NoTarget, match="does not await an input"):
        client.respond(e, "approval", {"approved": True, "amount": 1})  # runnable: not asked yet
    drain(dsn, ALL, schema=schema, collapse_time=False)
    with pytest.raises(NoTarget, match="awaits input 'approval', not 'other'"):
        client.respond(e, "other", 1)
    with pytest.raises(NoTarget, match="no live instance"):
        client.respond(10**12, "approval", {})
    with pytest.raises(NoTarget, match="no live instance"):
        client.respond("no-such-key", "approval", {})
    client.respond(e, "approval", {"approved": False, "amount": 1})
    with pytest.raises(NoTarget, match="does not await an input"):
        client.respond(e, "approval", {"approved": True, "amount": 1})  # woken already
    drain(dsn, ALL, schema=schema)
    with pytest.raises(NoTarget, match="no live instance"):
        client.respond(e, "approval", {"approved": True, "amount": 1})  # finished


def test_another_name_wakes_it_without_an_input(dsn, schema, client):
    s = client.insert(Size, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    client.signal(s, "skip", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, s, {"size": None, "woken_by": ["skip"]})


def test_a_timeout_wakes_it_and_nothing_stays_pending(dsn, schema, client, db):
    e = client.insert(Expense, {"amount": 9, "timeout": 3600})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    assert [p.instance for p in client.inputs()] == [e]
    tally = drain(dsn, ALL, schema=schema)  # time collapsed: the await times out
    assert tally.timeouts == 1
    assert_failed(client, e, "no answer in time")
    assert client.inputs() == []
    assert db.execute(f'SELECT count(*) FROM "{schema}".pending_inputs').fetchone() == (0,)
    with pytest.raises(NoTarget):
        client.respond(e, "approval", {"approved": True, "amount": 9})


def test_a_timeout_alone_leaves_nothing_pending(dsn, schema, client):
    """The expiry itself (before any step ran) takes the input off the list."""
    e = client.insert(Expense, {"amount": 9, "timeout": 3600})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    with client._get_pool().connection() as conn:
        conn.execute(client.q["instance_await_expire"], {"horizon": "2 hours", "limit": 10})
    assert_status(client, e, "runnable")
    assert client.inputs() == []
    with pytest.raises(NoTarget, match="does not await an input"):
        client.respond(e, "approval", {"approved": True, "amount": 9})


def test_cancel_leaves_nothing_pending(dsn, schema, client):
    e = client.insert(Expense, {"amount": 3})
    keep = client.insert(Expense, {"amount": 4})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    assert client.cancel(e, "withdrawn").outcome == "cancelled"
    assert [p.instance for p in client.inputs()] == [keep]
    with pytest.raises(NoTarget):
        client.respond(e, "approval", {"approved": True, "amount": 3})


def test_finishing_leaves_nothing_pending_and_asking_again_lists_the_new_question(dsn, schema, client):
    v = client.insert(Survey, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    for n in range(3):
        (p,) = client.inputs()
        assert (p.instance, p.prompt, p.schema) == (v, f"question {n}", {"type": "integer"})
        client.respond(v, "answer", n * 10)
        drain(dsn, ALL, schema=schema, collapse_time=False)
    assert_done(client, v, [0, 10, 20])
    assert client.inputs() == []


def test_a_plain_signal_is_not_checked_but_the_step_decodes_it_with_its_type(dsn, schema, client):
    e = client.insert(Expense, {"amount": 2})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    client.signal(e, "approval", {"approved": "yes", "amount": 2})  # signal skips the schema
    drain(dsn, ALL, schema=schema)
    inst = assert_failed(client, e, "InvalidInput")
    assert "input 'approval' does not fit Approval" in inst.last_error and "$.approved" in inst.last_error


def test_a_type_msgspec_cannot_describe_is_refused_early(dsn, schema, client):
    from pgdurable import FSM, Await, DefinitionError, Done, step

    with pytest.raises(DefinitionError, match="not a type msgspec describes"):
        step(input=object)(lambda self, ctx: None)

    class Odd(FSM, name="in_odd", queue="rt"):
        @step(initial=True)
        def ask(self, ctx):
            return Await("x", then=self.end, prompt="?", schema=object, choices=["a"])

        @step
        def end(self, ctx):
            return Done(None)

    iid = client.insert(Odd, {})
    drain(dsn, [Odd], schema=schema)
    assert "Await schema <class 'object'> is not a type msgspec describes" in client.get(iid).last_error
    assert client.inputs() == []


def test_race_a_stale_request_is_not_answered(dsn, schema, client, db):
    """The answer was checked against question 0; before it is delivered the instance asks
    question 1 on the same name. Guard: input_respond delivers only while the request it was
    checked against is pending (``input_request = %(request)s``)."""
    v = client.insert(Survey, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    with client._get_pool().connection() as conn:
        row = conn.execute(client.q["input_pending_get"], target_params(v, "answer")).fetchone()
    iid, request, encoded = check_answer(v, "answer", row, 7)
    client.respond(v, "answer", 1)  # someone else answered question 0 …
    drain(dsn, ALL, schema=schema, collapse_time=False)  # … and it asks question 1
    assert client.inputs()[0].prompt == "question 1"
    with client._get_pool().connection() as conn:
        late = conn.execute(client.q["input_respond"], respond_params(iid, "answer", request, encoded))
        assert late.fetchone() is None
    assert _signals(db, schema, v) == 0
    assert_status(client, v, "awaiting_signal")


def test_race_respond_waits_for_a_timeout_in_progress_then_is_refused(dsn, schema, client, db):
    """The await's deadline fires (its transaction still open) while an answer that passed
    the check is being delivered. Guard: input_respond locks the row and re-checks
    ``status = 'awaiting_signal'`` on its newest version; the expiry left awaits and the
    request as they were, so without that guard the answer would be stored and wake it again."""
    e = client.insert(Expense, {"amount": 8, "timeout": 3600})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    with db.transaction():
        fired = db.execute(client.q["instance_await_expire"], {"horizon": "2 hours", "limit": 10}).fetchall()
        assert [r[0] for r in fired] == [e]
        answer = Background(lambda: client.respond(e, "approval", {"approved": True, "amount": 8}))
        wait_until_blocked(db, _dbname(db))
    with pytest.raises(NoTarget, match="no longer awaits"):
        answer.value()
    assert _signals(db, schema, e) == 0
    drain(dsn, ALL, schema=schema)
    assert_failed(client, e, "no answer in time")


def test_cli_lists_and_answers_inputs(dsn, schema, client):
    db_opts = ["--dsn", dsn, "--schema", schema]
    e = client.insert(Expense, {"amount": 33, "timeout": 600}, correlation_key="exp:33")
    s = client.insert(Size, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)

    listed = json.loads(ok(cli("inputs", "--json", *db_opts)))
    assert listed["next_cursor"] is None
    by_id = {x["instance"]: x for x in listed["inputs"]}
    assert set(by_id) == {e, s}
    assert by_id[e]["prompt"] == "Approve 33 EUR?" and by_id[e]["name"] == "approval"
    assert by_id[e]["machine"] == "in_expense" and by_id[e]["step"] == "decide"
    assert by_id[e]["deadline"] is not None and by_id[e]["schema"]["$ref"] == "#/$defs/Approval"
    assert by_id[s]["choices"] == ["S", "M"] and by_id[s]["deadline"] is None
    only = json.loads(ok(cli("inputs", "--json", "--machine", "in_size", *db_opts)))
    assert [x["instance"] for x in only["inputs"]] == [s]
    page = json.loads(ok(cli("inputs", "--json", "--limit", "1", *db_opts)))
    assert [x["instance"] for x in page["inputs"]] == [min(e, s)] and page["next_cursor"] == min(e, s)
    text = ok(cli("inputs", *db_opts))
    assert "Approve 33 EUR?" in text and "exp:33" in text and '["S","M"]' in text

    bad = cli("respond", str(e), "approval", '{"approved": true}', *db_opts)
    assert bad.returncode == 2 and "refused at $.amount: missing" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert cli("respond", str(e), "nope", "1", *db_opts).returncode == 3
    out = ok(cli("respond", "exp:33", "approval", '{"approved": true, "amount": 33}', "--by-key", *db_opts))
    assert out.startswith("answered 'approval' of 'exp:33'")
    assert [x["instance"] for x in json.loads(ok(cli("inputs", "--json", *db_opts)))["inputs"]] == [s]
    drain(dsn, ALL, schema=schema)
    assert_done(client, e, {"type": "Approval", "approved": True, "amount": 33})


def test_respond_under_a_supervisor(dsn, schema, client, sups, tmp_path):
    """A real supervisor parks the instance; the answer wakes it, and the step sees the
    typed value."""
    start(sups, tmp_path, dsn, schema, modules='["tests.input_machines"]')
    e = client.insert("in_expense", {"amount": 250})
    from .supervised import wait_until

    wait_until(lambda: client.inputs(), what="the input to be asked")
    with pytest.raises(InvalidInput):
        client.respond(e, "approval", {"approved": True, "amount": "250"})
    client.respond(e, "approval", {"approved": True, "amount": 250, "note": "ok"})
    assert type(client.wait(e, timeout=30)).__name__ == "Done"
    assert_done(client, e, {"type": "Approval", "approved": True, "amount": 250})
    assert sups[0].stop() == 0
