"""Run one step and turn what it returned into a row update, validated in one place.

Nothing here touches the database: the result is a ``Result`` the flusher commits. A step
error, a malformed outcome, a state that no longer decodes and an unknown machine each end
in a well-defined result; nothing is half-committed because encoding happens here, before
the flush. ``prepare`` also refuses what PostgreSQL would refuse in the flush (a NUL
character, a delay out of range) and what a worker could not decode back (nesting deeper
than ``values.MAX_DEPTH``): one step's error for its ``handle()``, not a group commit that
fails for every row in it.

Step timeouts (docs/timeouts.md): an async step is cancelled at its deadline; a sync step's
thread cannot be interrupted, so at the deadline the step fails with ``StepTimeout`` and the
thread becomes *overdue*: ``on_overdue`` hands its future to the slots, which keep its slot
taken until it returns (what it returns is discarded). With ``processes`` (a queue with
``isolation = "process"``) a sync step runs in a step process instead, killed when overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, assert_never

import msgspec

from pgdurable.contract import values
from pgdurable.contract.errors import (
    InvalidInput,
    InvalidOutcome,
    InvalidValue,
    StateDecodeError,
    StepTimeout,
)
from pgdurable.contract.fsm import FSM, TERMINAL, Context, Registry, StepDef, decode_state
from pgdurable.contract.outcomes import KEEP, OUTCOME_TYPES, Await, Done, Next, Outcome, Retry, Spawn, Stop
from pgdurable.contract.spec import InsertRow, MachineInfo, limit_key, resolve, seconds
from pgdurable.engine import sagas
from pgdurable.engine.capture import CaptureSettings
from pgdurable.engine.capture import begin as begin_capture
from pgdurable.engine.capture import end as end_capture
from pgdurable.engine.capture import install as install_capture
from pgdurable.engine.claim import Claimed
from pgdurable.engine.history import TRACEBACK_LIMIT, format_traceback, storable
from pgdurable.engine.limits import Limits

log = logging.getLogger("pgdurable.executor")

_FIELD = re.compile(r"at `\$\.?([^`]*)`")
_T = TypeVar("_T")


@dataclass(slots=True)
class Result:
    """A step's outcome as absolute column values for the flush."""

    row: Claimed
    kind: str  # next | retry | await | spawn | done | stop | hold
    version: int = 0
    step: str = ""
    state: bytes | None = None  # encoded JSON; None keeps the stored state
    delay: float = 0.0
    attempt: int = 0
    keep_awaits: bool = False
    set_concurrency: bool = False
    concurrency_key: str | None = None
    keep_rate: bool = False
    rate_limit: str | None = None
    weight: float = 1.0
    result: bytes | None = None
    error: str | None = None
    awaits: list[str] = field(default_factory=list)
    timeout: float | None = None
    input_request: bytes | None = None  # an Await that asks for input: its prompt, schema, choices
    children: list[InsertRow] = field(default_factory=list)
    consume: list[int] = field(default_factory=list)  # signal ids taken on progress
    inline: bool = False
    # The attempt, for its history row and the instance's last_traceback:
    ran: str | None = None  # the step that ran (None: not known here, a hold)
    started: float = 0.0  # when the attempt started, seconds since the epoch
    duration: float = 0.0  # how long it took, seconds on the monotonic clock
    raised: str | None = None  # repr() of what the step raised
    traceback: str | None = None  # its formatted traceback (history.TRACEBACK_LIMIT)
    history: bool = True  # its machine and queue keep history
    saga: bytes | None = None  # the instance's new saga document (JSON); None keeps it
    join_policy: str | None = None  # spawn: how it waits for its children ('fail_fast')
    logs: bytes | None = None  # the attempt's captured log lines (JSON), for its history row
    #: The outcome its history row names when it is not ``kind``: ``compensate`` (the step
    #: failed and the instance compensates), ``compensated`` (the last compensation ran).
    label: str | None = None

    @property
    def terminal(self) -> bool:
        return self.kind in ("done", "stop")


class StepRunner(Protocol):
    """One step process, acquired for one step (``runtime.isolation``)."""

    def run(self, row: Claimed, step: str) -> Awaitable[Result]:
        """Run the row's sync step there: its validated result, or what the step raised
        (``StepProcessDied`` when the process died). Cancelling the awaitable kills the
        process; it completes once the process is gone."""
        ...


class StepTransaction(Protocol):
    """The open transaction a transactional step runs in (``engine.transactional``)."""

    def connection(self, is_async: bool) -> Any:
        """``ctx.conn`` for the step: async for an async step, sync for a sync one."""
        ...

    def verify(self, exc: BaseException | None) -> BaseException | None:
        """After the step (``exc``: what it raised, if anything): the error to route to
        ``handle()`` — a clearer one when the step ended the transaction itself — or None."""
        ...

    def lost(self, exc: BaseException) -> bool:
        """Whether the step failed for no fault of its own: its transaction lost a race
        (serialization failure, deadlock) or its connection."""
        ...

    def interrupt(self) -> None:
        """Cancel the statement the step's thread runs (its deadline passed)."""
        ...


#: SQLSTATEs of a transaction that lost a race: serialization failure, deadlock.
CONFLICTS = ("40001", "40P01")


def conflict(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is a serialization failure or a
    deadlock (by SQLSTATE: the executor imports no driver)."""
    seen = 0
    while exc is not None and seen < 10:
        if getattr(exc, "sqlstate", None) in CONFLICTS:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class StepProcesses(Protocol):
    """Where the sync steps of an isolated queue run."""

    async def acquire(self) -> StepRunner:
        """A step process of one's own, started if need be (not counted in the step's timeout)."""
        ...


def _state_field(err: msgspec.ValidationError) -> str | None:
    m = _FIELD.search(str(err))
    return m.group(1) if m else None


class Executor:
    """Runs steps of the machines of one registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        run_sync: Callable[..., Any] | None = None,
        logger: logging.Logger | None = None,
        limits: Limits | None = None,
        processes: StepProcesses | None = None,
        capture: CaptureSettings | None = None,
    ):
        self.registry = registry
        #: Log capture of each attempt (None: off); its handler is installed once here.
        self.capture = capture
        if capture is not None:
            install_capture(capture)
        self.limits = limits or Limits()
        self._run_sync = run_sync or asyncio.to_thread
        self._log = logger or log
        self._processes = processes
        #: Told of each overdue step (its thread or process still runs past the timeout):
        #: the future completes when it is gone. The worker's slots keep a slot taken till then.
        self.on_overdue: Callable[[asyncio.Future[Any]], None] | None = None

    async def run(self, row: Claimed, tx: StepTransaction | None = None) -> Result:
        """Run the row's step; the result says when the attempt started and how long it took.

        ``tx``: the transaction of a transactional step (``engine.transactional``), whose
        connection the step receives; the step then runs in this process, never a step
        process, and a serialization failure or deadlock is retried without counting."""
        started, clock = time.time(), time.monotonic()
        cap, mark = begin_capture(self.capture)
        try:
            result = await self._run(row, tx)
        finally:
            end_capture(mark)
        result.started, result.duration = started, time.monotonic() - clock
        if cap is not None:
            result.logs = cap.document()
        return result

    async def _run(self, row: Claimed, tx: StepTransaction | None = None) -> Result:
        found = self.registry.get(row.fsm, row.version)
        if found is None:
            known = self.registry.versions(row.fsm)
            what = (
                f"unknown machine {row.fsm!r}"
                if not known
                else f"machine {row.fsm!r} has no version {row.version} here (known: {known})"
            )
            return self._hold(row, row.step, f"held: {what}; kept until a worker that knows it runs")
        cls, machine = found
        info = cls.__pgdurable__
        step_name = row.step or info.initial
        sdef = cls.__pgdurable_steps__.get(step_name)
        if sdef is None:
            return self._hold(
                row,
                step_name,
                f"held: machine {info.name!r} version {info.version} has no step "
                f"{step_name!r} (steps: {list(info.steps)})",
            )
        if row.unreadable is not None:  # its inbox or children did not decode: it cannot run
            return self._unreadable(row, info, step_name, row.unreadable)
        if row.join_policy == "fail_fast" and any(c.status not in TERMINAL for c in row.children):
            # A child failed and woke it; the claim cancelled the live siblings, and some
            # have yet to end (their step was running): wait for them, then run the step.
            return Result(row, "rejoin", version=info.version, step=step_name, ran=step_name)
        try:
            state = decode_state(info, row.state)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            field_name = _state_field(exc) if isinstance(exc, msgspec.ValidationError) else None
            err = StateDecodeError(info.name, field_name, str(exc))
            return self._unreadable(row, info, step_name, str(err))
        except RecursionError:
            limit = f"values are limited to {values.MAX_DEPTH} levels"
            err = StateDecodeError(info.name, None, f"nested deeper than this worker can decode ({limit})")
            return self._unreadable(row, info, step_name, str(err))
        ctx = _context(row, info, step_name, state)
        if tx is not None:
            ctx.conn = tx.connection(sdef.is_async)
        saga = sagas.read(row.saga)
        if saga is not None and sagas.due(saga, step_name):
            return await self._compensate(machine, cls.compensation_attempts, row, info, sdef, ctx, saga, tx)
        taken = [s.id for s in ctx.awaited]
        try:
            if row.awaits:
                ctx.input = received_input(row, sdef)
            if sdef.is_async:
                outcome = await self._call_async(machine, sdef, ctx)
            elif tx is not None:  # it holds the transaction: in a thread here, never a step process
                outcome = await self._bounded_tx(sdef, self._run_sync(sdef.fn, machine, ctx), tx)
            elif self._processes is not None:
                runner = await self._processes.acquire()
                result = await self._bounded(row, sdef, runner.run(row, step_name), kill=True)
                result.row = row  # the very claim (token, depth) this worker holds
                return sagas.after(row, info, sdef, saga, result, self._log)
            else:
                outcome = await self._bounded(row, sdef, self._run_sync(sdef.fn, machine, ctx), kill=False)
            if tx is not None and (misuse := tx.verify(None)) is not None:
                raise misuse
            result = self._finish(row, info, step_name, outcome, taken)
        except Exception as exc:  # noqa: BLE001 - every step error is routed to handle()
            error: BaseException = exc
            if tx is not None:
                error = tx.verify(exc) or exc  # a clearer error when it ended the transaction
                if tx.lost(error) and not sdef.count_conflicts:
                    return self.conflicted(machine, row, info, step_name, error)
            result = self._handle(machine, row, info, step_name, ctx, error, taken)
        return sagas.after(row, info, sdef, saga, result, self._log)

    def conflicted(
        self, machine: FSM, row: Claimed, info: MachineInfo, step_name: str, exc: BaseException
    ) -> Result:
        """A transactional step that lost a race (serialization failure, deadlock) or its
        connection: retried with the machine's backoff, its attempt not counted
        (docs/transactions.md)."""
        delay = machine.backoff(row.attempt)
        self._log.warning(
            "step %r of instance %d lost a race or its connection (%s); its transaction rolled back, "
            "retrying in %.3g s",
            step_name,
            row.id,
            type(exc).__name__,
            delay,
            extra={"event": "step_conflict", **_fields(row, info.name, step_name)},
        )
        retry = Result(
            row,
            "retry",
            version=info.version,
            step=step_name,
            delay=delay,
            attempt=row.attempt,
            keep_awaits=True,
            keep_rate=True,
            error=repr(exc),
            ran=step_name,
        )
        return _raised(retry, exc)

    def failed_at_commit(self, row: Claimed, exc: BaseException, *, lost: bool = False) -> Result:
        """A transactional step whose commit failed after the step returned (a deferred
        constraint, a value PostgreSQL refused, a conflict at commit): nothing of it
        committed; the error goes to ``handle()`` as the step's. A conflict, or a lost
        connection (``lost``), is retried without counting."""
        found = self.registry.get(row.fsm, row.version)
        if found is None:  # it ran, so it is known; kept for the type check
            return self._hold(row, row.step, f"held: unknown machine {row.fsm!r}")
        cls, machine = found
        info = cls.__pgdurable__
        step_name = row.step or info.initial
        sdef = cls.__pgdurable_steps__[step_name]
        if (lost or conflict(exc)) and not sdef.count_conflicts:
            return self.conflicted(machine, row, info, step_name, exc)
        try:
            state = decode_state(info, row.state)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as decode_exc:
            return self._unreadable(row, info, step_name, str(decode_exc))
        ctx = _context(row, info, step_name, state)
        return self._handle(machine, row, info, step_name, ctx, exc, [s.id for s in ctx.awaited])

    async def _bounded_tx(self, sdef: StepDef, work: Awaitable[_T], tx: StepTransaction) -> _T:
        """Await a transactional sync step's thread. Its deadline cancels the statement it
        runs, and the thread is waited for: it holds the connection, which no one else may
        touch (roll back, reuse) until it returns."""
        fut = asyncio.ensure_future(work)
        if sdef.timeout is None:
            return await fut
        try:
            async with asyncio.timeout(sdef.timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            if fut.done():
                return fut.result()
            tx.interrupt()
            with contextlib.suppress(Exception):
                await fut  # what it returns is late, and discarded
            raise StepTimeout(sdef.name, sdef.timeout) from None
        except asyncio.CancelledError:
            tx.interrupt()  # the drain: its statement ends; its rollback waits for the thread
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)
            raise

    async def _compensate(
        self,
        machine: FSM,
        attempts: int,
        row: Claimed,
        info: MachineInfo,
        sdef: StepDef,
        ctx: Context,
        saga: dict[str, Any],
        tx: StepTransaction | None = None,
    ) -> Result:
        """Run the compensation due (the last of the saga's stack): returned, it is popped and
        the next one is due, or the instance ends; raised, it is retried with the machine's
        backoff until ``compensation_attempts`` runs, then given up (counted) and popped."""
        ctx.compensating = saga.get("error")
        try:
            # In the worker, also on an isolated queue: its thread (or its loop) runs it.
            if sdef.is_async:
                await self._call_async(machine, sdef, ctx)
            elif tx is not None:
                await self._bounded_tx(sdef, self._run_sync(sdef.fn, machine, ctx), tx)
            else:
                await self._bounded(row, sdef, self._run_sync(sdef.fn, machine, ctx), kill=False)
            if tx is not None and (misuse := tx.verify(None)) is not None:
                raise misuse
            return sagas.popped(row, info, sdef.name, saga, gave_up=False)
        except Exception as exc:  # noqa: BLE001 - a compensation's error is retried, then counted
            where = {
                **_fields(row, info.name, sdef.name),
                "error_type": type(exc).__name__,
                "error": str(exc),
            }
            if row.attempt + 1 < attempts:
                delay = machine.backoff(row.attempt)
                self._log.warning(
                    "compensation %r of instance %d raised %s: %s; retrying in %.3g s (attempt %d)",
                    sdef.name,
                    row.id,
                    type(exc).__name__,
                    exc,
                    delay,
                    row.attempt + 1,
                    exc_info=exc,
                    extra={"event": "compensation_error", **where},
                )
                retry = Result(
                    row,
                    "retry",
                    version=info.version,
                    step=sdef.name,
                    delay=delay,
                    attempt=row.attempt + 1,
                    keep_awaits=True,
                    keep_rate=True,
                    error=repr(exc),
                    ran=sdef.name,
                )
                return _raised(retry, exc)
            self._log.error(
                "compensation %r of instance %d raised %s: %s; gave up after %d attempts, "
                "the next compensation runs",
                sdef.name,
                row.id,
                type(exc).__name__,
                exc,
                row.attempt + 1,
                exc_info=exc,
                extra={"event": "compensation_failed", **where},
            )
            return _raised(sagas.popped(row, info, sdef.name, saga, gave_up=True), exc)

    def run_here(self, row: Claimed, step_name: str) -> Result:
        """Run the row's sync step in this thread and validate its outcome (a step process
        does this). Raises what the step raised, or ``InvalidOutcome``; ``handle()`` is left
        to the caller."""
        found = self.registry.get(row.fsm, row.version)
        if found is None:
            raise InvalidOutcome(f"machine {row.fsm!r} version {row.version} is unknown to the step process")
        cls, machine = found
        info = cls.__pgdurable__
        try:
            state = decode_state(info, row.state)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise StateDecodeError(info.name, None, str(exc)) from exc
        ctx = _context(row, info, step_name, state)
        sdef = cls.__pgdurable_steps__[step_name]
        if row.awaits:
            ctx.input = received_input(row, sdef)
        outcome = sdef.fn(machine, ctx)
        return self._finish(row, info, step_name, outcome, [s.id for s in ctx.awaited])

    async def _call_async(self, machine: FSM, sdef: StepDef, ctx: Context) -> Any:
        """An async step, cancelled at its deadline."""
        if sdef.timeout is None:
            return await sdef.fn(machine, ctx)
        async with asyncio.timeout(sdef.timeout) as deadline:
            try:
                value = await sdef.fn(machine, ctx)
            except TimeoutError:
                if deadline.expired():  # ours, not a TimeoutError raised by the step itself
                    raise StepTimeout(sdef.name, sdef.timeout) from None
                raise
            except asyncio.CancelledError:
                if deadline.expired():
                    raise StepTimeout(sdef.name, sdef.timeout) from None
                raise  # the worker's drain cancelled it
        if deadline.expired():  # it swallowed the cancellation: what it returned is late
            raise StepTimeout(sdef.name, sdef.timeout)
        return value

    async def _bounded(self, row: Claimed, sdef: StepDef, work: Awaitable[_T], *, kill: bool) -> _T:
        """Await a sync step's thread (``kill=False``) or step process (``kill=True``) until
        its deadline. Past it: ``StepTimeout``; the work is overdue (a process is killed by
        cancelling its awaitable) and ``on_overdue`` learns when it is gone."""
        fut = asyncio.ensure_future(work)
        if sdef.timeout is None:
            return await fut
        try:
            async with asyncio.timeout(sdef.timeout):
                # Shielded: the deadline must not cancel the future of a thread that goes on.
                return await asyncio.shield(fut)
        except TimeoutError:
            if fut.done():  # the step raised TimeoutError itself (or ended as the clock ran out)
                return fut.result()
            if kill:
                fut.cancel()
            self._overdue(row, sdef, fut, killed=kill)
            raise StepTimeout(sdef.name, sdef.timeout) from None
        except asyncio.CancelledError:
            fut.cancel()  # the drain cancelled the step: a process is killed, a thread goes on
            raise

    def _overdue(self, row: Claimed, sdef: StepDef, fut: asyncio.Future[Any], *, killed: bool) -> None:
        where = {**_fields(row, row.fsm, sdef.name), "timeout": sdef.timeout}
        since = time.monotonic()
        self._log.warning(
            "step %r of instance %d ran past its timeout of %g s: %s",
            sdef.name,
            row.id,
            sdef.timeout,
            "its step process is killed"
            if killed
            else "it failed; its thread cannot be stopped and keeps its slot until it returns",
            extra={"event": "step_overdue", **where},
        )

        def gone(f: asyncio.Future[Any]) -> None:
            late = None if f.cancelled() else f.exception()  # retrieved: never "not retrieved"
            if killed:
                what = "it was killed"
            else:
                what = "its result was discarded" if late is None else f"it raised {late!r}, discarded"
            self._log.info(
                "the overdue %s of step %r of instance %d is gone after %.3g s more; %s",
                "process" if killed else "thread",
                sdef.name,
                row.id,
                time.monotonic() - since,
                what,
                extra={"event": "step_overdue_gone", **where},
            )

        fut.add_done_callback(gone)
        if self.on_overdue is not None:
            self.on_overdue(fut)

    def _handle(
        self,
        machine: FSM,
        row: Claimed,
        info: MachineInfo,
        step_name: str,
        ctx: Context,
        exc: BaseException,
        taken: list[int],
    ) -> Result:
        """The step raised (or timed out, or returned a malformed outcome): ``handle()``
        decides, and the error is logged once, with its traceback — WARNING when the machine
        goes on (a retry, another step), ERROR when the instance fails."""
        where = _fields(row, info.name, step_name)
        error = {"error_type": type(exc).__name__, "error": str(exc)}
        try:
            outcome = machine.handle(exc, ctx)
            result = self._finish(row, info, step_name, outcome, taken, error=repr(exc))
        except Exception as handle_exc:  # noqa: BLE001 - a failing handler fails the instance
            self._log.error(
                "step %r of instance %d raised %s: %s; then handle() failed: %r; the instance failed",
                step_name,
                row.id,
                type(exc).__name__,
                exc,
                handle_exc,
                exc_info=handle_exc,  # its traceback shows the step's error it was handling
                extra={"event": "handle_failed", **where, **error},
            )
            reason = f"{exc!r}; then handle() failed: {handle_exc!r}"
            return _raised(self._finish(row, info, step_name, Stop(reason), taken), handle_exc)
        failed = result.kind == "stop"
        self._log.log(
            logging.ERROR if failed else logging.WARNING,
            "step %r of instance %d raised %s: %s; %s",
            step_name,
            row.id,
            type(exc).__name__,
            exc,
            _verdict(result),
            exc_info=exc,
            extra={
                "event": "step_failed" if failed else "step_error",
                **where,
                **error,
                "outcome": result.kind,
            },
        )
        return _raised(result, exc)

    def _hold(self, row: Claimed, step_name: str | None, reason: str) -> Result:
        """A row this worker cannot run (unknown machine, version or step) is held."""
        self._log.warning(
            "instance %d %s",
            row.id,
            reason,
            extra={"event": "instance_held", **_fields(row, row.fsm, step_name)},
        )
        return Result(row, "hold", error=reason)

    def _unreadable(self, row: Claimed, info: MachineInfo, step_name: str, reason: str) -> Result:
        """A row whose state, inbox or children this worker cannot decode fails."""
        self._log.error(
            "instance %d cannot run step %r: %s; the instance failed",
            row.id,
            step_name,
            reason,
            extra={"event": "instance_unreadable", **_fields(row, info.name, step_name)},
        )
        return self._finish(row, info, step_name, Stop(reason), [])

    def _finish(
        self,
        row: Claimed,
        info: MachineInfo,
        step_name: str,
        outcome: Any,
        taken: list[int],
        error: str | None = None,
    ) -> Result:
        """Validate ``outcome``; raises InvalidOutcome (routed to handle) when malformed."""
        if not isinstance(outcome, OUTCOME_TYPES):
            raise InvalidOutcome(
                f"step {step_name!r} returned {outcome!r}; expected one of "
                "Next, Retry, Await, Spawn, Done, Stop"
            )
        return prepare(self.registry, row, info, step_name, outcome, taken, error, self.limits)


def received_input(row: Claimed, sdef: StepDef) -> Any:
    """``ctx.input``: the payload of the first awaited signal on the await's first name (the
    name an input is answered on), decoded into the step's ``input`` type when it declares
    one; None when none arrived. Raises ``InvalidInput`` (routed to ``handle()``) when the
    value does not fit the type: a plain ``signal`` is not checked against the schema."""
    name = row.awaits[0] if row.awaits else None
    got = next((s for s in row.awaited if s.name == name), None)
    if got is None:
        return None
    if sdef.input is None:
        return got.payload
    try:
        return msgspec.convert(got.payload, sdef.input, strict=True)
    except msgspec.ValidationError as exc:
        where = _state_field(exc)
        raise InvalidInput(
            f"input {name!r} does not fit {_type_name(sdef.input)}: {exc}",
            field=f"$.{where}" if where else "$",
        ) from None


def _type_name(kind: Any) -> str:
    return str(getattr(kind, "__name__", kind))


@functools.lru_cache(maxsize=256)
def _cached_schema(kind: Any) -> Any:
    return msgspec.json.schema(kind)


def json_schema(kind: Any) -> Any:
    """The JSON Schema of a msgspec type (cached per type: a park should not rebuild it)."""
    try:
        return _cached_schema(kind)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise InvalidOutcome(f"Await schema {kind!r} is not a type msgspec describes: {exc}") from exc
    try:
        return msgspec.json.schema(kind)
    except TypeError as exc:
        raise InvalidOutcome(f"Await schema {kind!r} is not a type msgspec describes: {exc}") from exc


def _input_request(registry: Registry, info: MachineInfo, outcome: Await, then: str) -> bytes | None:
    """What an ``Await`` that asks for input stores: its prompt, the JSON Schema of the
    answer's type (the Await's ``schema``, else the input type ``then`` declares) and its
    choices, each checked against that type. None for a plain await."""
    if outcome.prompt is None and outcome.schema is None and outcome.choices is None:
        return None
    found = registry.get(info.name, info.version)
    declared = found[0].__pgdurable_steps__[then].input if found is not None else None
    kind = outcome.schema if outcome.schema is not None else declared
    if outcome.schema is not None and declared is not None and outcome.schema != declared:
        raise InvalidOutcome(
            f"Await schema {_type_name(outcome.schema)} differs from the input type "
            f"{_type_name(declared)} that step {then!r} declares"
        )
    if outcome.prompt is not None and not isinstance(outcome.prompt, str):
        raise InvalidOutcome(f"Await prompt must be text, got {outcome.prompt!r}")
    choices = None
    if outcome.choices is not None:
        if isinstance(outcome.choices, str | bytes) or not isinstance(outcome.choices, Sequence):
            raise InvalidOutcome(f"Await choices must be a list of values, got {outcome.choices!r}")
        if not outcome.choices:
            raise InvalidOutcome("Await choices must not be empty: nothing could answer it")
        choices = [values.decode(_json(c, "Await choice"), "Await choice") for c in outcome.choices]
        for c in choices if kind is not None else ():
            try:
                msgspec.convert(c, kind, strict=True)
            except msgspec.ValidationError as exc:
                raise InvalidOutcome(f"Await choice {c!r} does not fit {_type_name(kind)}: {exc}") from exc
    request = {
        "prompt": outcome.prompt,
        "schema": json_schema(kind) if kind is not None else None,
        "choices": choices,
    }
    return _json(request, "Await input")


def _context(row: Claimed, info: MachineInfo, step_name: str, state: Any) -> Context:
    return Context(
        id=row.id,
        fsm=info.name,
        version=info.version,
        step=step_name,
        attempt=row.attempt,
        state=state,
        queue=row.queue,
        priority=row.priority,
        correlation_key=row.correlation_key,
        concurrency_key=row.concurrency_key,
        awaited=row.awaited,
        inbox=row.inbox,
        children=row.children,
        cancel_reason=row.cancel_reason,
    )


def _raised(result: Result, exc: BaseException) -> Result:
    """Keep what the step raised, with its traceback, for the history and last_traceback."""
    result.raised = storable(repr(exc), TRACEBACK_LIMIT)
    result.traceback = format_traceback(exc)
    return result


def _fields(row: Claimed, fsm: str, step_name: str | None) -> dict[str, Any]:
    """The context of a log line about one row."""
    return {"instance": row.id, "fsm": fsm, "step": step_name, "attempt": row.attempt}


def _verdict(result: Result) -> str:
    """What ``handle()`` made of a step's error, for the log line."""
    match result.kind:
        case "stop":
            return "the instance failed"
        case "retry":
            return f"retrying in {result.delay:.3g} s (attempt {result.attempt})"
        case _:
            return f"handle() chose {result.kind} ({result.step!r})"


def _step_name(info: MachineInfo, ref: Any, what: str) -> str:
    name = ref if isinstance(ref, str) else getattr(ref, "__name__", None)
    if not isinstance(name, str) or name not in info.steps:
        raise InvalidOutcome(
            f"{what} names unknown step {ref!r} of {info.name!r} (steps: {list(info.steps)})"
        )
    return name


def _encode(info: MachineInfo, state: Any) -> bytes | None:
    if state is KEEP:
        return None
    if info.state_type is not None and not isinstance(state, info.state_type):
        # A dict (or anything else) must fit the State type now, not fail the next step.
        try:
            state = msgspec.convert(state, info.state_type, strict=False)
        except msgspec.ValidationError as exc:
            name = getattr(info.state_type, "__name__", info.state_type)
            raise InvalidOutcome(f"state does not fit {name}: {exc}") from exc
    return _json(state, "state")


def _json(value: Any, what: str) -> bytes:
    try:
        return values.encode(value, what)
    except InvalidValue:
        raise
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise InvalidOutcome(f"{what} does not encode to JSON: {exc}") from exc


def _child(registry: Registry, spec: Any, i: int) -> InsertRow:
    from pgdurable.contract.spec import Insert, machine_info

    if not isinstance(spec, Insert):
        if machine_info(spec) is not None or isinstance(spec, str):
            spec = Insert(spec)
        else:
            raise InvalidOutcome(f"a child must be an Insert/Child or a machine, got {spec!r}")
    if isinstance(spec.fsm, str) and machine_info(spec.fsm) is None:
        found = registry.get(spec.fsm, spec.version)
        if found is not None:
            spec = msgspec.structs.replace(spec, fsm=found[0])
        elif spec.queue is None:
            raise InvalidOutcome(f"child machine {spec.fsm!r} is unknown to this worker; give its queue")
    try:
        return resolve(spec)
    except (TypeError, ValueError, msgspec.ValidationError) as exc:
        # Not the whole spec in the message: its state may be large.
        name = getattr(machine_info(spec.fsm), "name", spec.fsm)
        raise InvalidOutcome(f"bad child {i} of Spawn ({name!r}): {exc}") from exc


_ERROR_FIELD = {"stop": "Stop reason", "retry": "Retry error"}


def _check_columns(res: Result) -> None:
    """Refuse the column values PostgreSQL would refuse in the flush (``InvalidValue``).

    States, results and children were checked as they were encoded.
    """
    values.check_text(res.error, _ERROR_FIELD.get(res.kind, "error"))
    values.check_seconds(res.delay, f"{res.kind.capitalize()} delay")
    values.check_seconds(res.timeout, "Await timeout")
    values.check_positive(res.weight, "Next weight")
    for name in res.awaits:
        values.check_text(name, "Await signal name")


def prepare(
    registry: Registry,
    row: Claimed,
    info: MachineInfo,
    step_name: str,
    outcome: Outcome,
    taken: list[int],
    error: str | None = None,
    limits: Limits | None = None,
) -> Result:
    """The one validation boundary: an outcome becomes absolute column values or raises.

    Raises ``InvalidOutcome`` for a malformed outcome, including a value PostgreSQL would
    refuse in the flush or a worker could not decode back (``contract.values``): here it is
    one step's error for its ``handle()``; in the flush it would fail the whole group.
    """
    try:
        res = _columns(registry, row, info, step_name, outcome, taken, error, limits)
        _check_columns(res)
    except InvalidValue as exc:
        raise InvalidOutcome(str(exc)) from exc
    res.ran = step_name
    return res


def _columns(
    registry: Registry,
    row: Claimed,
    info: MachineInfo,
    step_name: str,
    outcome: Outcome,
    taken: list[int],
    error: str | None,
    limits: Limits | None,
) -> Result:
    match outcome:
        case Next():
            target = _step_name(info, outcome.step, "Next")
            ckey = outcome.concurrency_key
            if not isinstance(outcome.weight, int | float) or outcome.weight <= 0:
                raise InvalidOutcome(f"Next weight must be positive, got {outcome.weight!r}")
            try:
                delay = seconds(outcome.delay)
                rate = limit_key(outcome.rate_limit, "rate_limit")
                new_key = None if ckey is KEEP else limit_key(ckey, "concurrency_key")  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                raise InvalidOutcome(str(exc)) from exc
            if rate is not None:
                problem = (limits or Limits()).check_rate(rate, float(outcome.weight))
                if problem is not None:  # loud now, instead of a row that never starts
                    raise InvalidOutcome(f"Next({target!r}, rate_limit={rate!r}): {problem}")
            return Result(
                row,
                "next",
                version=info.version,
                step=target,
                state=_encode(info, outcome.state),
                delay=delay,
                set_concurrency=ckey is not KEEP,
                concurrency_key=new_key,
                rate_limit=rate,
                weight=float(outcome.weight),
                consume=taken,
                # Run-ahead only when nothing has to be admitted again: no rate limit on the
                # next step, no delay, and the same concurrency key (its slot is kept).
                inline=outcome.inline
                and rate is None
                and delay <= 0
                and (ckey is KEEP or new_key == row.concurrency_key),
            )
        case Retry():
            try:
                retry_delay = seconds(outcome.delay) if outcome.delay is not None else None
            except TypeError as exc:
                raise InvalidOutcome(str(exc)) from exc
            if retry_delay is None:
                cls_inst = registry.get(info.name, info.version)
                try:
                    retry_delay = seconds(cls_inst[1].backoff(row.attempt)) if cls_inst else 0.0
                except TypeError as exc:
                    raise InvalidOutcome(f"backoff() must return seconds: {exc}") from exc
            return Result(
                row,
                "retry",
                version=info.version,
                step=step_name,
                state=_encode(info, outcome.state),
                delay=retry_delay,
                attempt=row.attempt + 1,
                keep_awaits=True,
                keep_rate=True,
                error=str(outcome.error) if outcome.error else error,  # text, as Stop's reason
            )
        case Await():
            names = [outcome.names] if isinstance(outcome.names, str) else list(outcome.names)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise InvalidOutcome(f"Await needs one or more signal names, got {outcome.names!r}")
            try:
                timeout = seconds(outcome.timeout) if outcome.timeout is not None else None
            except TypeError as exc:
                raise InvalidOutcome(str(exc)) from exc
            if timeout is not None and timeout <= 0:
                raise InvalidOutcome(f"Await timeout must be positive, got {outcome.timeout!r}")
            then = _step_name(info, outcome.then, "Await")
            return Result(
                row,
                "await",
                version=info.version,
                step=then,
                state=_encode(info, outcome.state),
                awaits=names,
                timeout=timeout,
                input_request=_input_request(registry, info, outcome, then),
                consume=taken,  # not consumed: the park's recheck ignores these ids
            )
        case Spawn():
            children = [_child(registry, c, i) for i, c in enumerate(outcome.children)]
            return Result(
                row,
                "spawn",
                version=info.version,
                step=_step_name(info, outcome.then, "Spawn"),
                state=_encode(info, outcome.state),
                children=children,
                consume=taken,
                join_policy="fail_fast" if outcome.fail_fast else None,
            )
        case Done():
            return Result(
                row,
                "done",
                version=info.version,
                step=step_name,
                result=_json(outcome.result, "Done result"),
                attempt=row.attempt,
            )
        case Stop():
            return Result(
                row,
                "stop",
                version=info.version,
                step=step_name,
                error=str(outcome.reason),
                attempt=row.attempt,
            )
        case _:
            assert_never(outcome)
