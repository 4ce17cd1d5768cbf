"""Admission of claimed rows under concurrency gates and rate limits, in SQL.

Admission runs right after a claim, only for claimed rows that carry a gated key or a rate
limit — a queue that uses neither pays nothing. In one transaction it creates missing
counters, locks the ones it needs (SKIP LOCKED: never waits for another picker), decides in
claim order (``limits.decide``), takes slots and tokens, stamps admitted rows with their
slot's shard, and sends denied rows back deferred so unrelated work behind them gets its
turn. A row naming an unconfigured rate limit, or a weight larger than the burst, is held
with the reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.engine.claim import Claimed
from pgdurable.engine.limits import Limits, Verdicts, decide

log = logging.getLogger("pgdurable.limits")


def needs_admission(rows: list[Claimed]) -> bool:
    return any(r.gated or r.rate_limit is not None for r in rows)


async def admit(
    conn: psycopg.AsyncConnection[Any], q: Queries, worker: str, rows: list[Claimed], limits: Limits
) -> Verdicts:
    """Run admission for freshly claimed rows; ``.admitted`` may run now."""
    gated_keys = sorted({r.concurrency_key for r in rows if r.gated and r.concurrency_key})
    rate_keys = sorted({r.rate_limit for r in rows if r.rate_limit and limits.rate_for(r.rate_limit)})
    async with conn.transaction():
        gate_free: dict[str, dict[int, int]] = defaultdict(dict)
        if gated_keys:
            await conn.execute(q["gate_slots_ensure_many"], _gate_shards(gated_keys, limits), prepare=True)
            cur = await conn.execute(q["gate_slots_lock_many"], {"keys": gated_keys}, prepare=True)
            for key, shard, available in await cur.fetchall():
                gate_free[key][shard] = available
        tokens: dict[str, dict[int, float]] = defaultdict(dict)
        if rate_keys:
            await conn.execute(q["rate_buckets_ensure_many"], _rate_shards(rate_keys, limits), prepare=True)
            cur = await conn.execute(q["rate_buckets_lock_many"], {"keys": rate_keys}, prepare=True)
            for key, shard, left in await cur.fetchall():
                tokens[key][shard] = left
        v = decide(rows, limits, gate_free, tokens)
        if v.gate_takes:
            (keys, shards), ns = zip(*v.gate_takes, strict=True), list(v.gate_takes.values())
            await conn.execute(
                q["gate_slots_take_many"],
                {"keys": list(keys), "shards": list(shards), "ns": ns},
                prepare=True,
            )
        if v.rate_left:
            (keys, shards), left = zip(*v.rate_left, strict=True), list(v.rate_left.values())
            await conn.execute(
                q["rate_buckets_set_many"],
                {"keys": list(keys), "shards": list(shards), "tokens": left},
                prepare=True,
            )
        verdicts = (
            [(r, "admit", v.shard.get(r.id), 0.0, None) for r in v.admitted]
            + [(r, "deny", None, d, None) for r, d in v.denied]
            + [(r, "hold", None, 0.0, e) for r, e in v.held]
        )
        cur = await conn.execute(
            q["instance_admit_many"],
            {
                "worker": worker,
                "ids": [r.id for r, *_ in verdicts],
                "tokens": [r.token for r, *_ in verdicts],
                "verdicts": [x[1] for x in verdicts],
                "shards": [x[2] for x in verdicts],
                "defers": [x[3] for x in verdicts],
                "errors": [x[4] for x in verdicts],
            },
            prepare=True,
        )
        moved = {row[0] for row in await cur.fetchall()}
        refused = [r for r, *_ in verdicts if r.id not in moved]
        if refused:
            # Denied or held while a cancel marked it (since the claim): cancelled instead.
            await conn.execute(
                q["instance_cancel_settle_if_owned_many"],
                {
                    "worker": worker,
                    "ids": [r.id for r in refused],
                    "tokens": [r.token for r in refused],
                    "join": True,
                },
                prepare=True,
            )
    for row, reason in v.held:
        log.error(
            "instance %s %s",
            row.id,
            reason,
            extra={
                "event": "limit_misconfigured",
                "instance": row.id,
                "fsm": row.fsm,
                "step": row.step,
                "attempt": row.attempt,
            },
        )
    for row in v.admitted:
        row.shard = v.shard.get(row.id)
    return v


def _gate_shards(keys: list[str], limits: Limits) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"keys": [], "shards": [], "capacities": []}
    for key in keys:
        gate = limits.gate_for(key)
        assert gate is not None
        for s, cap in enumerate(gate.capacities()):
            out["keys"].append(key)
            out["shards"].append(s)
            out["capacities"].append(cap)
    return out


def _rate_shards(keys: list[str], limits: Limits) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"keys": [], "shards": [], "capacities": [], "rates": []}
    for key in keys:
        rate = limits.rate_for(key)
        assert rate is not None
        for s in range(rate.shards):
            out["keys"].append(key)
            out["shards"].append(s)
            out["capacities"].append(rate.burst / rate.shards)
            out["rates"].append(rate.rate / rate.shards)
    return out
