"""The chaos run of bench/chaos.py, short form: two supervisors on a throwaway server of this
test's own, workers and supervisors killed with SIGKILL, backends terminated, the server
restarted once; then every invariant is checked (all done, no step committed twice, one at a
time per key, the gate, the rate limit, no gate slot lost). Set PGDURABLE_CHAOS_SEED to
replay a seed's workload and fault schedule (the timing of a run is never the same). And
the checks themselves, on a side table made to break each invariant once."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from psycopg.types.json import Jsonb

CHAOS = Path(__file__).resolve().parent.parent / "bench" / "chaos.py"


def _chaos():
    name = "pgdurable_bench_chaos"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CHAOS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.chaos
def test_chaos_short(tmp_path):
    chaos = _chaos()
    seed = int(os.environ.get("PGDURABLE_CHAOS_SEED") or random.randrange(1 << 32))
    report = chaos.run(chaos.Settings.quick(seed=seed), workdir=tmp_path)
    print(report.table())
    assert not report.failures, (
        f"chaos run with seed {seed} broke {len(report.failures)} invariant(s) "
        f"(supervisor logs and the fault log in {tmp_path}):\n"
        + "\n".join(f"- {f}" for f in report.failures[:30])
        + "\n"
        + report.table()
    )


@pytest.mark.chaos
def test_chaos_checks_catch_what_they_look_for(server_dsn):
    """The checks, fed a side table with one violation of each kind (and a killed run whose
    key was taken after its kill, which is not one), report exactly those."""
    chaos = _chaos()
    with chaos._database(server_dsn) as db, psycopg.connect(db, autocommit=True) as conn:
        chaos._prepare(db)

        def run(token, iid, step, n, trail, key, start, end, admitted=None, pid=1):
            for what, at in (("start", start), ("end", end)):
                if at is not None:
                    conn.execute(
                        "INSERT INTO chaos_runs VALUES (%s, %s, %s, 'chaos', %s, %s, %s, %s, %s, "
                        "to_timestamp(%s), to_timestamp(%s))",
                        [token, what, iid, step, n, Jsonb(trail), pid, key, admitted, at],
                    )

        run("a", 1, "s1", 0, [], "acct:0", 100.0, 100.5)
        run("b", 2, "s1", 0, [], "acct:0", 100.4, 100.6)  # while "a" holds acct:0
        run("k", 3, "s1", 0, [], "acct:1", 200.0, None, pid=77)  # killed at 200.2
        run("l", 4, "s1", 0, [], "acct:1", 200.3, 200.4)  # after the kill: fine
        for i in range(3):  # three holders of a gate of two
            run(f"g{i}", 10 + i, "s1", 0, [], "gate:0", 300.0 + i / 100, 300.5)
        for i in range(6):  # six admissions within a second; allowed + burst is five
            run(f"r{i}", 20 + i, "s3", 2, ["x", "y"], None, 400.0 + i / 10, 400.01 + i / 10, 400.0 + i / 10)
        run("d1", 30, "s1", 0, [], None, 500.0, 500.1)
        run("d2", 30, "s1", 0, [], None, 500.2, 500.3)  # a re-run of s1 …
        run("e1", 30, "s2", 1, ["d1"], None, 501.0, 501.1)
        run("e2", 30, "s2", 1, ["d2"], None, 502.0, 502.1)  # … and both runs' states were read
        faults = SimpleNamespace(killed={77: 200.2}, restart_window=None, note=lambda what: None)
        monitor = SimpleNamespace(seen={}, max_crashes=0, max_crash_sum=0)
        settings = chaos.Settings.quick(instances=0)
        report = chaos.Report(settings)
        chaos.check(report, conn, settings, faults, monitor, 0.0)
    failures = "\n".join(report.failures)
    assert len(report.failures) == 4, failures
    assert "key acct:0: run a (instance 1 s1" in failures and "overlaps run b" in failures
    assert "gate: 3 runs of one key at once, limit 2" in failures
    assert "rate limit: 6 admissions within 1.0 s" in failures
    assert "instance 30: step s1 committed by 2 runs ['d1', 'd2']" in failures
