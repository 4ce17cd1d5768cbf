"""Concurrency gates and rate limits: configuration, and admission of claimed rows.

A concurrency key whose name (the part before the first ``:``) is not configured runs one
at a time cluster-wide: the claim skips keys that are executing and a unique index makes a
second executing row uncommittable. A configured name is a *gate* of ``limit`` slots per
key, kept as counters in ``gate_slots`` (optionally sharded) with a CHECK that they never go
below zero. A rate limit is a token bucket per key in ``rate_buckets``.

Admission runs right after a claim, only for claimed rows that carry a gated key or a rate
limit — a queue that uses neither pays nothing. In one transaction it creates missing
counters, locks the ones it needs (SKIP LOCKED: never waits for another picker), decides in
claim order, takes slots and tokens, stamps admitted rows with their slot's shard, and
sends denied rows back deferred so unrelated work behind them gets its turn. A row naming
an unconfigured rate limit, or a weight larger than the burst, is held with the reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgdurable.contract.errors import ConfigError
from pgdurable.db.queries import Queries
from pgdurable.engine.claim import Claimed

log = logging.getLogger("pgdurable.limits")

#: A gate-denied row is retried after this long (a slot frees when a holder finishes).
GATE_DEFER = 0.25
#: A rate-denied row on a bucket that never refills (rate 0) is retried after this long.
RATE_ZERO_DEFER = 60.0

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class Gate:
    limit: int
    shards: int = 1

    def capacities(self) -> list[int]:
        base, extra = divmod(self.limit, self.shards)
        return [base + (1 if s < extra else 0) for s in range(self.shards)]


@dataclass(frozen=True, slots=True)
class Rate:
    allowed: float
    period: float  # seconds
    burst: float
    shards: int = 1

    @property
    def rate(self) -> float:
        """Tokens per second, all shards together."""
        return self.allowed / self.period


@dataclass(frozen=True, slots=True)
class Limits:
    gates: dict[str, Gate] = field(default_factory=dict)
    rates: dict[str, Rate] = field(default_factory=dict)

    @staticmethod
    def name_of(key: str) -> str:
        return key.split(":", 1)[0]

    def gate_for(self, key: str | None) -> Gate | None:
        return None if key is None else self.gates.get(self.name_of(key))

    def rate_for(self, key: str | None) -> Rate | None:
        return None if key is None else self.rates.get(self.name_of(key))

    def claim_params(self) -> dict[str, Any]:
        names = sorted(self.gates)
        return {"gates": names, "gate_limits": [self.gates[n].limit for n in names]}

    def check_rate(self, key: str, weight: float) -> str | None:
        """Why a step may never start under this rate limit, or None when it can."""
        rate = self.rate_for(key)
        if rate is None:
            known = sorted(self.rates) or "none"
            return f"rate limit {self.name_of(key)!r} is not configured (configured: {known})"
        if weight > rate.burst:
            return (
                f"weight {weight:g} exceeds the burst {rate.burst:g} of rate limit "
                f"{self.name_of(key)!r}: it could never start"
            )
        return None

    @classmethod
    def parse(
        cls,
        concurrency_limits: dict[str, Any] | None = None,
        rate_limits: dict[str, Any] | None = None,
        *,
        file: str | None = None,
    ) -> Limits:
        """Validate the ``[concurrency_limits]`` and ``[rate_limits]`` tables."""
        gates: dict[str, Gate] = {}
        for name, spec in (concurrency_limits or {}).items():
            key = f"concurrency_limits.{name}"
            _check_name(name, key, file)
            spec = _table(spec, key, file, {"limit", "shards"})
            limit = _int(spec.get("limit"), f"{key}.limit", file, required=True)
            shards = _int(spec.get("shards", 1), f"{key}.shards", file)
            gates[name] = Gate(limit, min(shards, limit))
        rates: dict[str, Rate] = {}
        for name, spec in (rate_limits or {}).items():
            key = f"rate_limits.{name}"
            _check_name(name, key, file)
            spec = _table(spec, key, file, {"allowed", "period", "burst", "shards"})
            allowed = _number(spec.get("allowed"), f"{key}.allowed", file, required=True, zero_ok=True)
            period = _period(spec.get("period"), f"{key}.period", file)
            burst = _number(spec.get("burst", max(allowed, 1.0)), f"{key}.burst", file)
            shards = _int(spec.get("shards", 1), f"{key}.shards", file)
            rates[name] = Rate(allowed, period, burst, shards)
        return cls(gates, rates)


def _check_name(name: str, key: str, file: str | None) -> None:
    if not name or ":" in name:
        raise ConfigError("a limit name must be non-empty and contain no ':'", file=file, key=key)


def _table(spec: Any, key: str, file: str | None, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a table, got {spec!r}", file=file, key=key)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"unknown key (expected {sorted(allowed)})", file=file, key=f"{key}.{unknown[0]}")
    return spec


def _int(value: Any, key: str, file: str | None, *, required: bool = False) -> int:
    if value is None and required:
        raise ConfigError("missing", file=file, key=key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"expected a positive integer, got {value!r}", file=file, key=key)
    return value


def _number(
    value: Any, key: str, file: str | None, *, required: bool = False, zero_ok: bool = False
) -> float:
    if value is None and required:
        raise ConfigError("missing", file=file, key=key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"expected a positive number, got {value!r}", file=file, key=key)
    return float(value)


def _period(value: Any, key: str, file: str | None) -> float:
    """Seconds, from a number or a string such as "500ms", "30s", "1m", "1h", "1d"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _PERIOD.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f'expected seconds or a duration like "1m", got {value!r}', file=file, key=key)
    if seconds <= 0:
        raise ConfigError(f"expected a positive duration, got {value!r}", file=file, key=key)
    return seconds


# -- admission ---------------------------------------------------------------------------


@dataclass(slots=True)
class Verdicts:
    admitted: list[Claimed] = field(default_factory=list)
    denied: list[tuple[Claimed, float]] = field(default_factory=list)  # row, defer seconds
    held: list[tuple[Claimed, str]] = field(default_factory=list)  # row, reason
    shard: dict[int, int] = field(default_factory=dict)  # admitted gated row -> shard
    gate_takes: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    rate_left: dict[tuple[str, int], float] = field(default_factory=dict)


def needs_admission(rows: list[Claimed]) -> bool:
    return any(r.gated or r.rate_limit is not None for r in rows)


def decide(
    rows: list[Claimed],
    limits: Limits,
    gate_free: dict[str, dict[int, int]],
    tokens: dict[str, dict[int, float]],
) -> Verdicts:
    """Pure admission: rows in claim order, free slots and tokens of the *locked* shards."""
    v = Verdicts()
    used: dict[str, float] = defaultdict(float)
    blocked: set[str] = set()  # a denied rate key denies everything after it (prefix rule)
    for row in rows:
        if row.rate_limit is not None:
            reason = limits.check_rate(row.rate_limit, row.weight)
            if reason is not None:
                v.held.append((row, f"held: {reason}"))
                continue
        shard = None
        if row.gated:
            free = gate_free.get(row.concurrency_key or "", {})
            if not free or max(free.values()) <= 0:
                v.denied.append((row, GATE_DEFER))
                continue
            shard = max(free, key=lambda s: (free[s], -s))  # the fullest shard
        if row.rate_limit is not None:
            key = row.rate_limit
            rate = limits.rate_for(key)
            assert rate is not None
            left = sum(tokens.get(key, {}).values()) - used[key]
            if key in blocked or row.weight > left + 1e-9:
                blocked.add(key)
                missing = row.weight - max(left, 0.0)
                v.denied.append((row, missing / rate.rate if rate.rate > 0 else RATE_ZERO_DEFER))
                continue
            used[key] += row.weight
        if shard is not None:
            free = gate_free[row.concurrency_key or ""]
            free[shard] -= 1
            v.gate_takes[(row.concurrency_key or "", shard)] += 1
            v.shard[row.id] = shard
        v.admitted.append(row)
    for key, spent in used.items():
        shards = tokens.get(key, {})
        total = sum(shards.values())
        for s, t in shards.items():  # debit the locked shards in proportion to what they had
            v.rate_left[(key, s)] = t - (t * spent / total if total > 0 else 0.0)
    return v


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
        await conn.execute(
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
    for row, reason in v.held:
        log.error("instance %s %s", row.id, reason, extra={"event": "limit_misconfigured"})
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


def credits(rows: list[Claimed]) -> dict[str, list[Any]] | None:
    """Parameters of gate_slots_credit_many for rows that held a slot (None: nothing)."""
    held = [r for r in rows if r.shard is not None and r.shard >= 0 and r.concurrency_key]
    if not held:
        return None
    return {
        "keys": [r.concurrency_key for r in held],
        "shards": [r.shard for r in held],
        "ns": [1] * len(held),
    }
