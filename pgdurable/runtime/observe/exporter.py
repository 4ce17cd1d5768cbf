"""The supervisor's Prometheus endpoint (``[metrics] listen``, docs/observability.md).

Imported by the supervisor only when metrics are on: it needs ``prometheus_client``.

The endpoint is served by the supervisor's own loop, not by a thread: its listening socket
and its connections sit in the supervisor's selector beside the report pipes, so the
supervisor still forks with a single thread (a thread holding a lock at the fork would
leave that lock held forever in the child). A scrape costs the loop the rendering of the
page (the worker totals are already in memory) and, at most once per
``database_interval``, one query for the instance counts. Slow clients cannot stall it:
requests are read without blocking, a connection that has not sent its request within
``REQUEST_TIMEOUT`` is dropped, and at most ``MAX_CONNECTIONS`` are open at once.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pgdurable.runtime.metrics import Histogram, Totals

log = logging.getLogger("pgdurable.metrics")

REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
MAX_REQUEST = 8192
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass
class NodeCounters:
    """What the supervisor itself counts: processes started and died, rows reclaimed."""

    starts: dict[tuple[str, str], int] = field(default_factory=dict)  # (process, queue)
    deaths: dict[tuple[str, str], int] = field(default_factory=dict)
    reclaimed: dict[str, int] = field(default_factory=dict)  # cause -> rows

    def started(self, process: str, queue: str) -> None:
        self.starts[process, queue] = self.starts.get((process, queue), 0) + 1

    def died(self, process: str, queue: str) -> None:
        self.deaths[process, queue] = self.deaths.get((process, queue), 0) + 1

    def reclaim(self, cause: str, rows: int) -> None:
        self.reclaimed[cause] = self.reclaimed.get(cause, 0) + rows


@dataclass
class LiveWorker:
    """A live worker as the collector sees it: its queue and its latest report line."""

    queue: str
    report: dict[str, Any]


@dataclass
class DatabaseCounts:
    """The result of ``metrics_instances``, and when it was read (monotonic clock)."""

    rows: list[tuple[str, str, int, float | None]]
    read_at: float


class NodeCollector(Collector):
    """Builds every metric family from the supervisor's state at scrape time."""

    def __init__(
        self,
        retired: Totals,
        node: NodeCounters,
        live: Callable[[], Iterable[LiveWorker]],
        database: Callable[[], DatabaseCounts | None],
    ):
        self.retired, self.node, self.live, self.database = retired, node, live, database

    def collect(self) -> Iterator[Metric]:
        workers = list(self.live())
        totals = self.retired.merged((w.queue, w.report) for w in workers)
        yield from _worker_metrics(totals)
        yield from _live_gauges(workers)
        yield from _node_metrics(self.node)
        counts = self.database()
        if counts is not None:
            yield from _database_metrics(counts)


def _counter(name: str, doc: str, labels: list[str], values: dict[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family


def _histogram(name: str, doc: str, labels: list[str], values: dict[Any, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, h in sorted(values.items()):
        family.add_metric(list(key), h.cumulative(), h.sum)
    return family


def _worker_metrics(t: Totals) -> Iterator[Metric]:
    yield _counter(
        "pgdurable_steps",
        "Step attempts whose outcome was committed, by the outcome they ended with.",
        ["queue", "machine", "step", "outcome"],
        t.steps,
    )
    yield _histogram(
        "pgdurable_step_duration_seconds",
        "How long a step's code ran (committed attempts).",
        ["queue", "machine", "step"],
        t.durations,
    )
    yield _counter(
        "pgdurable_step_timeouts",
        "Steps that ran past their timeout.",
        ["queue", "machine", "step"],
        t.timeouts,
    )
    hists: list[tuple[str, str, str]] = [
        ("wake", "pgdurable_wake_latency_seconds", "From a row's eligible_at to its step's start."),
        ("claim", "pgdurable_claim_duration_seconds", "One claim of a batch (admission, enrichment)."),
        ("claim_rows", "pgdurable_claim_rows", "Rows one non-empty claim took."),
        ("flush", "pgdurable_flush_duration_seconds", "One group commit of outcomes."),
        ("flush_rows", "pgdurable_flush_rows", "Outcomes one group commit wrote (its batch size)."),
    ]
    for key, name, doc in hists:
        yield _histogram(name, doc, ["queue"], {(q,): h for (k, q), h in t.hist.items() if k == key})
    counters: list[tuple[str, str, str]] = [
        ("stale", "pgdurable_outcomes_stale", "Outcomes refused because their claim was lost."),
        ("errors", "pgdurable_worker_errors", "Errors of the worker's own machinery (claim, flush)."),
        (
            "overdue_total",
            "pgdurable_steps_overdue",
            "Sync steps whose thread or process ran past the timeout.",
        ),
        ("limit_errors", "pgdurable_limit_misconfigured", "Rows held because their limit is not configured."),
    ]
    for key, name, doc in counters:
        yield _counter(name, doc, ["queue"], {(q,): n for (k, q), n in t.counters.items() if k == key})


def _live_gauges(workers: list[LiveWorker]) -> Iterator[Metric]:
    gauges: list[tuple[str, str, str]] = [
        ("busy", "pgdurable_worker_busy_slots", "Slots running a step now (overdue ones included)."),
        ("concurrency", "pgdurable_worker_slots", "Slots of the live workers."),
        ("buffered", "pgdurable_worker_buffered_rows", "Rows claimed and waiting for a slot."),
        ("held", "pgdurable_worker_held_rows", "Rows the workers hold a claim on."),
        ("overdue", "pgdurable_worker_overdue_slots", "Slots held by steps past their timeout."),
        ("listening", "pgdurable_worker_listening", "Workers whose LISTEN connection answers."),
    ]
    queues = sorted({w.queue for w in workers})
    processes = GaugeMetricFamily("pgdurable_workers", "Live worker processes.", labels=["queue"])
    for q in queues:
        processes.add_metric([q], sum(1 for w in workers if w.queue == q))
    yield processes
    for key, name, doc in gauges:
        family = GaugeMetricFamily(name, doc, labels=["queue"])
        for q in queues:
            family.add_metric([q], sum(int(w.report.get(key) or 0) for w in workers if w.queue == q))
        yield family


def _node_metrics(node: NodeCounters) -> Iterator[Metric]:
    yield _counter(
        "pgdurable_process_starts", "Processes the supervisor started.", ["process", "queue"], node.starts
    )
    yield _counter(
        "pgdurable_process_crashes",
        "Processes that ended unexpectedly (killed, crashed, a component failed).",
        ["process", "queue"],
        node.deaths,
    )
    yield _counter(
        "pgdurable_rows_reclaimed", "Rows of dead workers the supervisor returned.", ["cause"], node.reclaimed
    )


def _database_metrics(counts: DatabaseCounts) -> Iterator[Metric]:
    instances = GaugeMetricFamily(
        "pgdurable_instances",
        "Live instances by queue and status (from the database).",
        labels=["queue", "status"],
    )
    oldest = GaugeMetricFamily(
        "pgdurable_oldest_runnable_age_seconds",
        "Age of the queue's oldest due runnable row (0: none waits).",
        labels=["queue"],
    )
    ages: dict[str, float] = {}
    for queue, status, n, age in counts.rows:
        instances.add_metric([queue, status], n)
        ages[queue] = max(ages.get(queue, 0.0), age or 0.0)
    for queue, age in sorted(ages.items()):
        oldest.add_metric([queue], age)
    yield instances
    yield oldest
    yield GaugeMetricFamily(
        "pgdurable_instances_read_age_seconds",
        "How old the instance counts are (they are read at most once per database_interval).",
        value=max(0.0, time.monotonic() - counts.read_at),
    )


def registry_for(collector: NodeCollector) -> CollectorRegistry:
    """A registry of our own: the default one would add the supervisor's process metrics
    under names that are not ours to choose."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


@dataclass
class _Conn:
    sock: socket.socket
    opened: float
    data: bytes = b""


class Endpoint:
    """The HTTP listener, driven by the supervisor's selector (``owns`` / ``ready``)."""

    def __init__(self, address: tuple[str, int], render: Callable[[], bytes]):
        self.address, self.render = address, render
        self.sock: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}
        self.sel: selectors.BaseSelector | None = None

    def open(self, sel: selectors.BaseSelector) -> None:
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        sock.setblocking(False)
        self.sock, self.sel = sock, sel
        sel.register(sock, selectors.EVENT_READ, self)

    def owns(self, key: selectors.SelectorKey) -> bool:
        return key.data is self or (isinstance(key.data, tuple) and key.data[:1] == (self,))

    def ready(self, key: selectors.SelectorKey) -> None:
        if key.data is self:
            self._accept()
        else:
            self._read(key.data[1])

    def _accept(self) -> None:
        assert self.sock is not None and self.sel is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        self.conns[conn.fileno()] = _Conn(conn, time.monotonic())
        self.sel.register(conn, selectors.EVENT_READ, (self, conn.fileno()))

    def _read(self, fd: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        try:
            chunk = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        c.data += chunk
        if not chunk or len(c.data) > MAX_REQUEST:
            self._drop(fd)
        elif b"\r\n\r\n" in c.data or b"\n\n" in c.data:
            self._answer(c)
            self._drop(fd)

    def _answer(self, c: _Conn) -> None:
        method, _, rest = c.data.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
        elif path not in (b"/metrics", b"/"):
            status, ctype, body = b"404 Not Found", b"text/plain", b"the metrics are at /metrics\n"
        else:
            try:
                status, ctype, body = b"200 OK", CONTENT_TYPE, self.render()
            except Exception as exc:
                log.exception("rendering the metrics failed", extra={"event": "metrics_failed"})
                status, ctype, body = b"500 Internal Server Error", b"text/plain", f"{exc!r}\n".encode()
        head = b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
        head += b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
        # Blocking for the write, bounded: the page is small and goes to a scraper that just asked.
        c.sock.settimeout(REQUEST_TIMEOUT)
        with contextlib.suppress(OSError):
            c.sock.sendall(head + (b"" if method == b"HEAD" else body))

    def _drop(self, fd: int) -> None:
        c = self.conns.pop(fd, None)
        if c is None:
            return
        if self.sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
        c.sock.close()

    def expire(self) -> None:
        """Drop connections that did not send their request in time (called each tick)."""
        now = time.monotonic()
        for fd in [fd for fd, c in self.conns.items() if now - c.opened > REQUEST_TIMEOUT]:
            self._drop(fd)

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        if self.sock is not None:
            if self.sel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def forget(self) -> None:
        """In a forked child: close the inherited sockets without touching the selector
        (the child's copy of the supervisor's epoll is not its own to change)."""
        for c in self.conns.values():
            c.sock.close()
        if self.sock is not None:
            self.sock.close()


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class NodeMetrics:
    """Everything the supervisor keeps for its endpoint; its hooks are called from the
    supervisor's loop: a worker started, a worker ended (its last report), rows reclaimed."""

    def __init__(
        self,
        address: tuple[str, int],
        live: Callable[[], Iterable[LiveWorker]],
        read_database: Callable[[], list[tuple[str, str, int, float | None]]],
        database_interval: float,
    ):
        self.retired = Totals()  # the totals of the workers that are gone
        self.node = NodeCounters()
        self._read_database, self.database_interval = read_database, database_interval
        self._counts: DatabaseCounts | None = None
        self._next_read = 0.0
        self.registry = registry_for(NodeCollector(self.retired, self.node, live, self._database))
        self.endpoint = Endpoint(address, lambda: render(self.registry))

    def ended(self, queue: str, report: dict[str, Any]) -> None:
        """A worker is gone: its last totals join those of the retired workers, so no
        counter goes down (what it did after its last report is not counted)."""
        self.retired.add_report(queue, report)

    def _database(self) -> DatabaseCounts | None:
        """The instance counts, read again when older than ``database_interval``; a failed
        read keeps the last ones (their age says so) and is retried at the next interval."""
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self.database_interval
            try:
                self._counts = DatabaseCounts(self._read_database(), now)
            except Exception as exc:  # noqa: BLE001 - the endpoint still serves the rest
                log.warning(
                    "metrics: reading the instance counts failed: %r",
                    exc,
                    extra={"event": "metrics_db_failed"},
                )
        return self._counts
