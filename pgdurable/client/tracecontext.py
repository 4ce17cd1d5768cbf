"""The producer's trace context, for the ``traceparent`` column (docs/observability.md).

Costs nothing when OpenTelemetry is not in use: nothing is imported here. A producer that
has a current span has imported ``opentelemetry.trace`` already, so it is looked up in
``sys.modules``; without it, or without a valid current span, there is no context.
"""

from __future__ import annotations

import sys


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current OpenTelemetry span, or None."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
