"""Count what a connection really sends, from libpq's own protocol trace."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from psycopg import pq


@dataclass
class Trace:
    lines: list[str] = field(default_factory=list)

    @property
    def statements(self) -> int:
        """Statements executed: simple queries (BEGIN/COMMIT) plus extended-protocol executes."""
        return sum(
            1 for ln in self.lines if ln.startswith("F\t") and ("\tQuery\t" in ln or "\tExecute\t" in ln)
        )

    @property
    def round_trips(self) -> int:
        return sum(1 for ln in self.lines if ln.startswith("B\t") and "\tReadyForQuery\t" in ln)

    @property
    def exchanges(self) -> int:
        """Times the client waited for the server: turns from what it sent to what it got
        back. A pipeline that asks for results before its Sync counts two, with one
        ReadyForQuery."""
        sides = [ln[0] for ln in self.lines if ln.startswith(("F\t", "B\t"))]
        return sum(1 for a, b in zip(sides, sides[1:], strict=False) if (a, b) == ("F", "B"))

    def sql(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("F\t") and ("\tQuery\t" in ln or "\tParse\t" in ln)]


@contextmanager
def traced(conn: Any) -> Iterator[Trace]:
    """Record the protocol messages of ``conn`` (sync or async psycopg connection)."""
    result = Trace()
    with tempfile.TemporaryFile("w+") as f:
        conn.pgconn.trace(f.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield result
        finally:
            conn.pgconn.untrace()
            f.seek(0)
            for line in f.read().splitlines():
                # a message whose text spans lines (a multi-line statement) continues here
                if result.lines and not line.startswith(("F\t", "B\t")):
                    result.lines[-1] += "\n" + line
                else:
                    result.lines.append(line)
