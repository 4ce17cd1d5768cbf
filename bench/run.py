"""Run every workload on pgdurable and its Python peers; print one table with ratios.

    python bench/run.py --dsn postgresql://localhost/postgres [--quick] [--json out.json]

Run it with pgdurable's interpreter. The peers are installed from PyPI, at the versions
pinned below, into ``bench/.peers-venv`` (created on first use with the newest Python ≥
3.12 found, since oban needs 3.12; else this interpreter). Every system gets its own two
scratch databases (``bench_<system>_<random>``, plus ``_ins`` for the insert workloads),
created on the server of ``--dsn`` and dropped afterwards; ``--dsn`` names only the
maintenance database used to create and drop them. Each system's workloads run in a
subprocess: ``bench/workloads_pgdurable.py`` or ``bench/peers/<peer>_bench.py``, all built
on ``bench/harness.py``. A peer that cannot be installed or fails is reported as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".peers-venv"

# peer -> (pip requirements, module to import); its script is bench/peers/<peer>_bench.py
PEERS: dict[str, tuple[list[str], str]] = {
    "pgqueuer": (["pgqueuer==1.6.0", "asyncpg==0.32.0"], "pgqueuer"),
    "procrastinate": (["procrastinate==3.10.0"], "procrastinate"),
    "oban": (["oban==0.7.0"], "oban"),
    "chancy": (["chancy==0.26.0"], "chancy"),
    "dbos": (["dbos==3.4.0"], "dbos"),
}

# (key, label, higher is better)
ROWS: list[tuple[str, str, bool]] = [
    ("noop", "(a) no-op jobs, burst → all done (jobs/s)", True),
    ("fsm", "(b) 5-step machine, state through every step (instances/s)", True),
    ("fsm_inline", "(b) same with inline run-ahead, `Next(..., inline=True)` (instances/s)", True),
    ("fsm_insert", "(b) 5-step machine, each step inserts a row in its transaction (instances/s)", True),
    ("fsm_insert_own", "(b) same, the row inserted on the step's own connection (instances/s)", True),
    ("insert_many", "(c) bulk insert, batches of 1,000 (rows/s)", True),
    ("insert_concurrent", "(c) single inserts, 16 concurrent producers (rows/s)", True),
    ("latency:p50", "(d) wake latency insert → step start, p50 (ms)", False),
    ("latency:p95", "(d) wake latency p95 (ms)", False),
    ("latency:p99", "(d) wake latency p99 (ms)", False),
    ("backlog", "(e) no-op burst, table holds 1M done + 100k future rows (jobs/s)", True),
    ("backlog:of_before", "(e) the same, % of the same fleet's burst before seeding", True),
    ("mem:idle:supervisor", "(f) RSS supervisor, idle (MiB)", False),
    ("mem:load:supervisor", "(f) RSS supervisor, under load (MiB)", False),
    ("mem:idle:worker", "(f) RSS per worker process, idle (MiB)", False),
    ("mem:load:worker", "(f) RSS per worker process, under load (MiB)", False),
    ("mem:load:total", "(f) RSS whole fleet, under load (MiB)", False),
]


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# -- the peers' virtualenv ----------------------------------------------------------------
def python_version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def peers_base_python() -> str:
    """The newest Python >= 3.12 on PATH or under pyenv; else this interpreter."""
    candidates = [shutil.which(f"python3.{m}") for m in (14, 13, 12)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python3") for p in sorted(pyenv.iterdir(), reverse=True)]
    found = [(v, c) for c in candidates if c and (v := python_version(c)) and v >= (3, 12)]
    return max(found)[1] if found else sys.executable


def ensure_peers(names: list[str], reinstall: bool) -> dict[str, str]:
    """Install each peer into the venv; returns {peer: error} for those that failed."""
    python = VENV / "bin" / "python"
    if not python.exists():
        base = peers_base_python()
        log(f"creating {VENV} with {base}")
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    failed: dict[str, str] = {}
    for name in names:
        reqs, module = PEERS[name]
        check = (
            "import importlib.metadata as m, sys; "
            "sys.exit(any(m.version(n) != v for n, v in (r.split('==') for r in sys.argv[1:])))"
        )
        ok = subprocess.run([str(python), "-c", check, *reqs], capture_output=True).returncode == 0
        if ok and not reinstall:
            continue
        log(f"pip install {' '.join(reqs)}")
        out = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            lines = [
                ln for ln in out.stderr.splitlines() if ln.startswith("ERROR")
            ] or out.stderr.splitlines()
            failed[name] = "not installable: " + " ".join(lines[-2:])[:300]
        elif subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode:
            failed[name] = f"installed but `import {module}` fails"
    return failed


# -- scratch databases --------------------------------------------------------------------
def create_db(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = conninfo_to_dict(dsn)
    # Peers take URLs (DBOS passes it to SQLAlchemy): rebuild one for the scratch database.
    user = url.get("user") or os.environ.get("PGUSER") or os.environ.get("USER", "postgres")
    host, port = url.get("host", "127.0.0.1"), url.get("port", "5432")
    password = f":{url['password']}" if url.get("password") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


def drop_db(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


#: Where bench/fair.py's sweep records each system's best settings.
BEST = BENCH / "results" / "fair-best.json"


def recorded_best(path: Path = BEST) -> dict[str, dict[str, Any]]:
    """The best settings of each system that bench/fair.py's sweep recorded in ``path``;
    empty when there is no such file."""
    return dict(json.loads(path.read_text())["best"]) if path.exists() else {}


def server_facts(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        facts = {}
        for key in ("server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections"):
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(key))).fetchone()
            facts[key] = str(row[0]) if row else "?"
        return facts


# -- one system ---------------------------------------------------------------------------
def run_system(name: str, python: str, script: Path, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"bench_{name}_{secrets.token_hex(3)}"
    dbs = [tag, f"{tag}_ins"]
    out = Path(tempfile.mkstemp(prefix=f"{tag}-", suffix=".json")[1])
    try:
        main_dsn, insert_dsn = (create_db(dsn, db) for db in dbs)
        cmd = [python, str(script), "run", "--dsn", main_dsn, "--insert-dsn", insert_dsn, "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--only", args.only] if args.only else []
        if args.knobs.get(name):
            cmd += ["--settings", json.dumps({"knobs": args.knobs[name]})]
        # An outer PYTHONPATH stays behind bench/ (to measure another checkout of pgdurable).
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
        }
        log(f"{name}: {script.relative_to(BENCH.parent)}")
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=None, timeout=args.timeout, cwd=BENCH
        )
        log(f"{name}: finished in {time.monotonic() - t0:.0f} s (exit {proc.returncode})")
        if proc.returncode != 0 or not out.read_text().strip():
            return {"system": name, "failed": f"exited {proc.returncode}"}
        return json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        return {"system": name, "failed": f"timed out after {args.timeout:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - one system's failure is a cell in the table
        return {"system": name, "failed": f"{type(exc).__name__}: {exc}"}
    finally:
        out.unlink(missing_ok=True)
        for db in dbs:
            try:
                drop_db(dsn, db)
            except psycopg.Error as exc:
                log(f"could not drop {db}: {exc}")


# -- the table ----------------------------------------------------------------------------
def cell_value(result: dict[str, Any], key: str) -> tuple[float | None, str]:
    """(value, note) of one row for one system."""
    if "failed" in result:
        return None, result["failed"]
    parts = key.split(":")
    if parts[0] == "mem":
        mem = result.get("memory", {}).get(parts[1])
        if not mem:
            return None, "not measured"
        if parts[2] == "worker":
            return (max(mem["workers"]) if mem["workers"] else None), ""
        if parts[2] == "supervisor":
            return mem["supervisor"], "" if mem["supervisor"] is not None else "none"
        return mem["total"], ""
    r = result.get("results", {}).get(parts[0])
    if r is None:
        return None, "not run"
    if len(parts) == 2:
        return r["detail"].get(parts[1]), r["note"]
    return r["value"], r["note"]


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(results: list[dict[str, Any]]) -> tuple[str, list[str]]:
    names = [r["system"] for r in results]
    base = results[0]
    notes: list[str] = []
    lines = [
        "| workload | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, higher in ROWS:
        ref, _ = cell_value(base, key)
        cells = []
        for r in results:
            value, note = cell_value(r, key)
            text = fmt(value)
            if value is not None and ref and r is not base:
                text += f" ({value / ref:.2f}×)"
            if note and note != "none":
                if note not in notes:
                    notes.append(note)
                text += f" [{notes.index(note) + 1}]"
            cells.append(text)
        arrow = "↑" if higher else "↓"
        lines.append(f"| {label} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines), notes


def revision() -> str:
    """The pgdurable commit measured, marked when the work tree differs from it."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--", "pgdurable", "sql"]
        dirty = subprocess.run(status, capture_output=True, text=True, cwd=BENCH).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"


def header(args: argparse.Namespace, results: list[dict[str, Any]], facts: dict[str, str]) -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{r['system']} {r.get('version', '?')}" for r in results)
    settings = next((r["settings"] for r in results if "settings" in r), {})
    return (
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()}: {os.cpu_count()} cores, "
        f"{mem_gib:.0f} GiB, {platform.system()} {platform.release()}; PostgreSQL {facts['server_version']} "
        f"on the same host (synchronous_commit={facts['synchronous_commit']}, fsync={facts['fsync']}, "
        f"shared_buffers={facts['shared_buffers']}); Python {platform.python_version()} (pgdurable), "
        f"peers' venv: {VENV.name}.\n"
        f"Versions: {versions} (pgdurable at {args.revision}).\n"
        f"Mode: {'quick' if args.quick else 'full'}; settings: {json.dumps(settings)}.\n"
        "Ratios are the peer's figure divided by pgdurable's; ↑ higher is better, ↓ lower is better."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True, help="a maintenance database on the server to use")
    parser.add_argument("--quick", action="store_true", help="small counts: a few minutes in all")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--systems", default=",".join(["pgdurable", *PEERS]), help="comma-separated")
    parser.add_argument("--only", help="comma-separated workloads (noop,fsm,insert,latency,backlog)")
    parser.add_argument("--reinstall-peers", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per system")
    parser.add_argument(
        "--best",
        default=str(BEST),
        help="the peers' settings found best by bench/fair.py's sweep ('none': each script's own)",
    )
    args = parser.parse_args()
    best = Path(args.best)
    # The peers run at their swept best; pgdurable at its defaults.
    args.knobs = recorded_best(best) if args.best != "none" else {}
    args.knobs.pop("pgdurable", None)
    args.timeout = args.timeout or (900.0 if args.quick else 2400.0)
    systems = [s for s in args.systems.split(",") if s]
    t0 = time.monotonic()
    args.revision = revision()  # before the run: the code the workers import
    facts = server_facts(args.dsn)
    peers = [s for s in systems if s in PEERS]
    broken = ensure_peers(peers, args.reinstall_peers) if peers else {}
    results: list[dict[str, Any]] = []
    for name in systems:
        if name == "pgdurable":
            script, python = BENCH / "workloads_pgdurable.py", sys.executable
        elif name in broken:
            results.append({"system": name, "failed": broken[name]})
            continue
        else:
            script, python = BENCH / "peers" / f"{name}_bench.py", str(VENV / "bin" / "python")
        results.append(run_system(name, python, script, args.dsn, args))
    text, notes = table(results)
    print(header(args, results, facts))
    print()
    print(text)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    print()
    for r in results:
        knobs = r.get("settings", {}).get("knobs")
        swept = (
            f" Run at the best settings of bench/fair.py's sweep instead: {json.dumps(knobs)}."
            if knobs
            else ""
        )
        print(f"- {r['system']}: {r.get('settings_note') or r.get('failed', '')}{swept}")
    log(f"all done in {time.monotonic() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"facts": facts, "revision": args.revision, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
