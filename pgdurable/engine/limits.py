"""Concurrency gates and rate limits: the policy values and the pure admission decision.

A concurrency key whose name (the part before the first ``:``) is not configured runs one
at a time cluster-wide: the claim skips keys that are executing and a unique index makes a
second executing row uncommittable. A configured name is a *gate* of ``limit`` slots per
key, kept as counters in ``gate_slots`` (optionally sharded) with a CHECK that they never go
below zero. A rate limit is a token bucket per key in ``rate_buckets``.

``decide`` says, for claimed rows in claim order and the slots and tokens of the counters
admission could lock, which rows run now, which are deferred and which are held;
``pgdurable.engine.admission`` runs it inside its transaction. The ``[concurrency_limits]``
and ``[rate_limits]`` tables of the config file are parsed by ``pgdurable.runtime.config``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pgdurable.engine.claim import Claimed

#: A gate-denied row is retried after this long (a slot frees when a holder finishes).
GATE_DEFER = 0.25
#: A rate-denied row on a bucket that never refills (rate 0) is retried after this long.
RATE_ZERO_DEFER = 60.0


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


@dataclass(slots=True)
class Verdicts:
    admitted: list[Claimed] = field(default_factory=list)
    denied: list[tuple[Claimed, float]] = field(default_factory=list)  # row, defer seconds
    held: list[tuple[Claimed, str]] = field(default_factory=list)  # row, reason
    shard: dict[int, int] = field(default_factory=dict)  # admitted gated row -> shard
    gate_takes: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    rate_left: dict[tuple[str, int], float] = field(default_factory=dict)


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
