"""The README's demo: order machines on an embedded PostgreSQL, doing visible work.

Orders reserve stock (the warehouse is flaky, so some steps retry), wait for a payment
signal (some never pay and time out), fan out a packing child per item, and finish. A fake
payment service signals most orders. Everything goes through the real claim / run / flush
path; stop with Ctrl-C and start again: unfinished orders resume where they were.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
from pathlib import Path

import msgspec
import psycopg

from . import migrations
from .client import AsyncClient
from .engine import Engine
from .fsm import FSM, Context, Registry, step
from .outcomes import Await, Done, Next, Retry, Spawn, Stop
from .spec import Child


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


async def run(dsn: str, orders: int) -> None:
    engine = Engine(Registry([Order, Pack]), schema="pgdurable")
    paid: asyncio.Queue[int] = asyncio.Queue()
    async with (
        AsyncClient(dsn) as client,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        await engine.register(conn)
        service = asyncio.create_task(payments(client, paid))
        made = 0
        try:
            while True:
                if made < orders:
                    made += 1
                    iid = await client.insert(Order, {"order": made, "items": random.randint(1, 3)})
                    print(f"inserted order {made} as #{iid}", flush=True)
                    await paid.put(iid)
                await conn.execute(
                    engine.q["instance_await_expire"], {"horizon": dt.timedelta(0), "limit": 100}
                )
                busy = False
                for queue in ("orders", "packing"):
                    rows = await engine.claim(conn, queue, 20)
                    if rows:
                        busy = True
                        results = await asyncio.gather(*(engine.run(r) for r in rows))
                        await engine.flush(conn, results)
                if made >= orders and not busy:
                    cur = await conn.execute(engine.q["instance_count_by_status"], {"fsm": "order"})
                    counts = dict(await cur.fetchall())
                    if not set(counts) - {"done", "failed"}:
                        print(f"all orders settled: {counts}", flush=True)
                        return
                await asyncio.sleep(0.3 if not busy else 0)
        finally:
            service.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pgdurable.demo")
    parser.add_argument("--dsn", help="use this database instead of the embedded one")
    parser.add_argument("--orders", type=int, default=12)
    parser.add_argument("--data", default=".pgdurable/demo", help="embedded data directory")
    args = parser.parse_args()
    dsn = args.dsn
    if dsn is None:
        from .embedded import start

        print(f"starting the embedded PostgreSQL in {Path(args.data).resolve()} ...", flush=True)
        dsn = start(args.data).get_uri()
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
    try:
        asyncio.run(run(dsn, args.orders))
    except KeyboardInterrupt:
        print("\nstopped; unfinished orders resume on the next run", flush=True)


if __name__ == "__main__":
    main()
