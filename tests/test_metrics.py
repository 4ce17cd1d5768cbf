"""The Prometheus endpoint of a real supervisor, scraped and parsed as Prometheus would."""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgdurable import Insert
from pgdurable.contract.errors import ConfigError
from pgdurable.runtime import config as config_mod

from .supervised import start, wait_until

MODULES = '["tests.metric_machines"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_extra(port: int) -> str:
    return f'\n[metrics]\nlisten = "127.0.0.1:{port}"\ndatabase_interval = 0.2\n'


class Scrape:
    """One scrape: samples by name, each a list of (labels, value)."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def total(self, name: str, **labels: str) -> float:
        rows = self.samples.get(name, [])
        return sum(v for lab, v in rows if all(lab.get(k) == x for k, x in labels.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [lab for lab, _ in self.samples.get(name, [])]


def scrape_until(port: int, predicate, what: str) -> Scrape:
    return wait_until(lambda: (lambda s: s if predicate(s) else None)(Scrape(port)), what=what)


def test_steps_counted_match_the_instances_run(dsn, schema, client, sups, tmp_path):
    port = free_port()
    sup = start(sups, tmp_path, dsn, schema, modules=MODULES, extra=metrics_extra(port))
    fsm_ids = client.insert_many([Insert("metered", {"n": i}) for i in range(7)])
    jobs = client.insert_many([Insert("metered_job", {}) for _ in range(5)])
    refused = client.insert("metered_job", {"cancel": True})
    slow = client.insert("metered_slow", {})
    for iid in [*fsm_ids, *jobs]:
        assert type(client.wait(iid, timeout=30)).__name__ == "Done"
    assert client.wait(refused, timeout=30).status == "failed"
    assert client.wait(slow, timeout=30).error == "timed out"

    expected = 7 * 2 + 5 + 1 + 1
    s = scrape_until(port, lambda s: s.total("pgdurable_steps_total") == expected, "all steps reported")
    assert s.types["pgdurable_steps"] == "counter"
    steps = "pgdurable_steps_total"
    assert s.total(steps, queue="rt", machine="metered", step="start", outcome="next") == 7
    assert s.total(steps, queue="rt", machine="metered", step="finish", outcome="done") == 7
    assert s.total(steps, machine="metered_job", outcome="done") == 5
    assert s.total(steps, machine="metered_job", outcome="stop") == 1
    assert s.total(steps, machine="metered_slow", step="start", outcome="stop") == 1
    assert s.total("pgdurable_step_timeouts_total", machine="metered_slow", step="start") == 1
    # Histograms: one observation per committed step, buckets cumulative up to +Inf.
    durations = "pgdurable_step_duration_seconds_count"
    assert s.total(durations, machine="metered", step="finish") == 7
    assert s.total("pgdurable_step_duration_seconds_bucket", machine="metered", step="finish", le="+Inf") == 7
    slow_fast = s.total("pgdurable_step_duration_seconds_bucket", machine="metered_slow", le="0.1")
    assert slow_fast == 0  # it ran until its 0.2 s timeout
    # The wake latency: one per step (none ran inline), each waited in the queue first.
    assert s.total("pgdurable_wake_latency_seconds_count", queue="rt") == 21
    assert s.total("pgdurable_flush_rows_sum", queue="rt") == 21  # every outcome in one batch
    assert s.total("pgdurable_flush_duration_seconds_count", queue="rt") >= 1
    assert s.total("pgdurable_claim_rows_sum", queue="rt") >= 21
    # The supervisor's own counters and the live gauges.
    assert s.total("pgdurable_process_starts_total", process="worker", queue="rt") == 2
    assert s.total("pgdurable_process_starts_total", process="maintenance") == 1
    assert s.total("pgdurable_process_crashes_total") == 0
    assert s.total("pgdurable_workers", queue="rt") == 2
    assert s.total("pgdurable_worker_slots", queue="rt") == 8
    assert s.total("pgdurable_worker_listening", queue="rt") == 2
    assert sup.stop() == 0


def test_instance_gauges_come_from_the_database(dsn, schema, client, db, sups, tmp_path):
    port = free_port()
    start(sups, tmp_path, dsn, schema, modules=MODULES, extra=metrics_extra(port))
    # Rows of a queue no worker here serves: they wait, and their age grows.
    client.insert_many([Insert("metered", {"n": i}, queue="elsewhere") for i in range(3)])
    db.execute(f"UPDATE \"{schema}\".instances SET eligible_at = now() - interval '1 hour'")
    s = scrape_until(
        port, lambda s: s.total("pgdurable_instances", queue="elsewhere", status="runnable") == 3, "counts"
    )
    assert s.total("pgdurable_oldest_runnable_age_seconds", queue="elsewhere") >= 3600
    assert s.total("pgdurable_instances", status="done") == 0  # terminal rows are not counted
    assert s.total("pgdurable_instances_read_age_seconds") >= 0


def test_counters_stay_monotonic_across_a_worker_kill_9(dsn, schema, client, sups, tmp_path):
    """A killed worker's totals are kept by the supervisor (its last report): without that
    (``NodeMetrics.ended``), the step counter drops when the worker dies."""
    port = free_port()
    sup = start(sups, tmp_path, dsn, schema, modules=MODULES, extra=metrics_extra(port), processes=2)
    first = client.insert_many([Insert("metered_job", {}) for _ in range(20)])
    for iid in first:
        client.wait(iid, timeout=30)
    steps = "pgdurable_steps_total"
    before = scrape_until(port, lambda s: s.total(steps) == 20, "the first steps reported")
    assert before.total("pgdurable_process_crashes_total") == 0
    victims = sup.workers()
    os.kill(victims[0], signal.SIGKILL)
    seen = [before.total(steps)]

    def restarted(s: Scrape) -> bool:
        seen.append(s.total(steps))
        starts = s.total("pgdurable_process_starts_total", process="worker")
        return starts == 3 and s.total("pgdurable_workers") == 2

    after = scrape_until(port, restarted, "the worker replaced")
    assert after.total("pgdurable_process_crashes_total", process="worker", queue="rt") == 1
    assert after.total(steps) == 20
    assert seen == sorted(seen), f"the step counter went down: {seen}"
    more = client.insert_many([Insert("metered_job", {}) for _ in range(10)])
    for iid in more:
        client.wait(iid, timeout=30)
    final = scrape_until(port, lambda s: s.total(steps) == 30, "every step counted once")
    assert final.total("pgdurable_step_duration_seconds_count") == 30
    assert sup.stop() == 0


def test_other_paths_and_methods(dsn, schema, sups, tmp_path):
    port = free_port()
    start(sups, tmp_path, dsn, schema, modules=MODULES, extra=metrics_extra(port))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert err.value.code == 404
    # A client that connects and says nothing does not stall the endpoint.
    with socket.create_connection(("127.0.0.1", port)):
        assert Scrape(port).total("pgdurable_workers") == 2


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ('listen = "9464"', "metrics.listen", "HOST:PORT"),
        ('listen = "127.0.0.1:http"', "metrics.listen", "HOST:PORT"),
        ('listen = "127.0.0.1:70000"', "metrics.listen", "HOST:PORT"),
        ("database_interval = 0", "metrics.database_interval", "positive"),
        ("port = 9464", "metrics.port", "unknown key"),
    ],
)
def test_metrics_config_errors_name_key_and_file(tmp_path, section, key, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[queues.rt]\n[metrics]\n{section}\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.key == key and err.value.file == str(path)
    assert message in str(err.value)


def test_a_taken_port_is_a_clear_error(dsn, schema, tmp_path):
    from .supervised import Supervised

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = Supervised(tmp_path, dsn, schema, modules=MODULES, extra=metrics_extra(port))
        try:
            assert sup.proc.wait(60) != 0
        finally:
            sup.close()
    log = sup.log.read_text()
    assert "metrics.listen" in log and "Traceback" not in log


def test_every_metric_is_documented_and_the_dashboard_uses_only_those():
    import json
    import re

    from pgdurable.runtime.metrics import Totals
    from pgdurable.runtime.observe.exporter import DatabaseCounts, NodeCollector, NodeCounters

    from .supervised import ROOT

    collector = NodeCollector(
        Totals(), NodeCounters(), lambda: [], lambda: DatabaseCounts([("q", "runnable", 1, 2.0)], 0.0)
    )
    served = {family.name for family in collector.collect()}
    assert len(served) >= 25
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert sorted(n for n in served if f"| `{n}` |" not in doc) == []
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"pgdurable_\w+", e)
    }
    assert used and used <= served, used - served
