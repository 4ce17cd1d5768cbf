"""What both clients share to list and answer pending inputs (docs/inputs.md), without I/O:
the ``PendingInput`` type, each statement's parameters, the reading of its rows, and the
check of an answer against the input's JSON Schema and choices.

The schema is checked with ``jsonschema`` (the ``inputs`` extra), imported on the first
answer that needs it: ``import pgdurable.client`` stays light.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgdurable.contract import values
from pgdurable.contract.errors import InvalidInput, NoTarget, PgdurableError
from pgdurable.contract.spec import machine_info

__all__ = [
    "PendingInput",
    "check_answer",
    "list_params",
    "pending_of",
    "respond_params",
    "respond_result",
    "target_params",
]

_REQUIRED = re.compile(r"^'(.*)' is a required property$")


@dataclass(frozen=True, slots=True)
class PendingInput:
    """An instance waiting for input: what it asks, and how to answer it
    (``respond(instance, name, value)``)."""

    instance: int
    fsm: str
    version: int | None
    #: The step the answer wakes (``ctx.input`` holds the answer there).
    step: str
    #: The signal name to answer on.
    name: str
    prompt: str | None
    #: The JSON Schema of the answer (from the ``Await``'s type), None: any JSON value.
    schema: Any
    #: The allowed values, None: any value that fits the schema.
    choices: list[Any] | None
    #: When the await times out (its ``timeout``), None: never.
    deadline: dt.datetime | None
    queue: str
    correlation_key: str | None
    #: When the instance parked on it.
    asked_at: dt.datetime


def list_params(machine: Any, queue: str | None, after: int, limit: int) -> dict[str, Any]:
    """The parameters of ``input_pending_list``; ``machine``: a name or a machine class."""
    if machine is not None and not isinstance(machine, str):
        info = machine_info(machine)
        if info is None:
            raise TypeError(f"machine must be a name or a machine class, got {machine!r}")
        machine = info.name
    values.check_text(machine, "machine")
    values.check_text(queue, "queue")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return {"fsm": machine, "queue": queue, "after": after, "limit": limit}


def pending_of(rows: Sequence[Sequence[Any]]) -> list[PendingInput]:
    """The ``input_pending_list`` rows as ``PendingInput``s."""
    out = []
    for iid, fsm, version, step, name, prompt, schema, choices, deadline, queue, key, asked in rows:
        out.append(
            PendingInput(
                int(iid),
                fsm,
                version,
                step,
                name,
                prompt,
                None if schema is None else values.decode(schema, f"input schema of instance {iid}"),
                None if choices is None else values.decode(choices, f"input choices of instance {iid}"),
                deadline,
                queue,
                key,
                asked,
            )
        )
    return out


def target_params(target: int | str, name: str) -> dict[str, Any]:
    """The parameters of ``input_pending_get``, checked before any connection is touched."""
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise TypeError(f"respond target must be an instance id or a correlation key, got {target!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"respond needs the input's name, got {name!r}")
    values.check_text(name, "input name")
    if isinstance(target, str):
        values.check_text(target, "respond target (a correlation key)")
    return {
        "target_id": target if isinstance(target, int) else None,
        "target_key": target if isinstance(target, str) else None,
    }


def check_answer(
    target: int | str, name: str, row: Sequence[Any] | None, value: Any
) -> tuple[int, str, bytes]:
    """Check an answer against the pending input it is for (the ``input_pending_get`` row):
    the instance must await input ``name`` (else ``NoTarget``), and the value must be
    storable, fit the input's JSON Schema and be one of its choices (else ``InvalidInput``
    naming the field). Returns the instance id, the request as stored and the encoded value."""
    if row is None:
        raise NoTarget(f"no live instance {target!r} to respond to (unknown or already finished)")
    iid, status, awaited, raw = row
    if raw is None:
        raise NoTarget(f"instance {iid} does not await an input (it is {status})")
    if awaited != name:
        raise NoTarget(f"instance {iid} awaits input {awaited!r}, not {name!r}")
    encoded = values.encode(value, f"answer to input {name!r}")
    request = values.decode(raw, f"input request of instance {iid}")
    plain = values.decode(encoded, f"answer to input {name!r}")  # as the step will see it
    schema = request.get("schema")
    if schema is not None:
        _check_schema(iid, name, schema, plain)
    choices = request.get("choices")
    if choices is not None and not any(_same(plain, c) for c in choices):
        raise InvalidInput(
            f"answer to input {name!r} of instance {iid} refused: {plain!r} is not one of the "
            f"choices {choices!r}"
        )
    return int(iid), raw, encoded


def _check_schema(iid: int, name: str, schema: Any, value: Any) -> None:
    try:
        import jsonschema
    except ImportError:  # the extra is not installed: refuse rather than store unchecked
        raise PgdurableError(
            f"input {name!r} of instance {iid} has a schema, and checking an answer against it "
            "needs the jsonschema package: pip install 'pgdurable[inputs]'"
        ) from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return
    path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    missing = _REQUIRED.match(error.message) if error.validator == "required" else None
    if missing:
        path = f"{path}.{missing.group(1)}"
        detail = "missing"
    else:
        detail = error.message
    raise InvalidInput(f"answer to input {name!r} of instance {iid} refused at {path}: {detail}", field=path)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def respond_params(iid: int, name: str, request: str, encoded: bytes) -> dict[str, Any]:
    """The parameters of ``input_respond``."""
    return {"target_id": iid, "name": name, "request": request, "payload": encoded.decode()}


def respond_result(iid: int, name: str, row: Sequence[Any] | None) -> int:
    """The stored signal's id from the ``input_respond`` row; no row: the instance stopped
    waiting between the check and the delivery (``NoTarget``), nothing stored."""
    if row is None:
        raise NoTarget(
            f"instance {iid} no longer awaits input {name!r} (answered, timed out, cancelled or "
            "asked again meanwhile); nothing was stored"
        )
    return int(row[1])
