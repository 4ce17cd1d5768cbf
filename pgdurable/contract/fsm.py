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
    _log: StepLog | None = field(default=None, init=False, repr=False, compare=False)

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
def step(fn: _Fn, *, initial: bool = ..., timeout: Timeout = ...) -> _Fn: ...


@overload
def step(fn: None = None, *, initial: bool = ..., timeout: Timeout = ...) -> Callable[[_Fn], _Fn]: ...


def step(fn: Callable[..., Any] | None = None, *, initial: bool = False, timeout: Timeout = None) -> Any:
    """Mark a method as a step. ``initial=True`` marks where new instances start.

    ``timeout`` (seconds, or a timedelta) bounds the step; None takes the machine's
    ``step_timeout``. An async step is cancelled at its deadline; a sync step's thread cannot
    be interrupted: its outcome is discarded (on an ``isolation = "process"`` queue its
    process is killed). Either way ``StepTimeout`` goes to ``handle()`` (docs/timeouts.md).
    """

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        f.__pgdurable_step__ = (initial, timeout_seconds(timeout, f"step {f.__name__}"))  # type: ignore[attr-defined]
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
    attempts in the history table (docs/history.md).
    """

    __pgdurable__: ClassVar[MachineInfo]
    __pgdurable_steps__: ClassVar[dict[str, StepDef]]
    #: Reclaims of one step (its worker died) before the instance fails; None: the config's.
    max_crashes: ClassVar[int | None] = None
    #: The step a cancel sends a live instance to (a step's name, or the step itself), so it
    #: can undo what it did; the instance ends ``cancelled`` when that step (or one it moves
    #: on to) finishes. None: a cancel ends the instance at once (docs/operating.md).
    on_cancel: ClassVar[Any] = None
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
        if step_timeout is not None:
            cls.step_timeout = timeout_seconds(step_timeout, f"{cls.__name__} step_timeout")
        default_timeout = timeout_seconds(cls.step_timeout, f"{cls.__name__} step_timeout")
        steps: dict[str, StepDef] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                marker = getattr(value, "__pgdurable_step__", None)
                if marker is not None:
                    initial, timeout = marker
                    if timeout is None:
                        timeout = default_timeout
                    steps[attr] = StepDef(attr, value, inspect.iscoroutinefunction(value), initial, timeout)
        if not steps:
            raise DefinitionError(f"{cls.__name__}: a machine needs at least one @step")
        initials = [s.name for s in steps.values() if s.initial]
        if len(initials) > 1:
            raise DefinitionError(f"{cls.__name__}: several initial steps {initials}")
        if not initials and len(steps) > 1:
            raise DefinitionError(f"{cls.__name__}: mark the initial step with @step(initial=True)")
        initial = initials[0] if initials else next(iter(steps))
        on_cancel = _hook_step(cls, steps)
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
        )

    def handle(self, exc: BaseException, ctx: Context) -> Outcome:
        """Turn an exception raised by a step into an outcome. Default: fail the instance."""
        return Stop(repr(exc))

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt + 1`` when ``Retry`` gives no delay."""
        return default_backoff(attempt)


def _hook_step(cls: type, steps: dict[str, StepDef]) -> str | None:
    """The step ``cls.on_cancel`` names (by name, or the step function itself), checked."""
    hook = getattr(cls, "on_cancel", None)
    if hook is None:
        return None
    name = hook if isinstance(hook, str) else getattr(hook, "__name__", None)
    if name not in steps:
        raise DefinitionError(f"{cls.__name__}: on_cancel = {hook!r} names no step (steps: {list(steps)})")
    return name


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
) -> Any:
    """Declare a one-step machine from a function ``fn(args[, ctx])``.

    Returning a value finishes the job with it as result (returning an outcome such as
    ``Retry(delay=60)`` is honoured as-is). Raising retries with ``backoff(attempt)`` seconds
    (capped exponential with jitter by default) until ``max_attempts`` runs were made, then
    fails; raising ``Cancel`` fails at once. The decorator returns the machine class; the
    plain function stays available as ``.fn``. ``history=False``: no history rows.
    ``timeout`` (seconds or a timedelta) bounds each run: past it the run fails with
    ``StepTimeout`` and is retried like any error (docs/timeouts.md).
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
            "perform": step(perform, initial=True, timeout=run_timeout),
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
