"""The per-process runtime: what every component of a worker process shares.

Built once in the process's composition root (``worker.Worker``) after the fork, and passed
down; there is no module-level mutable state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdurable.db.queries import Queries
from pgdurable.engine import Engine
from pgdurable.runtime.config import Config, QueueSettings
from pgdurable.runtime.metrics import WorkerMetrics

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


@dataclass
class Stats:
    """Counters of one worker process, reported to the supervisor."""

    steps: int = 0
    stale: int = 0
    errors: int = 0
    last_error: str | None = None
    #: Steps that ran past their timeout while their thread (or step process) went on.
    overdue: int = 0

    def error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message


@dataclass
class Runtime:
    """Config, queue, engine, pool, logger, clock and the stop request of one process."""

    cfg: Config
    dsn: str
    queue: str
    index: int
    engine: Engine
    pool: Pool
    log: logging.Logger
    stats: Stats = field(default_factory=Stats)
    clock: Callable[[], float] = time.monotonic
    #: Set when the process should stop (SIGTERM, or the supervisor went away).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    #: The metrics recorder (``[metrics] listen`` set), reported with each report line.
    metrics: WorkerMetrics | None = None

    @property
    def settings(self) -> QueueSettings:
        return self.cfg.queues[self.queue]

    @property
    def queries(self) -> Queries:
        return self.engine.q

    @property
    def worker_id(self) -> str:
        return self.engine.worker_id
