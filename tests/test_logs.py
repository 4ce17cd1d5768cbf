"""Structured logs: every line names its event, with the instance, machine, step and attempt
where there is one; text or JSON lines (``[logging]``), from real supervisors and workers."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from pgdurable import FSM, Done, Next, Retry, step
from pgdurable.contract.fsm import Context
from pgdurable.runtime.config import LogSettings
from pgdurable.runtime.logs import LineHandler, configure
from pgdurable.testing import drain

from .supervised import ROOT, start, wait_until

MODULES = '["tests.log_machines", "tests.runtime_machines"]'
#: The start of a text line: ``2026-01-05 10:00:00.123 INFO pgdurable.worker[4211] ``.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+\[\d+\] "
)


@pytest.fixture
def root_logging():
    """configure() changes the root logger: put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(h)
        for name in h.settings.levels:
            logging.getLogger(name).setLevel(logging.NOTSET)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def records(text: str) -> list[dict]:
    """Every line of a JSON log, parsed: a line that is not one whole JSON object fails."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {n} is not a JSON object: {line!r}\n{text}") from None
    return out


# -- real supervisors ---------------------------------------------------------------------------


def test_json_lines_of_supervisor_workers_and_maintenance(dsn, schema, client, sups, tmp_path):
    """A step that raises, a step that logs, a worker that dies in its step: every line the
    supervisor, its workers and its maintenance process wrote is one JSON object with an
    event, and the step's lines carry the instance, machine, step and attempt."""
    logging_toml = '\n[logging]\nformat = "json"\n\n[logging.levels]\n"pgdurable.worker" = "debug"\n'
    sup = start(sups, tmp_path, dsn, schema, processes=1, modules=MODULES, extra=logging_toml)
    bad = client.insert("flaky", {"amount": 42})
    chatty = client.insert("chatty", {})
    assert client.wait(bad, timeout=30).__class__.__name__ == "Failed"
    assert client.wait(chatty, timeout=30).__class__.__name__ == "Done"
    dies = client.insert("suicide", {})
    assert client.wait(dies, timeout=60).error == "worker died 3 times in step perform"
    assert sup.stop() == 0

    lines = records(sup.log.read_text())
    for r in lines:
        assert {"time", "level", "logger", "pid", "event", "message"} <= set(r), r
        assert r["event"] and isinstance(r["pid"], int), r

    def only(event: str, **fields: object) -> list[dict]:
        return [r for r in lines if r["event"] == event and all(r.get(k) == v for k, v in fields.items())]

    supervisor = sup.proc.pid
    # The step's error: once per attempt, with its traceback; a warning while it is retried,
    # an error when the instance fails.
    where = {"instance": bad, "fsm": "flaky", "step": "perform"}
    (retried,) = only("step_error", **where)
    (failed,) = only("step_failed", **where)
    assert (retried["attempt"], retried["level"], retried["outcome"]) == (0, "warning", "retry")
    assert (failed["attempt"], failed["level"], failed["outcome"]) == (1, "error", "stop")
    for r, attempt in ((retried, 0), (failed, 1)):
        assert r["error_type"] == "ValueError" and r["error"] == f"card declined on attempt {attempt}"
        assert r["exception"].startswith("Traceback") and "in flaky" in r["exception"]
        assert r["pid"] != supervisor and r["logger"] == "pgdurable.worker"
    # ctx.log: the step's own lines, with its own event or step_log.
    charging = only("charging", instance=bad, fsm="flaky", step="perform")
    assert [r["attempt"] for r in charging] == [0, 1] and charging[0]["amount"] == 42
    (hello,) = only("step_log", instance=chatty, fsm="chatty", step="hello", attempt=0)
    assert hello["message"] == "hello from chatty" and hello["logger"] == "pgdurable.step"
    # The worker killed in its step three times: each death, each reclaim, then the failure.
    died = only("worker_died", queue="rt")
    assert len(died) == 3 and all(r["exit_code"] == -signal.SIGKILL for r in died)
    reclaims = only("reclaimed", cause="worker_died")
    assert [dies in r["instances"] and r["crashed"] == [dies] for r in reclaims] == [True] * 3
    assert reclaims[-1]["failed"] == [dies]
    (limit,) = only("crash_limit", instance=dies)
    assert limit["level"] == "error"
    # The supervisor's own lines, and the per-logger level of [logging.levels].
    assert only("worker_started", pid=supervisor, queue="rt") and only("maintenance_started", pid=supervisor)
    assert only("draining", pid=supervisor) and only("stopped", pid=supervisor)
    assert only("worker_starting", level="debug", queue="rt")
    assert not [r for r in lines if r["level"] == "debug" and r["logger"] != "pgdurable.worker"]


def test_text_lines_show_the_event_and_a_reload_switches_to_json(dsn, schema, client, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, modules=MODULES)
    chatty = client.insert("chatty", {})
    assert client.wait(chatty, timeout=30).__class__.__name__ == "Done"
    wait_until(lambda: "event=step_log" in sup.log.read_text(), what="the step's line")
    text = sup.log.read_text()
    supervisor = sup.proc.pid
    assert re.search(
        rf"^\S+ \S+ INFO pgdurable\.supervisor\[{supervisor}\] worker (\d+) started for queue rt "
        r"event=worker_started child=\1 queue=rt worker=\S+$",
        text,
        re.MULTILINE,
    ), text
    assert re.search(
        rf"INFO pgdurable\.step\[\d+\] hello from chatty event=step_log instance={chatty} fsm=chatty "
        r"step=hello attempt=0$",
        text,
        re.MULTILINE,
    ), text
    for line in text.splitlines():
        assert TEXT_LINE.match(line) and " event=" in line, line

    # [logging] is applied by a reload: the new generation writes JSON.
    sup.config.write_text(sup.config.read_text() + '\n[logging]\nformat = "json"\n')
    os.kill(sup.proc.pid, signal.SIGHUP)

    def json_worker_started() -> bool:
        tail = sup.log.read_text()[len(text) :]
        return any('"event": "worker_started"' in line for line in tail.splitlines())

    wait_until(json_worker_started, what="a JSON line after the reload")
    assert sup.stop() == 0
    tail = sup.log.read_text()[len(text) :].splitlines()
    reloading = [n for n, line in enumerate(tail) if line.endswith(" event=reload")]
    assert reloading, tail  # the last text line; everything after it is JSON
    records("\n".join(tail[reloading[0] + 1 :]))


# -- the step's errors and ctx.log, through the real execution path ----------------------------------


class Handled(FSM, name="log_handled", queue="logs"):
    """Its step raises; handle() retries once, then moves on to a step that finishes."""

    @step(initial=True)
    def charge(self, ctx):
        raise KeyError("card")

    @step
    def refund(self, ctx):
        ctx.log.warning("refunding", extra={"event": "refund", "amount": 3})
        return Done({"refunded": True})

    def handle(self, exc, ctx):
        return Retry(delay=0) if ctx.attempt == 0 else Next(self.refund)


class Broken(FSM, name="log_broken", queue="logs"):
    @step(initial=True)
    def go(self, ctx):
        raise RuntimeError("step blew up")

    def handle(self, exc, ctx):
        raise TypeError("handler blew up")


def test_a_step_error_is_logged_once_with_its_context_and_traceback(dsn, schema, client, caplog):
    caplog.set_level(logging.DEBUG)
    handled = client.insert(Handled, {})
    broken = client.insert(Broken, {})
    drain(dsn, [Handled, Broken], schema=schema)
    steps = [r for r in caplog.records if getattr(r, "instance", None) in (handled, broken)]
    seen = [(r.instance, r.event, r.levelname, r.step, r.attempt) for r in steps]
    assert seen == [
        (handled, "step_error", "WARNING", "charge", 0),  # retried
        (broken, "handle_failed", "ERROR", "go", 0),  # handle() raised: the instance failed
        (handled, "step_error", "WARNING", "charge", 1),  # handled: moves on to refund
        (handled, "refund", "WARNING", "refund", 0),  # ctx.log, with an event of its own
    ]
    first, failed, moved, refund = steps
    assert (first.fsm, first.error_type, first.error, first.outcome) == (
        "log_handled",
        "KeyError",
        "'card'",
        "retry",
    )
    assert "retrying in 0 s (attempt 1)" in first.getMessage()
    assert first.exc_info and first.exc_info[0] is KeyError
    assert moved.outcome == "next" and "handle() chose next ('refund')" in moved.getMessage()
    assert failed.exc_info and failed.exc_info[0] is TypeError  # its context: the step's error
    assert failed.exc_info[1].__context__.args == ("step blew up",)
    assert (failed.error_type, failed.error) == ("RuntimeError", "step blew up")
    assert refund.amount == 3 and refund.name == "pgdurable.step" and refund.fsm == "log_handled"


def test_ctx_log_is_built_on_first_use():
    ctx = Context(7, "m", 1, "s", 2, {}, "q", 0, None, None)
    assert ctx._log is None  # a step that does not log pays nothing for it
    log = ctx.log
    assert ctx.log is log and log.extra == {
        "event": "step_log",
        "instance": 7,
        "fsm": "m",
        "step": "s",
        "attempt": 2,
    }
    msg, kwargs = log.process("x", {"extra": {"event": "mine", "n": 1}})
    assert kwargs["extra"] == {"event": "mine", "instance": 7, "fsm": "m", "step": "s", "attempt": 2, "n": 1}


# -- configure() ------------------------------------------------------------------------------


def test_json_and_text_formats(root_logging):
    out = io.StringIO()
    configure(LogSettings(format="json"), stream=out)
    log = logging.getLogger("pgdurable.worker")
    log.info("reclaimed %d rows", 3, extra={"event": "reclaimed", "instance": 12, "fsm": "a b"})
    logging.getLogger("psycopg.pool").warning("a line\nof a library")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        log.error("failed", exc_info=exc, extra={"event": "step_failed"})
    first, foreign, error = records(out.getvalue())
    assert list(first)[:6] == ["time", "level", "logger", "pid", "event", "message"]
    assert first["event"] == "reclaimed" and first["message"] == "reclaimed 3 rows"
    assert (first["instance"], first["fsm"], first["pid"], first["level"]) == (12, "a b", os.getpid(), "info")
    assert (foreign["event"], foreign["logger"], foreign["message"]) == (
        "log",
        "psycopg.pool",
        "a line\nof a library",
    )
    assert error["exception"].startswith("Traceback") and error["exception"].endswith("ValueError: boom")

    out = io.StringIO()
    configure(LogSettings(format="text"), stream=out)
    log.info(
        "reclaimed %d rows", 3, extra={"event": "reclaimed", "instance": 12, "fsm": "a b", "ids": [1, 2]}
    )
    line = out.getvalue().splitlines()[0]
    assert TEXT_LINE.match(line)
    assert line.endswith(
        f"INFO pgdurable.worker[{os.getpid()}] reclaimed 3 rows "
        'event=reclaimed instance=12 fsm="a b" ids=[1,2]'
    )
    assert (
        len(logging.getLogger().handlers)
        - sum(  # a reconfiguration replaces its handler
            not isinstance(h, LineHandler) for h in logging.getLogger().handlers
        )
        == 1
    )


def test_levels_the_flag_and_the_per_logger_table(root_logging):
    out = io.StringIO()
    settings = LogSettings(level="warning", levels={"pgdurable.reaper": "debug"})
    configure(settings, stream=out)
    logging.getLogger("pgdurable.worker").info("hidden", extra={"event": "x"})
    logging.getLogger("pgdurable.reaper").debug("shown", extra={"event": "y"})
    configure(settings, "info", stream=out)  # --log-level info wins over level
    logging.getLogger("pgdurable.worker").info("shown too", extra={"event": "z"})
    assert [line.split(" event=")[1] for line in out.getvalue().splitlines()] == ["y", "z"]
    configure(LogSettings(), stream=out)  # a reload without the table resets that logger
    assert logging.getLogger("pgdurable.reaper").level == logging.NOTSET


def test_one_write_per_line(tmp_path, root_logging):
    """Processes share stdout: each record, however long, reaches it in one write(2)."""
    path = tmp_path / "out.log"
    with path.open("w") as f:
        configure(LogSettings(format="json"), stream=f)
        writes = []
        real = os.write

        def counting(fd, data):
            writes.append(len(data))
            return real(fd, data)

        os.write = counting
        try:
            logging.getLogger("pgdurable.worker").warning("x" * 100_000, extra={"event": "big"})
        finally:
            os.write = real
    assert len(writes) == 1 and records(path.read_text())[0]["event"] == "big"


# -- the code itself ----------------------------------------------------------------------------

_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def _log_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        is_logger = name in {"log", "_log", "logger"} or (
            isinstance(target, ast.Call) and getattr(target.func, "attr", "") == "getLogger"
        )
        # A step's own ctx.log (the demo's machines) carries event=step_log by itself.
        if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "ctx":
            continue
        if is_logger and (node.func.attr in _LEVELS or node.func.attr == "log"):
            yield node


def _names_an_event(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
            return any(isinstance(k, ast.Constant) and k.value == "event" for k in kw.value.keys)
    return False


def test_every_log_call_of_pgdurable_names_its_event():
    """extra={"event": "…"} at every call site; the names are in docs/operations.md."""
    calls, missing, events = 0, [], set()
    for path in sorted((ROOT / "pgdurable").rglob("*.py")):
        for call in _log_calls(ast.parse(path.read_text())):
            calls += 1
            if not _names_an_event(call):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
            for kw in call.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
                    for k, v in zip(kw.value.keys, kw.value.values, strict=True):
                        if isinstance(k, ast.Constant) and k.value == "event":
                            if isinstance(v, ast.Constant):
                                events.add(v.value)
                            elif isinstance(v, ast.IfExp):
                                events |= {v.body.value, v.orelse.value}  # type: ignore[attr-defined]
    assert calls > 30 and not missing, missing
    docs = (ROOT / "docs" / "operations.md").read_text()
    undocumented = sorted(e for e in events | {"step_log", "log"} if f"| `{e}` |" not in docs)
    assert not undocumented, undocumented


def test_the_client_does_not_load_the_log_library():
    code = "import sys, pgdurable.client; print('structlog' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
