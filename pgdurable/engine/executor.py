"""Run one step and turn what it returned into a row update.

Nothing here touches the database (but a transactional step's own connection): the result
is a ``Result`` the flusher commits, validated by ``engine.outcome.prepare``. A step error,
a malformed outcome, a state that no longer decodes and an unknown machine each end in a
well-defined result; nothing is half-committed because encoding happens before the flush.
Compensations (``engine.sagas``) and log capture (``engine.capture``) wrap each attempt.

Step timeouts (docs/timeouts.md): an async step is cancelled at its deadline; a sync step's
thread cannot be interrupted, so at the deadline the step fails with ``StepTimeout`` and the
thread becomes *overdue*: ``on_overdue`` hands its future to the slots, which keep its slot
taken until it returns (what it returns is discarded). With ``processes`` (a queue with
``isolation = "process"``) a sync step runs in a step process instead, killed when overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import msgspec

from pgdurable.contract import values
from pgdurable.contract.errors import (
    InvalidOutcome,
    StateDecodeError,
    StepTimeout,
)
from pgdurable.contract.fsm import FSM, TERMINAL, Context, Registry, StepDef, decode_state
from pgdurable.contract.outcomes import OUTCOME_TYPES, Stop
from pgdurable.contract.spec import MachineInfo
from pgdurable.engine import sagas
from pgdurable.engine.capture import CaptureSettings
from pgdurable.engine.capture import begin as begin_capture
from pgdurable.engine.capture import end as end_capture
from pgdurable.engine.capture import install as install_capture
from pgdurable.engine.claim import Claimed
from pgdurable.engine.history import TRACEBACK_LIMIT, format_traceback, storable
from pgdurable.engine.limits import Limits
from pgdurable.engine.outcome import Result, prepare, received_input, state_field

log = logging.getLogger("pgdurable.executor")

_T = TypeVar("_T")


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
            field_name = state_field(exc) if isinstance(exc, msgspec.ValidationError) else None
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
