"""The README's demo: order machines on an embedded PostgreSQL, doing visible work.

Orders reserve stock (the warehouse is flaky, so some steps retry), wait for a payment
signal (some never pay and time out), fan out a packing child per item, and finish. A fake
payment service signals most orders. Everything goes through the real claim / run / flush
path of a real supervisor and its worker processes (examples/demo.toml); stop with
Ctrl-C and start again: unfinished orders resume where they were.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import psycopg

from pgdurable.client import AsyncClient
from pgdurable.contract.fsm import FSM, Context, step
from pgdurable.contract.outcomes import Await, Done, Next, Retry, Spawn, Stop
from pgdurable.contract.spec import Child
from pgdurable.db import migrations
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
        say(ctx, f"reserved {ctx.state.items} items")
        return Next(self.await_payment)

    @step
    def await_payment(self, ctx: Context) -> Await:
        say(ctx, "waiting for payment (3 s)")
        return Await("paid", then=self.paid, timeout=3)

    @step
    async def paid(self, ctx: Context) -> Spawn | Stop:
        if not ctx.awaited:
            say(ctx, "no payment: cancelled")
            return Stop("payment timed out")
        say(ctx, f"paid {ctx.awaited[0].payload['amount']}; packing")
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
        say(ctx, f"packed item {ctx.state.item} of order {ctx.state.order}")
        return Done()


async def payments(client: AsyncClient, ids: asyncio.Queue[int]) -> None:
    while True:
        iid = await ids.get()
        await asyncio.sleep(random.uniform(0.5, 2.0))
        if random.random() < 0.8:
            await client.signal(iid, "paid", {"amount": random.randint(10, 99)}, dedup_key=f"pay-{iid}")


async def produce(dsn: str, orders: int, supervisor: subprocess.Popen[bytes]) -> None:
    """Insert orders one by one, pay most of them, and report until all are settled."""
    paid: asyncio.Queue[int] = asyncio.Queue()
    async with AsyncClient(dsn) as client:
        service = asyncio.create_task(payments(client, paid))
        q = client.q
        try:
            for n in range(1, orders + 1):
                iid = await client.insert(Order, {"order": n, "items": random.randint(1, 3)})
                print(f"inserted order {n} as #{iid}", flush=True)
                await paid.put(iid)
                await asyncio.sleep(0.4)
            while supervisor.poll() is None:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    cur = await conn.execute(q["instance_count_by_status"], {"fsm": "order"})
                    counts: dict[str, int] = dict(await cur.fetchall())
                if not set(counts) - {"done", "failed"}:
                    print(f"all {orders} orders settled: {counts}", flush=True)
                    return
                await asyncio.sleep(1.0)
        finally:
            service.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pgdurable.demo")
    parser.add_argument("--orders", type=int, default=12)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the supervisor's config")
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
    print(f"starting: pgdurable supervise {args.config}", flush=True)
    supervisor = subprocess.Popen([sys.executable, "-m", "pgdurable", "supervise", args.config])
    try:
        asyncio.run(produce(dsn, args.orders, supervisor))
        if args.keep_running:
            supervisor.wait()
    except KeyboardInterrupt:
        print("\nCtrl-C: the supervisor drains its workers; unfinished orders resume next run", flush=True)
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
        supervisor.wait()


if __name__ == "__main__":
    main()
