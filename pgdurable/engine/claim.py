"""The pick: claim a batch of runnable rows in one statement, then load what they need.

Enrichment is batched: one read for the inboxes and one for the children of every claimed
row that has any, whatever the batch size. Rows with neither cost no extra statement.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from pgdurable.contract import values
from pgdurable.contract.errors import InvalidValue
from pgdurable.contract.fsm import TERMINAL, ChildInfo, Signal, latest_spawn
from pgdurable.db.queries import Queries

log = logging.getLogger("pgdurable.claim")

#: How often a claim that lost a concurrency-key race is retried before giving up this round.
CLAIM_RETRIES = 3
#: The gate parameters of a claim when no gate is configured (text literals: see int_array).
_NO_GATES = {"gates": "{}", "gate_limits": "{}"}


@dataclass(slots=True)
class Claimed:
    """A row this worker owns until its outcome is flushed (fields follow instance_claim)."""

    id: int
    fsm: str
    version: int | None
    step: str | None
    state: str  # the stored JSON as text (state::text); decode_state reads it
    attempt: int
    crashes: int
    queue: str
    priority: int
    eligible_at: dt.datetime
    awaits: list[str] | None
    correlation_key: str | None
    concurrency_key: str | None
    rate_limit: str | None
    weight: float
    parent_id: int | None
    has_inbox: bool
    has_children: bool
    gated: bool
    cancel_reason: str | None  # set while it runs its on_cancel step (ctx.cancel_reason)
    saga: str | None  # its compensations, as JSON text (docs/sagas.md); None: none yet
    join_policy: str | None  # how it waits for its last Spawn's children ('fail_fast', None)
    traceparent: str | None  # the producer's W3C trace context (docs/observability.md)
    _: KW_ONLY  # the columns above are positional, in the order instance_claim returns
    token: int = 0
    shard: int | None = None  # the gate slot's shard once admitted
    depth: int = 0  # steps run ahead inline on this claim so far
    inbox: list[Signal] = field(default_factory=list)
    children: list[ChildInfo] = field(default_factory=list)
    #: Why its inbox or children could not be read (the executor fails the row with it).
    unreadable: str | None = None

    @property
    def awaited(self) -> list[Signal]:
        """The inbox signals matching the names this row was parked on."""
        if not self.awaits:
            return []
        names = set(self.awaits)
        return [s for s in self.inbox if s.name in names]


async def claim(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    *,
    queue: str,
    limit: int,
    worker: str,
    token: int,
    lease: dt.timedelta,
    horizon: dt.timedelta = dt.timedelta(0),
    gates: dict[str, Any] | None = None,
) -> list[Claimed]:
    """Claim up to ``limit`` rows of ``queue`` (autocommit connection).

    ``gates``: the configured gate names and limits (``Limits.claim_params()``).
    """
    if limit <= 0:
        return []
    params = {
        "queue": queue,
        "limit": limit,
        "worker": worker,
        "token": token,
        "lease": lease,
        "horizon": horizon,
        **(gates or _NO_GATES),
    }
    for attempt in range(CLAIM_RETRIES):
        try:
            cur = await conn.execute(q["instance_claim"], params, prepare=True)
            rows = await cur.fetchall()
            break
        except pgerrors.UniqueViolation:
            # Two claimers of one unconfigured concurrency key both went on with it and the
            # arbiter index refused the second. concurrency_key_try_claim serialises claimers
            # per key, so this is not the normal course of work (a claim in a transaction
            # that is not READ COMMITTED, an executing row written by other means): retry
            # against the committed truth, and say so.
            log.info(
                "claim of queue %r collided on a concurrency key (attempt %d)",
                queue,
                attempt + 1,
                extra={"event": "claim_collision"},
            )
            if attempt == CLAIM_RETRIES - 1:
                return []
    claimed = [Claimed(*row, token=token) for row in rows]
    claimed.sort(key=lambda c: (c.priority, c.eligible_at, c.id))
    return claimed


async def enrich(conn: psycopg.AsyncConnection[Any], q: Queries, claimed: list[Claimed]) -> None:
    """Load inboxes and children for the rows that have them: at most two statements.

    A value this process cannot decode (nested too deeply) marks only its own row
    ``unreadable``, which the executor fails with the reason; the claim's other rows run.
    """
    by_id = {c.id: c for c in claimed}
    inbox_ids = [c.id for c in claimed if c.has_inbox]
    if inbox_ids:
        cur = await conn.execute(q["signal_inbox_many"], {"ids": inbox_ids}, prepare=True)
        for target_id, sid, name, payload, dedup_key, inserted_at, traceparent in await cur.fetchall():
            row = by_id[target_id]
            if traceparent is not None and row.awaits and name in row.awaits:
                row.traceparent = traceparent  # the (last) signal that woke it: its step's parent
            try:
                value = values.decode(payload, f"signal {sid} ({name!r}) payload")
            except InvalidValue as exc:
                row.unreadable = row.unreadable or str(exc)
                continue
            row.inbox.append(Signal(sid, name, value, dedup_key, inserted_at))
    parent_ids = [c.id for c in claimed if c.has_children]
    if parent_ids:
        await _children(conn, q, by_id, parent_ids)
        # A child's failure woke these parents (fail_fast) while siblings still run: cancel
        # them (one statement for all), and read the children again. The parent runs its
        # step once they all ended (the executor parks it again meanwhile).
        woken = [c for c in claimed if c.join_policy == "fail_fast" and _failed_fast(c.children)]
        if woken:
            reason = "a sibling failed (fail_fast)"
            ids = [c.id for c in woken]
            await conn.execute(q["instance_cancel_live_children_many"], {"ids": ids, "reason": reason})
            for c in woken:
                c.children = []
            await _children(conn, q, by_id, ids)


def _failed_fast(children: list[ChildInfo]) -> bool:
    """A child of the last Spawn failed and another is still live."""
    last = latest_spawn(children)
    return any(c.status == "failed" for c in last) and any(c.status not in TERMINAL for c in last)


async def _children(
    conn: psycopg.AsyncConnection[Any], q: Queries, by_id: dict[int, Claimed], parent_ids: list[int]
) -> None:
    """Read the children of the given parents into their rows' ``children``."""
    if parent_ids:
        cur = await conn.execute(q["instance_children_many"], {"ids": parent_ids}, prepare=True)
        for parent_id, cid, fsm, status, state, result, error, index, inserted in await cur.fetchall():
            row = by_id[parent_id]
            try:
                child_state = values.decode(state, f"child {cid} state")
                child_result = None if result is None else values.decode(result, f"child {cid} result")
            except InvalidValue as exc:
                row.unreadable = row.unreadable or str(exc)
                continue
            row.children.append(
                ChildInfo(cid, fsm, status, child_state, child_result, error, index, inserted)
            )
