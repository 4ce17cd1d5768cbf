"""The feeder's connection: LISTEN and claims on one connection, notifications bounded."""

from __future__ import annotations

import asyncio
import time

import psycopg

from pgdurable.runtime.backoff import RETRY_FIRST, RETRY_MAX
from pgdurable.runtime.feedconn import FeedConnection


def test_a_busy_feeder_does_not_keep_notifications_forever(dsn):
    """Notifications that arrive while the feeder runs statements are kept by psycopg
    until read; ``tend`` reads them every ``probe_every`` seconds."""

    async def main() -> tuple[int, int]:
        connects: list[int] = []
        feed = FeedConnection(dsn, "q", "feed test", probe_every=0.2, on_connect=lambda: connects.append(1))
        conn = await feed.get()
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as producer:
                for _ in range(50):
                    await producer.execute("SELECT pg_notify('feed test', '')")
            await conn.execute("SELECT 1")  # a "claim": the notifications arrive with its answer
            await asyncio.sleep(0.25)
            await feed.tend()
            left = [n async for n in conn.notifies(timeout=0)]
            return len(connects), len(left)
        finally:
            await feed.close()

    connects, left = asyncio.run(main())
    assert connects == 1  # on_connect ran once LISTEN was in place
    assert left == 0


def test_notified_returns_at_a_notification_and_after_the_timeout(dsn):
    async def main() -> tuple[float, float, bool]:
        feed = FeedConnection(dsn, "q", "feed test 2", probe_every=10, on_connect=lambda: None)
        await feed.get()
        try:
            t = time.monotonic()
            await feed.notified(0.3)
            idle = time.monotonic() - t
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as producer:
                waiter = asyncio.ensure_future(feed.notified(30))
                await asyncio.sleep(0.1)
                t = time.monotonic()
                await producer.execute("SELECT pg_notify('feed test 2', '')")
                await asyncio.wait_for(waiter, 10)
                woken = time.monotonic() - t
            # cancelled mid-wait, the connection is free again for the next claim
            waiter = asyncio.ensure_future(feed.notified(30))
            await asyncio.sleep(0.05)
            waiter.cancel()
            await asyncio.wait([waiter])
            cur = await (await feed.get()).execute("SELECT 1")
            usable = await cur.fetchone() == (1,)
            return idle, woken, usable and feed.listening
        finally:
            await feed.close()

    idle, woken, usable = asyncio.run(main())
    assert 0.25 <= idle < 5
    assert woken < 5  # not the 30 s timeout
    assert usable


def test_retries_back_off_with_jitter_up_to_a_ceiling():
    """After failures in a row the feeder waits longer each time, up to ``RETRY_MAX``, at a
    random point of the upper half: a fleet that lost its database does not come back in
    lockstep. A success (the worker resets ``failures``) starts over."""
    feed = FeedConnection("postgresql://unused", "q", "c", probe_every=1, on_connect=lambda: None)
    delays = [feed.retry_delay() for _ in range(12)]
    for k, delay in enumerate(delays):
        ceiling = min(RETRY_MAX, RETRY_FIRST * 2**k)
        assert ceiling / 2 <= delay <= ceiling
    assert delays[-1] >= RETRY_MAX / 2
    assert len({round(d, 6) for d in delays[-4:]}) > 1  # jittered, not one fixed value
    feed.failures = 0
    assert feed.retry_delay() <= RETRY_FIRST
