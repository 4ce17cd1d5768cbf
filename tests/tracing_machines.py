"""Machines and a span exporter for tests/test_tracing.py (drain and a real supervisor)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from pgdurable import FSM, Await, Context, Done, Insert, Next, Spawn, job, step
from pgdurable.client.tracecontext import current_traceparent


class Traced(FSM, name="traced", queue="rt"):
    """Two steps, then spawns two children and waits for them."""

    @step(initial=True)
    def start(self, ctx: Context) -> Any:
        # A sync step's thread sees its span: what it inserts or signals carries it.
        return Next(self.fan_out, {**ctx.state, "seen": current_traceparent()})

    @step
    def fan_out(self, ctx: Context) -> Any:
        return Spawn([Insert(traced_child, {"i": i}) for i in range(2)], then=self.finish, state=ctx.state)

    @step
    def finish(self, ctx: Context) -> Any:
        return Done(len(ctx.children))


@job(name="traced_child", queue="rt")
def traced_child(args: dict[str, Any], ctx: Context) -> Any:
    return args["i"]


class TracedWaiter(FSM, name="traced_waiter", queue="rt"):
    @step(initial=True)
    def start(self, ctx: Context) -> Any:
        return Await("go", then=self.finish, state=ctx.state)

    @step
    def finish(self, ctx: Context) -> Any:
        return Done(None)


class JsonLinesExporter(SpanExporter):
    """Appends each finished span as one JSON line to a file (read by the test process)."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for s in spans:
                ctx, parent = s.get_span_context(), s.parent
                line = {
                    "name": s.name,
                    "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                    "parent_id": None if parent is None else f"{parent.span_id:016x}",
                    "attributes": dict(s.attributes or {}),
                    "pid": os.getpid(),
                }
                f.write(json.dumps(line) + "\n")
        return SpanExportResult.SUCCESS


def setup_file_exporter() -> None:
    """``[tracing] setup`` of the supervised test: spans to the file the test names."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["PGDURABLE_TEST_SPANS"])))
    trace.set_tracer_provider(provider)


@job(name="traced_boom", queue="rt", max_attempts=1)
def traced_boom(args: dict[str, Any], ctx: Context) -> Any:
    raise RuntimeError("boom")
