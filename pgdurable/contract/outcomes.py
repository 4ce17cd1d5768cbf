"""What a step returns. Frozen value types; validated in one place (pgdurable.engine.outcome)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from pgdurable.contract.spec import Insert


class _Keep:
    """Marker: leave the stored value as it is."""

    __slots__ = ()
    _instance: _Keep | None = None

    def __new__(cls) -> _Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"

    def __reduce__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()

StepRef: TypeAlias = "str | Callable[..., Any]"
Seconds: TypeAlias = "float | dt.timedelta | None"


@dataclass(frozen=True, slots=True)
class Next:
    """Move to ``step`` (runnable at now + delay), attempt back to 0.

    ``concurrency_key``: KEEP (default) keeps the current key, None releases it, a value
    switches. ``rate_limit``/``weight`` throttle the start of ``step``. ``inline`` asks the
    worker to run ``step`` at once on the claim it holds when nothing forbids it.
    """

    step: StepRef
    state: Any = KEEP
    delay: Seconds = None
    concurrency_key: str | tuple[str, object] | None | _Keep = KEEP
    rate_limit: str | tuple[str, object] | None = None
    weight: float = 1.0
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the same step again after ``delay`` (None: the machine's backoff), attempt + 1.

    Signals the step was handed stay in the inbox, so the retry sees them again.
    """

    state: Any = KEEP
    delay: Seconds = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Await:
    """Park until a signal named in ``names`` arrives (or ``timeout`` passes), then run ``then``.

    With ``prompt``, ``schema`` or ``choices`` it asks for input (docs/inputs.md): a pending
    input answered on the first of ``names``, listed by ``Client.inputs()`` and ``pgdurable
    inputs``. ``schema`` is the type of the answer (a ``msgspec.Struct``, ``int``, a
    ``Literal``…; default: the ``input`` type ``then`` declares), stored as its JSON Schema
    so that ``respond`` can refuse a bad answer without the machine's code; ``choices`` are
    the allowed values.
    """

    names: str | Sequence[str]
    then: StepRef
    state: Any = KEEP
    timeout: Seconds = None
    prompt: str | None = None
    schema: Any = None
    choices: Sequence[Any] | None = None


@dataclass(frozen=True, slots=True)
class Spawn:
    """Insert ``children`` and park until every one of them is terminal, then run ``then``.

    ``fail_fast=True``: the first child that fails wakes the instance, its live siblings
    are cancelled, and ``then`` runs once they ended (``ctx.results()`` shows which did
    what).
    """

    children: Sequence[Insert]
    then: StepRef
    state: Any = KEEP
    fail_fast: bool = False


@dataclass(frozen=True, slots=True)
class Done:
    """Finish successfully with ``result`` (any JSON-encodable value)."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish as failed with ``reason``."""

    reason: str


Outcome: TypeAlias = Next | Retry | Await | Spawn | Done | Stop
OUTCOME_TYPES: Final = (Next, Retry, Await, Spawn, Done, Stop)


class Cancel(Exception):  # raised by user code: named as a verb, not "...Error"
    """Raise from a job to fail it at once, without further attempts."""

    def __init__(self, reason: str = "cancelled"):
        super().__init__(reason)
        self.reason = reason
