"""OpenTelemetry: a span per step, parented on the producer's context through the row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from pgdurable import Insert
from pgdurable.contract.errors import ConfigError
from pgdurable.engine.tracing import StepTracer
from pgdurable.runtime import config as config_mod
from pgdurable.runtime.observe.tracing import setup_hook
from pgdurable.testing import drain

from .supervised import start, wait_until
from .tracing_machines import Traced, TracedWaiter, traced_boom, traced_child

MACHINES = [Traced, TracedWaiter, traced_child, traced_boom]


@pytest.fixture
def otel():
    """A provider of the test's own with an in-memory exporter (the global one untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def traceparent(db, schema, iid):
    return db.execute(f'SELECT traceparent FROM "{schema}".instances WHERE id = %s', [iid]).fetchone()[0]


def w3c(ctx):
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def steps_of(exporter, iid):
    return [s for s in exporter.get_finished_spans() if s.attributes.get("pgdurable.instance_id") == iid]


def test_every_step_is_a_child_of_the_request_that_inserted_it(dsn, schema, client, db, otel):
    provider, exporter = otel
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        iid = client.insert(Traced, {})
    req = request.get_span_context()
    assert traceparent(db, schema, iid) == w3c(req)
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    assert client.get(iid).result == 2

    spans = steps_of(exporter, iid)
    assert [s.name for s in spans] == ["step traced.start", "step traced.fan_out", "step traced.finish"]
    for s in spans:
        assert s.context.trace_id == req.trace_id
        assert s.parent.span_id == req.span_id
        assert s.attributes["pgdurable.machine"] == "traced"
        assert s.attributes["pgdurable.attempt"] == 0
        assert s.attributes["pgdurable.queue"] == "rt"
    assert [s.attributes["pgdurable.outcome"] for s in spans] == ["next", "spawn", "done"]
    assert client.get(iid).state["seen"].split("-")[2] == f"{spans[0].context.span_id:016x}"
    # The children carry the spawning step's span: their steps are its children.
    fan_out = spans[1]
    children = [
        s for s in exporter.get_finished_spans() if s.attributes.get("pgdurable.machine") == "traced_child"
    ]
    assert len(children) == 2
    for s in children:
        assert s.context.trace_id == req.trace_id
        assert s.parent.span_id == fan_out.context.span_id


def test_a_signal_parents_the_step_it_wakes(dsn, schema, client, db, otel):
    provider, exporter = otel
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("create") as create:
        iid = client.insert(TracedWaiter, {})
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    with tracer.start_as_current_span("callback") as callback:
        client.signal(iid, "go", {})
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    first, woken = steps_of(exporter, iid)
    assert first.parent.span_id == create.get_span_context().span_id
    assert woken.parent.span_id == callback.get_span_context().span_id
    assert woken.context.trace_id == callback.get_span_context().trace_id


def test_insert_many_carries_the_context_and_no_context_means_a_root_span(dsn, schema, client, db, otel):
    provider, exporter = otel
    with provider.get_tracer("test").start_as_current_span("batch") as batch:
        ids = client.insert_many([Insert(traced_child, {"i": i}) for i in range(3)])
    plain = client.insert_many([Insert(traced_child, {"i": 9})])[0]
    want = w3c(batch.get_span_context())
    assert [traceparent(db, schema, i) for i in ids] == [want] * 3
    assert traceparent(db, schema, plain) is None
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    for i in ids:
        (s,) = steps_of(exporter, i)
        assert s.parent.span_id == batch.get_span_context().span_id
    (root,) = steps_of(exporter, plain)
    assert root.parent is None


def test_a_failed_step_span_says_so(dsn, schema, client, otel):
    provider, exporter = otel
    iid = client.insert(traced_boom, {})
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    (s,) = steps_of(exporter, iid)
    assert s.attributes["pgdurable.outcome"] == "stop"
    assert s.status.status_code == StatusCode.ERROR and "boom" in s.status.description


def test_the_client_never_imports_opentelemetry():
    code = (
        "import sys, pgdurable.client, pgdurable.client.tracecontext as t\n"
        "assert t.current_traceparent() is None\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spans_of_a_real_supervisor_reach_the_workers_exporter(
    dsn, schema, client, sups, tmp_path, monkeypatch, otel
):
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("PGDURABLE_TEST_SPANS", str(spans_file))
    extra = '\n[tracing]\nenabled = true\nsetup = "tests.tracing_machines:setup_file_exporter"\n'
    sup = start(sups, tmp_path, dsn, schema, modules='["tests.tracing_machines"]', extra=extra)
    provider, _ = otel
    with provider.get_tracer("test").start_as_current_span("request") as request:
        iid = client.insert("traced", {})
    assert client.wait(iid, timeout=30).result == 2
    req = request.get_span_context()

    def spans():
        if not spans_file.exists():
            return None
        lines = [json.loads(line) for line in spans_file.read_text().splitlines()]
        return lines if len(lines) >= 5 else None  # 3 steps, 2 children

    lines = wait_until(spans, what="the spans of 5 steps")
    mine = [s for s in lines if s["attributes"]["pgdurable.instance_id"] == iid]
    assert [s["name"] for s in mine] == ["step traced.start", "step traced.fan_out", "step traced.finish"]
    assert {s["trace_id"] for s in lines} == {f"{req.trace_id:032x}"}
    assert {s["parent_id"] for s in mine} == {f"{req.span_id:016x}"}
    seen = client.get(iid).state["seen"]
    assert seen.split("-")[2] == mine[0]["span_id"]  # the sync step's thread saw its span
    fan_out = mine[1]["span_id"]
    assert [s["parent_id"] for s in lines if s["name"] == "step traced_child.perform"] == [fan_out, fan_out]
    assert {s["pid"] for s in lines} <= set(sup.workers())
    assert sup.stop() == 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("tests.tracing_machines", "module:function"),
        ("tests.no_such_module:setup", "cannot import"),
        ("tests.tracing_machines:nope", "has no 'nope'"),
    ],
)
def test_tracing_setup_errors_name_key_and_file(tmp_path, setup, message):
    path = tmp_path / "t.toml"
    path.write_text(f'[queues.rt]\n[tracing]\nenabled = true\nsetup = "{setup}"\n')
    cfg = config_mod.load(path)
    with pytest.raises(ConfigError) as err:
        setup_hook(cfg)
    assert err.value.key == "tracing.setup" and err.value.file == str(path)
    assert message in str(err.value)


def test_unknown_tracing_key(tmp_path):
    path = Path(tmp_path / "t.toml")
    path.write_text("[queues.rt]\n[tracing]\nenable = true\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.key == "tracing.enable"


def test_a_sync_step_in_a_worker_keeps_its_log_lines(dsn, schema, client, sups, tmp_path):
    """The step's context follows it into its thread (``Worker.run_sync`` copies it): the
    log capture of a sync step works in a worker as under drain. Without the copy, the
    thread sees no capture mark and the attempt keeps no lines."""
    start(
        sups,
        tmp_path,
        dsn,
        schema,
        modules='["tests.capture_machines"]',
        processes=1,
        extra="[queues.cap]\nconcurrency = 2\n",
    )
    iid = client.insert("chatty", {"amount": 5})
    wait_until(lambda: client.get(iid).status == "done", what="chatty done")
    first = client.history(iid)[0]
    assert [(line.logger, line.message) for line in first.logs][:2] == [
        ("pgdurable.step", "charging 5"),
        ("shop.payments", "slow gateway"),
    ]


def test_a_malformed_traceparent_starts_a_trace_of_its_own(dsn, schema, client, db, otel):
    """The column may be written by other means: what does not parse is no parent, and the
    step runs as usual."""
    provider, exporter = otel
    ids = client.insert_many([Insert(traced_child, {"i": i}) for i in range(4)])
    bad = [
        "garbage",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
        "00-" + "x" * 32 + "-" + "1" * 16 + "-01",
        "",
    ]
    for iid, value in zip(ids, bad, strict=True):
        db.execute(f'UPDATE "{schema}".instances SET traceparent = %s WHERE id = %s', [value, iid])
    drain(dsn, MACHINES, schema=schema, tracer=StepTracer(provider))
    for iid in ids:
        assert client.get(iid).status == "done"
        (s,) = steps_of(exporter, iid)
        assert s.parent is None
