"""The one validation boundary: what a step returned becomes a ``Result`` — absolute column
values for the flush — or raises ``InvalidOutcome`` (routed to the machine's ``handle()``).

``prepare`` refuses what PostgreSQL would refuse in the flush (a NUL character, a delay out
of range) and what a worker could not decode back (nesting deeper than
``values.MAX_DEPTH``): one step's error for its ``handle()``, not a group commit that fails
for every row in it. An ``Await`` that asks for input is checked here too (its prompt,
schema and choices), and ``received_input`` decodes the answer for ``ctx.input``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never

import msgspec

from pgdurable.contract import values
from pgdurable.contract.errors import InvalidInput, InvalidOutcome, InvalidValue
from pgdurable.contract.fsm import Registry, StepDef
from pgdurable.contract.outcomes import KEEP, Await, Done, Next, Outcome, Retry, Spawn, Stop
from pgdurable.contract.spec import InsertRow, MachineInfo, limit_key, resolve, seconds
from pgdurable.engine.claim import Claimed
from pgdurable.engine.limits import Limits

_FIELD = re.compile(r"at `\$\.?([^`]*)`")


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


def state_field(err: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error names (None: the value as a whole)."""
    m = _FIELD.search(str(err))
    return m.group(1) if m else None


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
        where = state_field(exc)
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
