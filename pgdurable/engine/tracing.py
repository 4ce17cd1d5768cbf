"""OpenTelemetry spans of the steps (``[tracing] enabled``, docs/observability.md).

One span per step attempt, named ``step MACHINE.STEP``, whose parent is the trace context
stored on the row: the producer's that inserted the instance, or the last signal's that
woke it (the ``traceparent`` column, W3C format). While the step runs its span is the
current one: whatever the step's async code starts is a child of it, and the children a
``Spawn`` inserts carry it in their own ``traceparent``, so a trace reads request → insert →
every step → the children's steps.

Needs ``opentelemetry-api`` (``pgdurable[otel]``), imported when a ``StepTracer`` is built,
never otherwise. Spans go to the global tracer provider: install one (with its exporter)
in the process that runs the steps (``[tracing] setup``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pgdurable.engine.claim import Claimed
from pgdurable.engine.outcome import Result

#: The span attributes, one place (docs/observability.md lists them).
MACHINE, STEP, ATTEMPT, INSTANCE, QUEUE, OUTCOME, VERSION = (
    "pgdurable.machine",
    "pgdurable.step",
    "pgdurable.attempt",
    "pgdurable.instance_id",
    "pgdurable.queue",
    "pgdurable.outcome",
    "pgdurable.version",
)


class StepTracer:
    """Wraps each step attempt in a span (``Engine(tracer=...)``)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = trace.get_tracer("pgdurable", tracer_provider=tracer_provider)

    def parent(self, traceparent: str | None) -> Any:
        """The context of a stored ``traceparent`` (None: none, or not one we can read).

        Parsed here rather than by the W3C propagator: the column holds only what the
        client wrote (``00-<32 hex>-<16 hex>-<2 hex>``), and this takes half the time.
        """
        if traceparent is None or len(traceparent) != 55 or traceparent[:3] != "00-":
            return None
        try:
            trace_id, span_id, flags = (
                int(traceparent[3:35], 16),
                int(traceparent[36:52], 16),
                int(traceparent[53:], 16),
            )
        except ValueError:
            return None
        if not trace_id or not span_id:
            return None
        trace = self._trace
        remote = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))
        return trace.set_span_in_context(trace.NonRecordingSpan(remote))

    async def run(self, row: Claimed, run: Callable[[Claimed], Awaitable[Result]]) -> Result:
        """Run ``run(row)`` inside the step's span; stamp the spawned children with it."""
        trace = self._trace
        parent = self.parent(row.traceparent)
        attributes: dict[str, Any] = {
            MACHINE: row.fsm,
            STEP: row.step or "",
            ATTEMPT: row.attempt,
            INSTANCE: row.id,
            QUEUE: row.queue,
        }
        with self._tracer.start_as_current_span(
            f"step {row.fsm}.{row.step or ''}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=True,
        ) as span:
            result = await run(row)
            if result.ran and result.ran != row.step:  # the initial step, known only now
                span.update_name(f"step {row.fsm}.{result.ran}")
                span.set_attribute(STEP, result.ran)
            if result.version:
                span.set_attribute(VERSION, result.version)
            span.set_attribute(OUTCOME, result.label or result.kind)
            if result.raised is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, result.raised[:500]))
            if result.children:
                ctx = span.get_span_context()
                mine = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
                result.children = [
                    c if c.traceparent else msgspec.structs.replace(c, traceparent=mine)
                    for c in result.children
                ]
        return result
