"""The light client: insert, signal, read and wait, for producers.

Imports psycopg, psycopg_pool and msgspec only: no worker, no supervisor, no uvloop, no user
code. ``AsyncClient`` (``aio.py``) is written once; ``Client`` (``sync.py``) is generated
from it by ``tools/gen_sync_client.py``, so both run the same statements. ``common.py``
holds what they share without I/O, ``concurrency.py`` the few pieces that differ, and
``bulk.py`` the ``COPY`` stream of ``insert_many``.
"""

from __future__ import annotations

from pgdurable.client.aio import AsyncClient
from pgdurable.client.common import Busy, Failed, Instance, LogLine, Saga, StepAttempt, WaitResult
from pgdurable.client.inputs import PendingInput
from pgdurable.client.operate import CancelResult, RetryReport, Rewound
from pgdurable.client.schedules import Schedule, ScheduleExists
from pgdurable.client.sync import Client
from pgdurable.contract.errors import (
    DuplicateInstance,
    InstanceExecuting,
    InvalidInput,
    InvalidValue,
    NoTarget,
    OperationRefused,
    UnknownMachine,
    UnknownStep,
)
from pgdurable.contract.outcomes import Done
from pgdurable.contract.spec import Child, Insert

__all__ = [
    "AsyncClient",
    "Busy",
    "CancelResult",
    "Child",
    "Client",
    "Done",
    "DuplicateInstance",
    "Failed",
    "Insert",
    "Instance",
    "InstanceExecuting",
    "InvalidInput",
    "InvalidValue",
    "LogLine",
    "NoTarget",
    "OperationRefused",
    "PendingInput",
    "RetryReport",
    "Rewound",
    "Saga",
    "Schedule",
    "ScheduleExists",
    "StepAttempt",
    "UnknownMachine",
    "UnknownStep",
    "WaitResult",
]
