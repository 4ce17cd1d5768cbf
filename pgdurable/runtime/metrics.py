"""What a worker process records for the metrics (docs/observability.md), and how the
supervisor adds the records of its workers up.

A worker keeps plain counters and fixed-bucket histograms in memory — a dict increment and
a ``bisect`` per step, no lock, no I/O, no ``prometheus_client`` — and sends their totals
since it started with its report line (``reporter``, once a second). There is no per-step
IPC. The supervisor keeps the latest snapshot of each live worker and, when a worker ends,
adds its last snapshot to the totals of the processes that are gone (``Totals``), so a
counter it serves never goes down when a worker dies or is restarted. Steps a killed worker
ran after its last report (at most a second of them) are not counted: a counter may miss
them, it never counts one twice.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pgdurable.engine.claim import Claimed
from pgdurable.engine.outcome import Result

#: Bucket bounds (seconds, or rows), the same in every process, so histograms add up.
STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAKE_BUCKETS = STEP_BUCKETS  # a wake waits as long as a step may run: the same range
ROWS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

#: The histograms of a worker with no labels but its queue: name -> bucket bounds.
QUEUE_HISTOGRAMS = {
    "wake": WAKE_BUCKETS,  # eligible_at (insert, due time, wake-up) -> the step started
    "claim": LATENCY_BUCKETS,  # one claim statement (and its admission and enrichment)
    "claim_rows": ROWS_BUCKETS,  # rows one claim took
    "flush": LATENCY_BUCKETS,  # one group commit
    "flush_rows": ROWS_BUCKETS,  # outcomes one group commit wrote
}

#: Counters of a worker's report line (``worker._snapshot``), totals since it started.
REPORT_COUNTERS = ("stale", "errors", "overdue_total", "limit_errors")


class Histogram:
    """Fixed buckets; ``counts[i]`` holds the observations ``<= bounds[i]`` and above the
    bound before (the last one: above every bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def dump(self) -> list[Any]:
        return [self.counts, self.sum]

    def add(self, dumped: list[Any]) -> None:
        counts, total = dumped
        if len(counts) == len(self.counts):  # another build's buckets: not comparable, skipped
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.sum += float(total)

    def cumulative(self) -> list[tuple[str, int]]:
        """The ``le`` buckets of the exposition format, cumulative, ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class WorkerMetrics:
    """The recorder of one worker process (``Runtime.metrics``; None when metrics are off)."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.timeouts: dict[tuple[str, str], int] = {}
        self.hist = {name: Histogram(bounds) for name, bounds in QUEUE_HISTOGRAMS.items()}

    def step(self, row: Claimed, r: Result) -> None:
        """One step attempt whose outcome was committed."""
        step = r.ran or row.step or ""
        key = (row.fsm, step, r.label or r.kind)
        self.steps[key] = self.steps.get(key, 0) + 1
        dkey = (row.fsm, step)
        hist = self.durations.get(dkey)
        if hist is None:
            hist = self.durations[dkey] = Histogram(STEP_BUCKETS)
        hist.observe(r.duration)
        if row.depth == 0:  # an inline continuation was never waiting in the queue
            self.hist["wake"].observe(max(0.0, r.started - row.eligible_at.timestamp()))
        if r.raised is not None and r.raised.startswith("StepTimeout("):
            self.timeouts[dkey] = self.timeouts.get(dkey, 0) + 1

    def observe(self, name: str, value: float) -> None:
        self.hist[name].observe(value)

    def snapshot(self) -> dict[str, Any]:
        """Totals since the process started, as JSON for the report line."""
        return {
            "steps": [[*k, n] for k, n in self.steps.items()],
            "durations": [[*k, *h.dump()] for k, h in self.durations.items()],
            "timeouts": [[*k, n] for k, n in self.timeouts.items()],
            "hist": {name: h.dump() for name, h in self.hist.items()},
        }


@dataclass
class Totals:
    """Worker snapshots added up, each series labelled with its queue."""

    steps: dict[tuple[str, ...], int] = field(default_factory=dict)
    durations: dict[tuple[str, ...], Histogram] = field(default_factory=dict)
    timeouts: dict[tuple[str, ...], int] = field(default_factory=dict)
    hist: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (name, queue)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, queue)

    def add_report(self, queue: str, report: dict[str, Any]) -> None:
        """Add one worker's report line (its totals since it started)."""
        for name in REPORT_COUNTERS:
            value = report.get(name)
            if isinstance(value, int):
                self.counters[name, queue] = self.counters.get((name, queue), 0) + value
        snap = report.get("metrics")
        if not isinstance(snap, dict):
            return
        for *key, n in snap.get("steps", ()):
            k = (queue, *key)
            self.steps[k] = self.steps.get(k, 0) + int(n)
        for *key, n in snap.get("timeouts", ()):
            k = (queue, *key)
            self.timeouts[k] = self.timeouts.get(k, 0) + int(n)
        for machine, step, counts, total in snap.get("durations", ()):
            k = (queue, machine, step)
            if k not in self.durations:
                self.durations[k] = Histogram(STEP_BUCKETS)
            self.durations[k].add([counts, total])
        for name, dumped in snap.get("hist", {}).items():
            if name in QUEUE_HISTOGRAMS:
                if (name, queue) not in self.hist:
                    self.hist[name, queue] = Histogram(QUEUE_HISTOGRAMS[name])
                self.hist[name, queue].add(dumped)

    def merged(self, live: Iterable[tuple[str, dict[str, Any]]]) -> Totals:
        """A copy with the live workers' reports added (self stays as it is)."""
        out = Totals()
        out.steps, out.timeouts, out.counters = dict(self.steps), dict(self.timeouts), dict(self.counters)
        for k, h in self.durations.items():
            out.durations[k] = _copy(h)
        for hk, h in self.hist.items():
            out.hist[hk] = _copy(h)
        for queue, report in live:
            out.add_report(queue, report)
        return out


def _copy(h: Histogram) -> Histogram:
    c = Histogram(h.bounds)
    c.counts, c.sum = list(h.counts), h.sum
    return c
