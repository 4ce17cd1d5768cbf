"""pgdurable against itself: two revisions side by side, interleaved, on one server.

    python bench/compare.py --dsn postgresql://.../postgres BASE [HEAD] [--rounds 3]
        [--only noop,fsm,latency] [--settings '{"jobs": 20000, "latency": 200}']

Checks out each revision into a temporary worktree and runs its own
``bench/workloads_pgdurable.py`` with that tree first on ``PYTHONPATH`` (so the installed
pgdurable is shadowed), alternating BASE HEAD BASE HEAD … so that drift of a shared machine
does not decide the ratio. HEAD defaults to the working tree. Prints, per figure, every
round, the medians and the ratio HEAD / BASE. Each round gets fresh databases (created and
dropped through ``--dsn``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
FIGURES = [  # (result, label, what to read)
    ("noop", "no-op jobs/s", lambda r: r["value"]),
    ("fsm", "5-step steps/s", lambda r: r["value"]),
    ("fsm_inline", "5-step inline steps/s", lambda r: r["value"]),
    ("latency", "wake latency p50 ms", lambda r: r["detail"]["p50"]),
    ("latency", "wake latency p99 ms", lambda r: r["detail"]["p99"]),
    ("insert_many", "insert_many rows/s", lambda r: r["value"]),
]


def run_once(tree: Path, dsn: str, only: str, settings: str) -> dict:
    names = [f"cmp_{secrets.token_hex(4)}", f"cmp_{secrets.token_hex(4)}"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [
                sys.executable,
                str(tree / "bench" / "workloads_pgdurable.py"),
                "run",
                "--dsn",
                make_conninfo(dsn, dbname=names[0]),
                "--insert-dsn",
                make_conninfo(dsn, dbname=names[1]),
                "--settings",
                settings,
                "--only",
                only,
                "--out",
                out.name,
            ]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
            return json.loads(Path(out.name).read_text())["results"]
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base", help="the revision to compare against")
    parser.add_argument("head", nargs="?", help="a revision (default: the working tree)")
    parser.add_argument("--dsn", required=True, help="a maintenance database on the server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="noop,fsm,latency")
    parser.add_argument("--settings", default='{"jobs": 20000, "latency": 200}')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path] = {}
        for side, rev in (("base", args.base), ("head", args.head)):
            if rev is None:
                trees[side] = ROOT
                continue
            path = Path(tmp) / side
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), rev], check=True
            )
            trees[side] = path
        try:
            results: dict[str, list[dict]] = {"base": [], "head": []}
            for i in range(args.rounds):
                for side in ("base", "head"):
                    print(f"round {i + 1}: {side}", file=sys.stderr, flush=True)
                    results[side].append(run_once(trees[side], args.dsn, args.only, args.settings))
        finally:
            for side, rev in (("base", args.base), ("head", args.head)):
                if rev is not None:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[side])]
                    )
    head_name = args.head or "working tree"
    print(f"| figure | {args.base} (rounds) | {head_name} (rounds) | median {head_name} / {args.base} |")
    print("|---|---|---|---|")
    for name, label, get in FIGURES:
        if not all(r.get(name, {}).get("value") for r in results["base"] + results["head"]):
            continue  # not run, or failed in a round
        b = [get(r[name]) for r in results["base"]]
        h = [get(r[name]) for r in results["head"]]
        ratio = statistics.median(h) / statistics.median(b)
        fmt = ", ".join
        print(f"| {label} | {fmt(f'{x:.1f}' for x in b)} | {fmt(f'{x:.1f}' for x in h)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
