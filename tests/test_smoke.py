from pgdurable import Insert
from pgdurable.testing import assert_done, drain

from .machines import Counter, Flaky, send_email


def test_counter_runs_to_done(dsn, schema, client):
    iid = client.insert(Counter, Counter.State(limit=3))
    tally = drain(dsn, [Counter], schema=schema)
    assert_done(client, iid, {"n": 3})
    assert tally.next == 4 and tally.done == 1


def test_job_retries_then_done(dsn, schema, client):
    iid = client.insert(send_email, {"to": "a@b", "fail": 2})
    tally = drain(dsn, [send_email], schema=schema)
    inst = assert_done(client, iid, {"sent_to": "a@b", "attempt": 2})
    assert inst.attempt == 2
    assert tally.retry == 2 and tally.done == 1


def test_insert_many_by_name(dsn, schema, client):
    drain(dsn, [Flaky], schema=schema)  # registers the machine
    ids = client.insert_many([Insert("flaky", {"fail_times": i}) for i in range(3)])
    drain(dsn, [Flaky], schema=schema)
    for i, iid in enumerate(ids):
        assert_done(client, iid, {"attempts": i + 1})
