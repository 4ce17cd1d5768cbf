"""The step contract: machine classes, the @step and @job decorators, the step context."""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import logging
import math
import random
import types
import typing
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, overload

import msgspec

from pgdurable.contract.errors import DefinitionError
from pgdurable.contract.outcomes import Cancel, Done, Outcome, Retry, Stop
from pgdurable.contract.spec import MachineInfo

if typing.TYPE_CHECKING:
    from pgdurable.contract.results import Results


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal of an instance's inbox."""

    id: int
    name: str
    payload: Any
    dedup_key: str | None
    inserted_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """One child of an instance, as the parent sees it after the join."""

    id: int
    fsm: str
    status: str
    state: Any
    result: Any
    error: str | None
    #: Its position in the Spawn that created it (None: created before schema version 9).
    index: int | None = None
    #: When that Spawn committed: the children of one Spawn share it.
    inserted_at: dt.datetime | None = None


#: The statuses an instance ends in.
TERMINAL = frozenset(("done", "failed", "cancelled"))


def latest_spawn(children: list[ChildInfo]) -> list[ChildInfo]:
    """The children of the last Spawn, in the order it gave them."""
    if not children:
        return []
    last = max((c.inserted_at for c in children if c.inserted_at is not None), default=None)
    batch = [c for c in children if c.inserted_at == last]
    return sorted(batch, key=lambda c: (c.index if c.index is not None else c.id, c.id))


#: The logger of ``ctx.log``: a step's own lines (``[logging.levels] "pgdurable.step"``).
STEP_LOGGER = "pgdurable.step"
_step_logger = logging.getLogger(STEP_LOGGER)  # looked up once: getLogger takes a lock


class StepLog(logging.LoggerAdapter[logging.Logger]):
    """``ctx.log``: every line carries ``event="step_log"`` and the instance, machine, step
    and attempt. ``extra={"event": "charged", …}`` names an event of your own and adds
    fields."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = {**self.extra, **extra} if extra else self.extra  # type: ignore[dict-item]
        return msg, kwargs


@dataclass(slots=True)
class Context:
    """What a step receives besides ``self``; ``ctx.log`` is its logger (``StepLog``)."""

    id: int
    fsm: str
    version: int
    step: str
    attempt: int
    state: Any
    queue: str
    priority: int
    correlation_key: str | None
    concurrency_key: str | None
    awaited: list[Signal] = field(default_factory=list)
    inbox: list[Signal] = field(default_factory=list)
    children: list[ChildInfo] = field(default_factory=list)
    #: Why the instance was cancelled, while it runs its machine's ``on_cancel`` step (and
    #: any step that one moves on to); None otherwise.
    cancel_reason: str | None = None
    #: While a compensation step runs: the failure that made the instance compensate its
    #: completed steps (docs/sagas.md); None otherwise.
    compensating: str | None = None
    #: The answer to the input the instance awaited (the payload of the awaited signal on
    #: the await's first name), decoded into the step's ``input`` type when it declares one;
    #: None when none arrived (a timeout, or another name woke it). docs/inputs.md
    input: Any = None
    #: A transactional step's connection, inside the open transaction its outcome commits
    #: in (``@step(transactional=True)``, docs/transactions.md); None for other steps.
    conn: Any = None
    _log: StepLog | None = field(default=None, init=False, repr=False, compare=False)

    def results(self, type_: Any = None) -> Results[Any]:
        """The children of the last Spawn, in the order it gave them, each with its status,
        error and result (converted to ``type_`` when given); ``.values()`` raises when one
        did not finish ``done``. docs/coordination.md#parallel-results."""
        from pgdurable.contract.results import results_of

        return results_of(self.children, type_)

    @property
    def log(self) -> StepLog:
        # Built on first use: most steps never log, and a step costs ~100 µs in all.
        if self._log is None:
            self._log = StepLog(
                _step_logger,
                {
                    "event": "step_log",
                    "instance": self.id,
                    "fsm": self.fsm,
                    "step": self.step,
                    "attempt": self.attempt,
                },
            )
        return self._log


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    initial: bool
    timeout: float | None  # seconds: the step's own, else its machine's step_timeout
    #: The step that undoes this one once it completed, should the instance fail or be
    #: cancelled later (docs/sagas.md); None: nothing to undo.
    compensate: str | None = None
    #: The type of the input this step receives in ``ctx.input`` (``@step(input=T)``).
    input: Any = None
    #: Its writes on ``ctx.conn`` commit with its outcome (docs/transactions.md).
    transactional: bool = False
    #: That transaction's isolation level (``ISOLATION_LEVELS``).
    isolation: str = "read committed"
    #: A serialization failure or deadlock goes to ``handle()`` (counted as an attempt)
    #: instead of a retry that counts nothing.
    count_conflicts: bool = False


#: The isolation levels a transactional step may ask for.
ISOLATION_LEVELS = ("read committed", "repeatable read", "serializable")


def _transaction_marker(
    what: str, transactional: bool, isolation: str | None, count_conflicts: bool
) -> tuple[str, bool] | None:
    """What ``@step``/``@job`` store for a transactional step, checked."""
    if not isinstance(transactional, bool):
        raise DefinitionError(f"{what}: transactional must be True or False, got {transactional!r}")
    if not transactional:
        if isolation is not None or count_conflicts:
            raise DefinitionError(f"{what}: isolation and count_conflicts need transactional=True")
        return None
    level = "read committed" if isolation is None else isolation
    if level not in ISOLATION_LEVELS:
        raise DefinitionError(f"{what}: isolation must be one of {list(ISOLATION_LEVELS)}, got {isolation!r}")
    return level, bool(count_conflicts)


Timeout = float | dt.timedelta | None


def timeout_seconds(value: Timeout, what: str) -> float | None:
    """A step timeout in seconds (None: no timeout), or a DefinitionError naming ``what``."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise DefinitionError(f"{what}: timeout must be seconds (a number or a timedelta), got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise DefinitionError(f"{what}: timeout must be a positive, finite number of seconds, got {value!r}")
    return seconds


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


@overload
def step(
    fn: _Fn,
    *,
    initial: bool = ...,
    timeout: Timeout = ...,
    compensate: Any = ...,
    input: Any = ...,
    transactional: bool = ...,
    isolation: str | None = ...,
    count_conflicts: bool = ...,
) -> _Fn: ...


@overload
def step(
    fn: None = None,
    *,
    initial: bool = ...,
    timeout: Timeout = ...,
    compensate: Any = ...,
    input: Any = ...,
    transactional: bool = ...,
    isolation: str | None = ...,
    count_conflicts: bool = ...,
) -> Callable[[_Fn], _Fn]: ...


def step(
    fn: Callable[..., Any] | None = None,
    *,
    initial: bool = False,
    timeout: Timeout = None,
    compensate: Any = None,
    input: Any = None,
    transactional: bool = False,
    isolation: str | None = None,
    count_conflicts: bool = False,
) -> Any:
    """Mark a method as a step. ``initial=True`` marks where new instances start.

    ``timeout`` (seconds, or a timedelta) bounds the step; None takes the machine's
    ``step_timeout``. An async step is cancelled at its deadline; a sync step's thread cannot
    be interrupted: its outcome is discarded (on an ``isolation = "process"`` queue its
    process is killed). Either way ``StepTimeout`` goes to ``handle()`` (docs/timeouts.md).
    ``compensate`` names the step (by name, or the step itself) that undoes this one: once
    this step completed, a later failure or cancel of the instance runs it (docs/sagas.md).

    ``input`` (a type msgspec decodes: a ``Struct``, ``int``, a ``Literal``…) is the type of
    the answer this step receives after an ``Await`` that asks for input: ``ctx.input`` is
    the delivered value decoded into it (one that does not fit is an ``InvalidInput`` routed
    to ``handle()``), and an ``Await`` whose ``then`` is this step takes it as its default
    ``schema`` (docs/inputs.md).

    ``transactional=True``: the step receives ``ctx.conn``, a connection inside an open
    transaction on pgdurable's database; what it writes there commits together with its
    outcome, guarded by its claim, or not at all (docs/transactions.md). ``isolation``:
    ``"read committed"`` (the default), ``"repeatable read"`` or ``"serializable"``; a
    serialization failure or deadlock retries the step with the machine's backoff without
    counting an attempt, unless ``count_conflicts=True`` sends it to ``handle()``.
    """

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        undo = compensate if compensate is None or isinstance(compensate, str) else compensate.__name__
        seconds = timeout_seconds(timeout, f"step {f.__name__}")
        txn = _transaction_marker(f"step {f.__name__}", transactional, isolation, count_conflicts)
        f.__pgdurable_step__ = (initial, seconds, undo)  # type: ignore[attr-defined]
        if txn is not None:
            f.__pgdurable_txn__ = txn  # type: ignore[attr-defined]
        if input is not None:
            try:
                msgspec.json.schema(input)
            except (TypeError, ValueError) as exc:
                raise DefinitionError(
                    f"step {f.__name__}: input {input!r} is not a type msgspec describes"
                ) from exc
            f.__pgdurable_input__ = input  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


def default_backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Capped exponential backoff with jitter: about base * 2**attempt, at most ``cap``.

    The jitter takes up to a quarter off, so instances that failed together spread out.
    """
    delay = min(cap, base * (2.0 ** min(attempt, 32)))
    return delay * random.uniform(0.75, 1.0)


class FSM:
    """Base class of a durable state machine.

    Subclass with keywords: ``class Checkout(FSM, name="checkout", version=1, queue="q")``.
    A nested ``State`` type (a ``msgspec.Struct``, or anything msgspec decodes) types the
    state; without one the state is a plain dict. ``history=False`` records none of its step
    attempts in the history table (docs/history.md). ``deadline`` (seconds or a timedelta)
    is the default deadline of its instances, counted from their insert (docs/deadlines.md).
    """

    __pgdurable__: ClassVar[MachineInfo]
    __pgdurable_steps__: ClassVar[dict[str, StepDef]]
    #: Reclaims of one step (its worker died) before the instance fails; None: the config's.
    max_crashes: ClassVar[int | None] = None
    #: The step a cancel sends a live instance to (a step's name, or the step itself), so it
    #: can undo what it did; the instance ends ``cancelled`` when that step (or one it moves
    #: on to) finishes. None: a cancel ends the instance at once (docs/operating.md).
    on_cancel: ClassVar[Any] = None
    #: How many times a compensation step runs before it gives up and the next one runs.
    compensation_attempts: ClassVar[int] = 3
    #: Seconds a step may run when it declares no ``timeout`` of its own; None: unbounded.
    step_timeout: ClassVar[float | None] = None

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        version: int = 1,
        queue: str = "default",
        max_crashes: int | None = None,
        history: bool = True,
        compensation_attempts: int | None = None,
        deadline: float | dt.timedelta | None = None,
        step_timeout: Timeout = None,
        abstract: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DefinitionError(f"{cls.__name__}: version must be a positive integer")
        if not queue:
            raise DefinitionError(f"{cls.__name__}: queue must not be empty")
        if max_crashes is not None:
            if not isinstance(max_crashes, int) or max_crashes < 1:
                raise DefinitionError(f"{cls.__name__}: max_crashes must be a positive integer")
            cls.max_crashes = max_crashes
        if not isinstance(history, bool):
            raise DefinitionError(f"{cls.__name__}: history must be True or False")
        if compensation_attempts is not None:
            if not isinstance(compensation_attempts, int) or compensation_attempts < 1:
                raise DefinitionError(f"{cls.__name__}: compensation_attempts must be a positive integer")
            cls.compensation_attempts = compensation_attempts
        deadline_s = _deadline_seconds(cls.__name__, deadline)
        if step_timeout is not None:
            cls.step_timeout = timeout_seconds(step_timeout, f"{cls.__name__} step_timeout")
        default_timeout = timeout_seconds(cls.step_timeout, f"{cls.__name__} step_timeout")
        steps: dict[str, StepDef] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                marker = getattr(value, "__pgdurable_step__", None)
                if marker is not None:
                    initial, timeout, undo = marker
                    if timeout is None:
                        timeout = default_timeout
                    txn = getattr(value, "__pgdurable_txn__", None)
                    steps[attr] = StepDef(
                        attr,
                        value,
                        inspect.iscoroutinefunction(value),
                        initial,
                        timeout,
                        undo,
                        getattr(value, "__pgdurable_input__", None),
                        *((True, *txn) if txn is not None else ()),
                    )
        if not steps:
            raise DefinitionError(f"{cls.__name__}: a machine needs at least one @step")
        initials = [s.name for s in steps.values() if s.initial]
        if len(initials) > 1:
            raise DefinitionError(f"{cls.__name__}: several initial steps {initials}")
        if not initials and len(steps) > 1:
            raise DefinitionError(f"{cls.__name__}: mark the initial step with @step(initial=True)")
        initial = initials[0] if initials else next(iter(steps))
        on_cancel = _hook_step(cls, steps)
        _check_compensations(cls, steps)
        state_type = vars(cls).get("State", getattr(cls, "State", None))
        cls.__pgdurable_steps__ = steps
        cls.__pgdurable__ = MachineInfo(
            name=name or cls.__name__,
            version=version,
            queue=queue,
            initial=initial,
            steps=tuple(steps),
            state_type=state_type,
            history=history,
            on_cancel=on_cancel,
            deadline=deadline_s,
        )

    def handle(self, exc: BaseException, ctx: Context) -> Outcome:
        """Turn an exception raised by a step into an outcome. Default: fail the instance."""
        return Stop(repr(exc))

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt + 1`` when ``Retry`` gives no delay."""
        return default_backoff(attempt)


def _deadline_seconds(name: str, deadline: float | dt.timedelta | None) -> float | None:
    """A machine's relative deadline (``deadline=``) in seconds, checked."""
    if deadline is None:
        return None
    if isinstance(deadline, dt.timedelta):
        value = deadline.total_seconds()
    elif isinstance(deadline, int | float) and not isinstance(deadline, bool):
        value = float(deadline)
    else:
        raise DefinitionError(f"{name}: deadline must be seconds or a timedelta, got {deadline!r}")
    if not 0 < value < 100 * 365 * 86400:
        raise DefinitionError(f"{name}: deadline must be positive and under 100 years, got {deadline!r}")
    return value


def _hook_step(cls: type, steps: dict[str, StepDef]) -> str | None:
    """The step ``cls.on_cancel`` names (by name, or the step function itself), checked."""
    hook = getattr(cls, "on_cancel", None)
    if hook is None:
        return None
    name = hook if isinstance(hook, str) else getattr(hook, "__name__", None)
    if name not in steps:
        raise DefinitionError(f"{cls.__name__}: on_cancel = {hook!r} names no step (steps: {list(steps)})")
    return name


def _check_compensations(cls: type, steps: dict[str, StepDef]) -> None:
    """Each ``compensate=`` names a step of the class, which compensates nothing itself."""
    for s in steps.values():
        if s.compensate is None:
            continue
        undo = steps.get(s.compensate)
        if undo is None:
            raise DefinitionError(
                f"{cls.__name__}: step {s.name!r} compensate={s.compensate!r} names no step "
                f"(steps: {list(steps)})"
            )
        if undo.compensate is not None:
            raise DefinitionError(
                f"{cls.__name__}: {undo.name!r} compensates {s.name!r}, so it cannot declare a "
                "compensation of its own"
            )
        if undo.name == s.name or undo.initial:
            raise DefinitionError(f"{cls.__name__}: step {s.name!r} cannot be compensated by {undo.name!r}")


def _args_type(fn: Callable[..., Any]) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise DefinitionError(f"job {fn.__name__} must take its arguments as first parameter")
    hints = typing.get_type_hints(fn)
    hint = hints.get(params[0].name)
    if hint is None or hint is Any or hint is dict or typing.get_origin(hint) is dict:
        return None
    return hint


def job(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str = "default",
    version: int = 1,
    max_attempts: int = 20,
    backoff: Callable[[int], float] | None = None,
    timeout: Timeout = None,
    max_crashes: int | None = None,
    history: bool = True,
    deadline: float | dt.timedelta | None = None,
    transactional: bool = False,
    isolation: str | None = None,
    count_conflicts: bool = False,
) -> Any:
    """Declare a one-step machine from a function ``fn(args[, ctx])``.

    Returning a value finishes the job with it as result (returning an outcome such as
    ``Retry(delay=60)`` is honoured as-is). Raising retries with ``backoff(attempt)`` seconds
    (capped exponential with jitter by default) until ``max_attempts`` runs were made, then
    fails; raising ``Cancel`` fails at once. The decorator returns the machine class; the
    plain function stays available as ``.fn``. ``history=False``: no history rows.
    ``deadline``: the default deadline of its instances (docs/deadlines.md).
    ``timeout`` (seconds or a timedelta) bounds each run: past it the run fails with
    ``StepTimeout`` and is retried like any error (docs/timeouts.md).
    ``transactional``, ``isolation``, ``count_conflicts``: as ``@step``'s; ``ctx.conn`` is
    the run's connection, its writes commit with the job's outcome (docs/transactions.md).
    """
    if max_attempts < 1:
        raise DefinitionError("max_attempts must be at least 1")

    def build(f: Callable[..., Any]) -> type[FSM]:
        run_timeout = timeout_seconds(timeout, f"job {name or f.__name__}")
        args_type = _args_type(f)
        takes_ctx = len(inspect.signature(f).parameters) >= 2

        def call(args: Any, ctx: Context) -> Any:
            return f(args, ctx) if takes_ctx else f(args)

        if inspect.iscoroutinefunction(f):

            async def perform(self: FSM, ctx: Context) -> Any:
                return _job_result(await call(ctx.state, ctx))

        else:

            def perform(self: FSM, ctx: Context) -> Any:  # type: ignore[misc]
                return _job_result(call(ctx.state, ctx))

        def handle(self: FSM, exc: BaseException, ctx: Context) -> Outcome:
            if isinstance(exc, Cancel):
                return Stop(exc.reason)
            if ctx.attempt + 1 < max_attempts:
                return Retry(delay=self.backoff(ctx.attempt), error=repr(exc))
            return Stop(f"gave up after {ctx.attempt + 1} attempts: {exc!r}")

        def job_backoff(self: FSM, attempt: int) -> float:
            return backoff(attempt) if backoff is not None else default_backoff(attempt)

        body: dict[str, Any] = {
            "perform": step(
                perform,
                initial=True,
                timeout=run_timeout,
                transactional=transactional,
                isolation=isolation,
                count_conflicts=count_conflicts,
            ),
            "handle": handle,
            "backoff": job_backoff,
            "fn": staticmethod(f),
            "max_attempts": max_attempts,
            "__module__": f.__module__,
            "__doc__": f.__doc__,
            "__qualname__": f.__qualname__,
        }
        if args_type is not None:
            body["State"] = args_type
        kwds: dict[str, Any] = {"name": name or f.__name__, "queue": queue, "version": version}
        if max_crashes is not None:
            kwds["max_crashes"] = max_crashes
        if history is not True:
            kwds["history"] = history
        if deadline is not None:
            kwds["deadline"] = deadline
        cls = types.new_class(f.__name__, (FSM,), kwds, lambda ns: ns.update(body))
        return cls

    return build(fn) if fn is not None else build


def _job_result(value: Any) -> Any:
    if isinstance(value, Done | Retry | Stop):
        return value
    return Done(value)


class Registry:
    """The machines a process can run, by (name, version)."""

    def __init__(self, machines: Iterable[type[FSM]] = ()):
        self._by_key: dict[tuple[str, int], type[FSM]] = {}
        self._instances: dict[tuple[str, int], FSM] = {}
        self._latest: dict[str, int] = {}
        #: Whether a machine here has a transactional step (else no row needs the lookup).
        self.transactional = False
        for m in machines:
            self.add(m)

    def add(self, machine: type[FSM]) -> None:
        info = getattr(machine, "__pgdurable__", None)
        if not isinstance(info, MachineInfo):
            raise DefinitionError(f"{machine!r} is not a machine (an FSM subclass or a @job)")
        key = (info.name, info.version)
        existing = self._by_key.get(key)
        if existing is not None and existing is not machine:
            raise DefinitionError(
                f"machine {info.name!r} version {info.version} is defined twice: "
                f"{existing.__module__}.{existing.__qualname__} and "
                f"{machine.__module__}.{machine.__qualname__}"
            )
        self._by_key[key] = machine
        self._instances[key] = machine()
        self._latest[info.name] = max(info.version, self._latest.get(info.name, 0))
        if any(s.transactional for s in machine.__pgdurable_steps__.values()):
            self.transactional = True

    @classmethod
    def from_modules(cls, modules: Iterable[str]) -> Registry:
        """Import modules and collect every machine defined at their top level."""
        reg = cls()
        for modname in modules:
            module = importlib.import_module(modname)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and issubclass(value, FSM)
                    and "__pgdurable__" in vars(value)
                    and value.__module__ == module.__name__
                ):
                    reg.add(value)
        return reg

    def get(self, name: str, version: int | None) -> tuple[type[FSM], FSM] | None:
        """The machine class and its instance; version None means the newest known."""
        if version is None:
            version = self._latest.get(name)
            if version is None:
                return None
        key = (name, version)
        cls = self._by_key.get(key)
        return None if cls is None else (cls, self._instances[key])

    def versions(self, name: str) -> list[int]:
        return sorted(v for (n, v) in self._by_key if n == name)

    def machines(self) -> list[type[FSM]]:
        return list(self._by_key.values())

    def names(self) -> list[str]:
        return sorted(self._latest)

    def queues(self) -> list[str]:
        return sorted({m.__pgdurable__.queue for m in self._by_key.values()})


def decode_state(info: MachineInfo, raw: str) -> Any:
    """Decode stored JSON into the machine's State (raises msgspec.ValidationError)."""
    if info.state_type is None:
        return msgspec.json.decode(raw)
    return msgspec.json.decode(raw, type=info.state_type, strict=False)
