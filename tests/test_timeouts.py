"""Step timeouts through the real execution path (testing.drain): the declaration, an async
step cancelled at its deadline, a sync step's thread that outlives it, the plumbing of
StepTimeout to handle(); and the isolation config."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import pickle
import threading
from typing import Any

import pytest

from pgdurable import FSM, Context, DefinitionError, Done, StepProcessDied, StepTimeout, Stop, job, step
from pgdurable.contract.errors import ConfigError
from pgdurable.runtime.config import parse
from pgdurable.testing import assert_done, assert_failed, drain

from . import timeout_machines as tm

# --------------------------------------------------------------------------- declaration


def test_step_timeout_takes_seconds_or_a_timedelta_and_the_machine_default():
    steps = tm.Hangs.__pgdurable_steps__
    assert steps["start"].timeout == 0.3  # the machine's step_timeout
    assert tm.Stubborn.__pgdurable_steps__["start"].timeout == 0.2  # a timedelta
    assert tm.Quick.__pgdurable_steps__["second"].timeout == 30
    assert tm.slow_job.__pgdurable_steps__["perform"].timeout == 0.3

    class Own(FSM, name="to_own", step_timeout=dt.timedelta(minutes=1)):
        @step(initial=True, timeout=2)
        def a(self, ctx: Context) -> Any:
            return Done()

        @step
        def b(self, ctx: Context) -> Any:
            return Done()

    assert Own.__pgdurable_steps__["a"].timeout == 2  # its own wins
    assert Own.__pgdurable_steps__["b"].timeout == 60

    class Sub(Own, name="to_sub", step_timeout=5):
        pass

    assert Sub.__pgdurable_steps__["b"].timeout == 5  # a subclass may change the default
    assert Sub.__pgdurable_steps__["a"].timeout == 2


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "10", True, dt.timedelta(0)])
def test_a_bad_timeout_is_a_definition_error_naming_the_step(bad):
    with pytest.raises(DefinitionError, match="step s: timeout must be"):

        @step(timeout=bad)
        def s(self: Any, ctx: Context) -> Any:
            return Done()

    with pytest.raises(DefinitionError, match="Bad step_timeout: timeout must be"):

        class Bad(FSM, name="to_bad", step_timeout=bad):
            @step
            def s(self, ctx: Context) -> Any:
                return Done()

    with pytest.raises(DefinitionError, match="job j: timeout must be"):

        @job(timeout=bad)
        def j(args: dict[str, Any]) -> Any:
            return None


def test_step_timeout_and_process_death_pickle_with_their_fields():
    exc = pickle.loads(pickle.dumps(StepTimeout("start", 0.5)))
    assert (type(exc), exc.step, exc.timeout, str(exc)) == (
        StepTimeout,
        "start",
        0.5,
        "step 'start' timed out after 0.5 s",
    )
    assert isinstance(exc, TimeoutError)
    died = pickle.loads(pickle.dumps(StepProcessDied("start", "signal 9")))
    assert (died.step, died.status, str(died)) == (
        "start",
        "signal 9",
        "step process died: signal 9 (step 'start')",
    )


# --------------------------------------------------------------------------- async steps


def test_an_async_step_is_cancelled_at_its_deadline_and_handle_sees_step_timeout(dsn, schema, client):
    iid = client.insert(tm.Hangs, {})
    tally = drain(dsn, [tm.Hangs], schema=schema)
    assert (tally.retry, tally.stop) == (1, 1)
    assert_failed(client, iid, "saw StepTimeout of start after 0.3 s")
    attempts = client.history(iid)
    assert [(a.attempt, a.outcome) for a in attempts] == [(0, "retry"), (1, "stop")]
    assert attempts[0].error == "timeout start 0.3"
    assert "StepTimeout" in (attempts[1].traceback or "")


def test_an_async_step_that_swallows_its_cancellation_still_times_out(dsn, schema, client):
    iid = client.insert(tm.Stubborn, {})
    drain(dsn, [tm.Stubborn], schema=schema)
    inst = assert_failed(client, iid, "StepTimeout")
    assert inst.result is None  # "swallowed" was late: discarded


def test_a_job_timeout_is_retried_like_any_error_then_fails(dsn, schema, client):
    iid = client.insert(tm.slow_job, {})
    tally = drain(dsn, [tm.slow_job], schema=schema)
    assert (tally.retry, tally.stop) == (1, 1)
    assert_failed(client, iid, "gave up after 2 attempts: StepTimeout")


def test_steps_within_their_timeout_run_as_usual(dsn, schema, client):
    iid = client.insert(tm.Quick, {})
    drain(dsn, [tm.Quick], schema=schema)
    assert_done(client, iid, {"n": 1})


def test_a_timeout_error_the_step_raises_itself_is_not_a_step_timeout(dsn, schema, client):
    iid = client.insert(tm.OwnTimeout, {})
    drain(dsn, [tm.OwnTimeout], schema=schema)
    inst = assert_failed(client, iid, 'TimeoutError("the step\'s own")')
    assert "StepTimeout" not in (inst.last_error or "")


# --------------------------------------------------------------------------- sync steps in threads

released = threading.Event()


class Late(FSM, name="to_late", queue="rt"):
    """Its thread goes on past the deadline; handle() lets it go on to return ``Done``."""

    @step(timeout=0.2)
    def start(self, ctx: Context) -> Any:
        released.wait(60)
        return Done("late")

    def handle(self, exc: BaseException, ctx: Context) -> Any:
        released.set()  # the thread returns after the deadline: its Done must be discarded
        return Stop(f"{type(exc).__name__}: {exc}")


def test_a_sync_step_fails_at_its_deadline_and_its_late_return_is_discarded(dsn, schema, client, caplog):
    released.clear()
    iid = client.insert(Late, {})
    with caplog.at_level(logging.INFO, logger="pgdurable.executor"):
        tally = drain(dsn, [Late], schema=schema)  # returns once the thread is done (asyncio.run)
    assert (tally.stop, tally.done) == (1, 0)
    inst = assert_failed(client, iid, "StepTimeout: step 'start' timed out after 0.2 s")
    assert inst.result is None
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "step_overdue" in events
    overdue = next(r for r in caplog.records if getattr(r, "event", None) == "step_overdue")
    assert (overdue.instance, overdue.step, overdue.timeout) == (iid, "start", 0.2)
    # The thread returned after the deadline: reported, and its Done went nowhere.
    gone = next(r for r in caplog.records if getattr(r, "event", None) == "step_overdue_gone")
    assert "discarded" in gone.getMessage()
    assert client.get(iid).status == "failed"


def test_the_row_fails_at_the_deadline_while_the_thread_still_runs(dsn, schema, client, tmp_path):
    iid = client.insert(tm.Blocks, {"release": str(tmp_path / "go")})

    async def run() -> None:
        from pgdurable.testing import adrain

        task = asyncio.ensure_future(adrain(dsn, [tm.Blocks], schema=schema))
        # The row fails at the deadline while the thread still waits for its file.
        while client.get(iid).status != "failed":
            await asyncio.sleep(0.05)
        (tmp_path / "go").write_text("")
        await task

    asyncio.run(run())
    inst = assert_failed(client, iid, "StepTimeout")
    assert inst.result is None


# --------------------------------------------------------------------------- config

BASE = {"queues": {"q": {}}}


def test_isolation_defaults_to_threads_and_takes_process():
    assert parse(BASE).queues["q"].isolation == "thread"
    assert parse({"queues": {"q": {"isolation": "process"}}}).queues["q"].isolation == "process"


@pytest.mark.parametrize(
    ("value", "message"),
    [("processes", 'expected "thread" or "process", got \'processes\''), (1, "Expected `str`, got `int`")],
)
def test_a_bad_isolation_names_the_key_and_the_file(value, message):
    with pytest.raises(ConfigError) as err:
        parse({"queues": {"q": {"isolation": value}}}, "/etc/pgdurable/config.toml")
    assert message in str(err.value)
    assert err.value.key == "queues.q.isolation"
    assert err.value.file == "/etc/pgdurable/config.toml"
