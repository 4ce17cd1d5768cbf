"""pgdurable: durable finite-state machines and jobs on PostgreSQL."""

from .errors import (
    ConfigError,
    DefinitionError,
    DrainLimitExceeded,
    DuplicateInstance,
    InvalidOutcome,
    NoTarget,
    PgdurableError,
    SchemaVersionError,
    StateDecodeError,
    UnknownMachine,
)
from .fsm import FSM, ChildInfo, Context, Registry, Signal, job, step
from .outcomes import KEEP, Await, Cancel, Done, Next, Outcome, Retry, Spawn, Stop
from .spec import Child, Insert

__all__ = [
    "FSM",
    "KEEP",
    "Await",
    "Cancel",
    "Child",
    "ChildInfo",
    "ConfigError",
    "Context",
    "DefinitionError",
    "Done",
    "DrainLimitExceeded",
    "DuplicateInstance",
    "Insert",
    "InvalidOutcome",
    "Next",
    "NoTarget",
    "Outcome",
    "PgdurableError",
    "Registry",
    "Retry",
    "SchemaVersionError",
    "Signal",
    "Spawn",
    "StateDecodeError",
    "Stop",
    "UnknownMachine",
    "job",
    "step",
]
__version__ = "0.1.0"
