"""The exception hierarchy: one root, actionable subclasses, database causes in __cause__."""

from __future__ import annotations


class PgdurableError(Exception):
    """Root of every error pgdurable raises on purpose."""


class ConfigError(PgdurableError):
    """A configuration value is wrong; names the file and the key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class DefinitionError(PgdurableError):
    """A machine or job is declared wrongly (raised at import time)."""


class InvalidOutcome(PgdurableError):
    """A step returned something that is not a valid outcome; routed like an exception."""


class InvalidValue(PgdurableError, ValueError):
    """A value cannot be stored as given; names the field and the reason.

    A NUL character (PostgreSQL cannot store it), nesting deeper than a worker decodes,
    ``inf``/``nan`` (JSON has none), a delay out of range (``pgdurable.contract.values``).
    The client raises it before anything is stored; a step's outcome holding such a value
    is an ``InvalidOutcome`` routed to ``handle()``.
    """


class StepTimeout(PgdurableError, TimeoutError):
    """A step ran past its timeout (``@step(timeout=…)`` or the machine's ``step_timeout``);
    routed to ``handle()`` like any step error. ``step`` names it, ``timeout`` is in seconds.

    An async step was cancelled at the deadline; a sync step's thread goes on (it cannot be
    interrupted) and what it returns is discarded; a step process was killed (docs/timeouts.md).
    """

    def __init__(self, step: str, timeout: float):
        super().__init__(f"step {step!r} timed out after {timeout:g} s")
        self.step = step
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (StepTimeout, (self.step, self.timeout))


class StepProcessDied(PgdurableError):
    """The process that ran a sync step of an ``isolation = "process"`` queue died during the
    step (a segfault, ``os._exit``, a kill from outside); routed to ``handle()``. ``status``
    says how: ``"signal 9"``, ``"exit status 3"``."""

    def __init__(self, step: str, status: str):
        super().__init__(f"step process died: {status} (step {step!r})")
        self.step = step
        self.status = status

    def __reduce__(self) -> tuple[object, ...]:
        return (StepProcessDied, (self.step, self.status))


class StateDecodeError(PgdurableError):
    """A stored state no longer decodes into the machine's State; names the field."""

    def __init__(self, fsm: str, field: str | None, detail: str):
        where = f" (field {field!r})" if field else ""
        super().__init__(f"state of {fsm} does not decode{where}: {detail}")
        self.fsm = fsm
        self.field = field
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return (StateDecodeError, (self.fsm, self.field, self.detail))


class DuplicateInstance(PgdurableError):
    """An insert was refused because its correlation key is occupied."""

    def __init__(self, keys: list[str]):
        shown = ", ".join(repr(k) for k in keys)
        super().__init__(f"correlation key already occupied: {shown}")
        self.keys = keys

    @property
    def key(self) -> str:
        return self.keys[0]

    def __reduce__(self) -> tuple[object, ...]:
        return (DuplicateInstance, (self.keys,))


class UnknownMachine(PgdurableError):
    """An insert by name could not be resolved: no worker registered the machine."""


class NoTarget(PgdurableError):
    """A signal's target is unknown or already finished."""


class InvalidInput(PgdurableError, ValueError):
    """An answer to a pending input was refused: it does not fit the input's schema, or is
    not one of its choices (``respond``, before anything is stored); or, in the step, the
    delivered value does not decode into the step's declared input type. ``field`` is where
    (``$`` the value itself, ``$.amount`` a field of it)."""

    def __init__(self, message: str, *, field: str = "$"):
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class OperationRefused(PgdurableError):
    """An operation on an instance (retry, rewind) was refused for the state it is in;
    ``status`` is that state and ``reason`` says why in a word (``children``: it has live
    children; ``executing``: a worker runs its step; otherwise its status)."""

    def __init__(self, message: str, *, instance: int, status: str, reason: str):
        super().__init__(message)
        self.instance = instance
        self.status = status
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class InstanceExecuting(OperationRefused):
    """A worker holds the instance and runs its step: retry and rewind never race it.
    Cancel it (its cancel waits for the step), or try again once the step returned."""


class UnknownStep(PgdurableError, ValueError):
    """A step name that the instance's machine version does not have (as registered)."""


class SchemaVersionError(PgdurableError):
    """The database schema is behind (or ahead of) what this code needs."""


class SchemaNameError(PgdurableError, ValueError):
    """A schema name is not a plain identifier (refused before any SQL is rendered with it)."""


class ModuleImportError(ConfigError):
    """A module listed in ``runtime.modules`` failed to import; its exception is ``__cause__``."""

    def __init__(self, message: str, *, module: str, file: str | None = None, key: str | None = None):
        super().__init__(message, file=file, key=key)
        self.module = module

    @property
    def not_found(self) -> bool:
        """The listed module itself does not exist (rather than its code failing)."""
        cause = self.__cause__
        if not isinstance(cause, ModuleNotFoundError) or not cause.name:
            return False
        return self.module == cause.name or self.module.startswith(cause.name + ".")


class PrivilegeError(PgdurableError):
    """The database role lacks a privilege pgdurable needs; names the role and the privilege.

    The database error stays in ``__cause__``.
    """


class ConnectError(PgdurableError):
    """The database could not be reached (bad address, server down, no such database or role).

    psycopg's error stays in ``__cause__``.
    """


class DrainLimitExceeded(PgdurableError, AssertionError):
    """testing.drain() ran more steps than allowed: a machine does not settle."""


def _rebuild(cls: type[Exception], args: tuple[object, ...], state: dict[str, object]) -> Exception:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ChildrenFailed(PgdurableError):
    """``Results.values()``: children of the last Spawn did not finish ``done``; the message
    names each (id, machine, position, status, error), ``failures`` holds them."""

    def __init__(self, message: str, failures: tuple[object, ...] = ()):
        super().__init__(message)
        self.failures = failures

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class TransactionMisuse(PgdurableError):
    """A transactional step ended its own transaction (``ctx.conn.commit()``, ``rollback()``,
    ``close()``, or a ``COMMIT`` sent as SQL), or went on after one of its statements failed;
    routed to ``handle()``. pgdurable commits the step's writes together with its outcome
    (docs/transactions.md)."""
