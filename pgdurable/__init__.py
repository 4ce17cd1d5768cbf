"""pgdurable: durable finite-state machines and jobs on PostgreSQL.

The names below are loaded on first use (PEP 562), so that ``import pgdurable.client`` —
which imports this package first — stays light: a producer never loads the machine
machinery, the engine or the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgdurable.contract.errors import (
        ChildrenFailed,
        ConfigError,
        DefinitionError,
        DrainLimitExceeded,
        DuplicateInstance,
        InstanceExecuting,
        InvalidInput,
        InvalidOutcome,
        InvalidValue,
        NoTarget,
        OperationRefused,
        PgdurableError,
        SchemaVersionError,
        StateDecodeError,
        StepProcessDied,
        StepTimeout,
        TransactionMisuse,
        UnknownMachine,
        UnknownStep,
    )
    from pgdurable.contract.fsm import FSM, ChildInfo, Context, Registry, Signal, job, step
    from pgdurable.contract.outcomes import KEEP, Await, Cancel, Done, Next, Outcome, Retry, Spawn, Stop
    from pgdurable.contract.results import ChildResult, Results, parallel
    from pgdurable.contract.saga import saga
    from pgdurable.contract.schedule import schedule
    from pgdurable.contract.spec import Child, Insert

_WHERE = {
    "pgdurable.contract.errors": (
        "ConfigError",
        "DefinitionError",
        "DrainLimitExceeded",
        "DuplicateInstance",
        "InstanceExecuting",
        "InvalidInput",
        "InvalidOutcome",
        "InvalidValue",
        "NoTarget",
        "OperationRefused",
        "PgdurableError",
        "ChildrenFailed",
        "SchemaVersionError",
        "StateDecodeError",
        "StepProcessDied",
        "StepTimeout",
        "TransactionMisuse",
        "UnknownMachine",
        "UnknownStep",
    ),
    "pgdurable.contract.fsm": ("FSM", "ChildInfo", "Context", "Registry", "Signal", "job", "step"),
    "pgdurable.contract.outcomes": (
        "KEEP",
        "Await",
        "Cancel",
        "Done",
        "Next",
        "Outcome",
        "Retry",
        "Spawn",
        "Stop",
    ),
    "pgdurable.contract.results": ("ChildResult", "Results", "parallel"),
    "pgdurable.contract.saga": ("saga",),
    "pgdurable.contract.spec": ("Child", "Insert"),
    "pgdurable.contract.schedule": ("schedule",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "Await",
    "Cancel",
    "Child",
    "ChildInfo",
    "ChildResult",
    "ChildrenFailed",
    "ConfigError",
    "Context",
    "DefinitionError",
    "Done",
    "DrainLimitExceeded",
    "DuplicateInstance",
    "FSM",
    "Insert",
    "InstanceExecuting",
    "InvalidInput",
    "InvalidOutcome",
    "InvalidValue",
    "KEEP",
    "Next",
    "NoTarget",
    "OperationRefused",
    "Outcome",
    "PgdurableError",
    "Registry",
    "Results",
    "Retry",
    "SchemaVersionError",
    "Signal",
    "Spawn",
    "StateDecodeError",
    "StepProcessDied",
    "StepTimeout",
    "Stop",
    "TransactionMisuse",
    "UnknownMachine",
    "UnknownStep",
    "job",
    "parallel",
    "saga",
    "schedule",
    "step",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pgdurable' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
