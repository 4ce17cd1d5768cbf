"""The README's demo: order machines on an embedded PostgreSQL, doing visible work.

A stream of orders reserves stock (the warehouse is flaky, so some steps retry), waits for
a payment signal (most arrive in time, a few late or never: those orders fail), fans out a
packing child per item, and finishes. A progress line a second counts them. Everything goes
through the real claim / run / flush path of a real supervisor and its worker processes
(examples/demo.toml); stop with Ctrl-C (the supervisor drains) and start again: unfinished
orders resume where they were, and the demo says how many.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import random
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import msgspec
import psycopg

from pgdurable.client import AsyncClient, NoTarget
from pgdurable.contract.fsm import FSM, Context, step
from pgdurable.contract.outcomes import Await, Done, Next, Retry, Spawn, Stop
from pgdurable.contract.spec import Child
from pgdurable.db import migrations
from pgdurable.db.queries import Queries
from pgdurable.runtime import config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"


def say(ctx: Context, text: str) -> None:
    print(f"  {ctx.fsm:>6} #{ctx.id:<5} {ctx.step:<9} {text}", flush=True)


class Order(FSM, name="order", queue="orders"):
    class State(msgspec.Struct):
        order: int
        items: int = 2

    @step(initial=True)
    def reserve(self, ctx: Context) -> Next | Retry:
        if random.random() < 0.3:
            say(ctx, f"warehouse busy, retry (attempt {ctx.attempt})")
            return Retry(delay=0.5)
        ctx.log.info("reserved %d items", ctx.state.items)
        return Next(self.await_payment)

    @step
    def await_payment(self, ctx: Context) -> Await:
        ctx.log.info("waiting for payment (3 s)")
        return Await("paid", then=self.paid, timeout=3)

    @step
    async def paid(self, ctx: Context) -> Spawn | Stop:
        if not ctx.awaited:
            say(ctx, "no payment: cancelled")
            return Stop("payment timed out")
        ctx.log.info("paid %s; packing", ctx.awaited[0].payload["amount"])
        return Spawn(
            [Child(Pack, {"order": ctx.state.order, "item": i}) for i in range(ctx.state.items)],
            then=self.ship,
        )

    @step
    def ship(self, ctx: Context) -> Done:
        say(ctx, f"shipped ({len(ctx.children)} parcels)")
        return Done({"parcels": len(ctx.children)})


class Pack(FSM, name="pack", queue="packing"):
    class State(msgspec.Struct):
        order: int
        item: int

    @step(initial=True)
    async def pack(self, ctx: Context) -> Done:
        await asyncio.sleep(0.1)
        ctx.log.info("packed item %d of order %d", ctx.state.item, ctx.state.order)
        return Done()


async def payments(client: AsyncClient, ids: asyncio.Queue[int]) -> None:
    """A payment service: most orders are paid within the 3 s their machine waits, a few
    late or never (those fail: the point of the demo is to see failures too)."""

    async def pay(iid: int) -> None:
        await asyncio.sleep(random.uniform(0.2, 2.5) if random.random() < 0.9 else 4.0)
        with contextlib.suppress(NoTarget):  # too late: the order gave up waiting
            await client.signal(iid, "paid", {"amount": random.randint(10, 99)}, dedup_key=f"pay-{iid}")

    tasks: set[asyncio.Task[None]] = set()
    while True:
        task = asyncio.create_task(pay(await ids.get()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


TERMINAL = ("done", "failed", "cancelled")


async def progress(conn: psycopg.AsyncConnection[Any], q: Queries) -> tuple[dict[str, int], int]:
    """Orders by status, and step attempts finished in the last second."""
    cur = await conn.execute(q["demo_progress"], {"fsms": ["order"], "window": 1.0})
    row = await cur.fetchone()
    assert row is not None
    return msgspec.json.decode(row[0]), int(row[1])


def line(counts: dict[str, int], steps: int) -> str:
    waiting = sum(n for status, n in counts.items() if status not in TERMINAL)
    return (
        f"orders: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
        f"{waiting} in flight | {steps} steps/s"
    )


async def produce(dsn: str, orders: int | None, rate: float, supervisor: subprocess.Popen[bytes]) -> None:
    """Insert orders at ``rate`` per second (``orders`` of them, or until Ctrl-C), pay most
    of them, and print a progress line every second; with ``orders``, stop once all settled."""
    paid: asyncio.Queue[int] = asyncio.Queue()
    async with (
        AsyncClient(dsn) as client,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        counts, _ = await progress(conn, client.q)
        cur = await conn.execute(client.q["demo_unfinished"])
        unfinished = [row[0] for row in await cur.fetchall()]
        if unfinished:
            print(f"resuming {len(unfinished)} unfinished orders of an earlier run", flush=True)
            for iid in unfinished:  # their payments were lost with the earlier run's payer
                await paid.put(iid)
        start = sum(counts.values())
        service = asyncio.create_task(payments(client, paid))
        try:
            n, last = 0, 0.0
            loop = asyncio.get_running_loop()
            live = sys.stdout.isatty()
            while supervisor.poll() is None:
                if orders is None or n < orders:
                    n += 1
                    iid = await client.insert(Order, {"order": start + n, "items": random.randint(1, 3)})
                    await paid.put(iid)
                if loop.time() - last >= 1.0:
                    last = loop.time()
                    counts, steps = await progress(conn, client.q)
                    if live:  # one line, rewritten in place
                        print(f"\r{line(counts, steps)}\033[K", end="", flush=True)
                    else:
                        print(line(counts, steps), flush=True)
                    if orders is not None and n >= orders and not set(counts) - set(TERMINAL):
                        end_line = "\n" if live else ""
                        print(f"{end_line}all {start + n} orders settled: {counts}", flush=True)
                        return
                await asyncio.sleep(1.0 / rate)
        finally:
            service.cancel()


def dashboard(config_path: str, dsn: str, listen: str, log: IO[bytes]) -> subprocess.Popen[bytes] | None:
    """``pgdurable dashboard`` beside the supervisor, with a login made for this run (printed
    once); None when it is off or its extra is not installed."""
    if listen == "off":
        return None
    if importlib.util.find_spec("starlette") is None:
        print("dashboard: not started (it needs the dashboard extra: pip install -e '.[dashboard]')")
        return None
    password = secrets.token_urlsafe(9)
    env = {**os.environ, "PGDURABLE_DASHBOARD_PASSWORD": password}
    cmd = [sys.executable, "-m", "pgdurable", "dashboard", "--config", config_path, "--dsn", dsn]
    board = subprocess.Popen([*cmd, "--listen", listen], env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"dashboard: http://{listen}/  (login: admin / {password}, for this run)", flush=True)
    return board


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pgdurable.demo")
    parser.add_argument("--orders", type=int, help="stop after N orders (default: go on until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2.0, help="orders inserted per second")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the supervisor's config")
    parser.add_argument("--dashboard", default="127.0.0.1:8321", help="where it listens (HOST:PORT, or off)")
    parser.add_argument(
        "--log", default=".pgdurable/demo.log", help="the supervisor's and dashboard's output"
    )
    parser.add_argument("--keep-running", action="store_true", help="do not stop when all orders settled")
    args = parser.parse_args()
    cfg = config.load(args.config)
    dsn = cfg.dsn()
    if dsn is None:  # the embedded server, shared with the supervisor (same data directory)
        from pgdurable.runtime.embedded import start

        data = Path(cfg.database.data_dir)
        data = data if data.is_absolute() else cfg.base_dir / data
        print(f"starting the embedded PostgreSQL in {data.resolve()} ...", flush=True)
        dsn = start(data).get_uri()
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, cfg.database.schema)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        print(f"starting: pgdurable supervise {args.config} (its log: tail -f {log_path})", flush=True)
        cmd = [sys.executable, "-m", "pgdurable", "supervise", args.config]
        supervisor = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if cfg.metrics.listen is not None:
            print(f"metrics: http://{cfg.metrics.listen}/metrics", flush=True)
        board = dashboard(args.config, dsn, args.dashboard, log)
        try:
            asyncio.run(produce(dsn, args.orders, args.rate, supervisor))
            if args.keep_running:
                supervisor.wait()
        except KeyboardInterrupt:
            print(
                "\nCtrl-C: the workers drain (runtime.drain_timeout at most); unfinished orders resume",
                flush=True,
            )
        finally:
            # A terminal's Ctrl-C reached the supervisor too; another one must not cut the drain.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if board is not None and board.poll() is None:
                board.send_signal(signal.SIGTERM)
            if supervisor.poll() is None:
                supervisor.send_signal(signal.SIGTERM)
            code = supervisor.wait()
            if board is not None:
                board.wait()
            print(f"supervisor stopped (exit {code})", flush=True)


if __name__ == "__main__":
    main()
