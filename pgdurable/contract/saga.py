"""``saga()``: a machine from a list of actions, each with the action that undoes it.

The common case of compensation in a few lines: the actions run in order, each one a
durable step; should one fail (after ``attempts`` runs), the undos of the actions that
completed run in reverse order, each a durable step with retries of its own, and the
instance ends ``failed`` and compensated. The machine it builds is an ordinary ``FSM``
with ``@step(compensate=...)`` steps (docs/sagas.md), registered and run like any other.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

from pgdurable.contract.errors import DefinitionError
from pgdurable.contract.fsm import FSM, Context, default_backoff, step
from pgdurable.contract.outcomes import Done, Next, Outcome, Retry, Stop

Action = Callable[..., Any]


def _call(fn: Action, state: Any, ctx: Context) -> Any:
    return fn(state, ctx) if len(inspect.signature(fn).parameters) >= 2 else fn(state)


def saga(
    name: str,
    actions: Sequence[tuple[Action, Action | None]],
    *,
    queue: str = "default",
    version: int = 1,
    attempts: int = 3,
    compensation_attempts: int = 3,
    backoff: Callable[[int], float] | None = None,
) -> type[FSM]:
    """A machine that runs ``actions`` — ``(do, undo)`` pairs of plain functions, ``undo``
    None when there is nothing to undo — in order, on a dict state.

    ``do(state[, ctx])`` returns the new state (a dict; None keeps it) and is retried
    ``attempts`` times with ``backoff`` (capped exponential by default); once one gives
    up, the ``undo(state[, ctx])`` of each action that completed runs, the last first, each
    retried ``compensation_attempts`` times. The last action's state is the result.
    Functions run in a worker thread; ``async`` ones are not accepted here (write the
    machine as a class for that).
    """
    if not actions:
        raise DefinitionError(f"saga {name!r}: it needs at least one action")
    if not isinstance(attempts, int) or attempts < 1:
        raise DefinitionError(f"saga {name!r}: attempts must be a positive integer")
    body: dict[str, Any] = {}
    names: list[tuple[str, str | None]] = []
    for i, (do, undo) in enumerate(actions):
        for fn in (do, undo):
            if fn is not None and (not callable(fn) or inspect.iscoroutinefunction(fn)):
                raise DefinitionError(f"saga {name!r}: action {i} must be a plain function, got {fn!r}")
        names.append((_name(do), None if undo is None else _name(undo)))
    taken = [n for pair in names for n in pair if n is not None]
    clash = sorted({n for n in taken if taken.count(n) > 1 or n in _RESERVED})
    if clash:
        raise DefinitionError(
            f"saga {name!r}: each function needs a name of its own, found {clash} twice or reserved"
        )
    for i, ((do, undo), (do_name, undo_name)) in enumerate(zip(actions, names, strict=True)):
        following = names[i + 1][0] if i + 1 < len(actions) else None

        def run(self: FSM, ctx: Context, do: Action = do, following: str | None = following) -> Outcome:
            new = _call(do, ctx.state, ctx)
            state = ctx.state if new is None else new
            return Done(state) if following is None else Next(following, state)

        run.__name__ = do_name
        body[do_name] = step(run, initial=i == 0, compensate=undo_name)
        if undo is not None and undo_name is not None:

            def reverse(self: FSM, ctx: Context, undo: Action = undo) -> None:
                _call(undo, ctx.state, ctx)

            reverse.__name__ = undo_name
            body[undo_name] = step(reverse)

    def handle(self: FSM, exc: BaseException, ctx: Context) -> Outcome:
        if ctx.attempt + 1 < attempts:
            return Retry(delay=self.backoff(ctx.attempt), error=repr(exc))
        return Stop(f"step {ctx.step} gave up after {ctx.attempt + 1} attempts: {exc!r}")

    def saga_backoff(self: FSM, attempt: int) -> float:
        return backoff(attempt) if backoff is not None else default_backoff(attempt)

    body.update({"handle": handle, "backoff": saga_backoff, "__module__": _caller_module()})
    kwds = {"name": name, "queue": queue, "version": version, "compensation_attempts": compensation_attempts}
    return types.new_class(name, (FSM,), kwds, lambda ns: ns.update(body))


#: Names a saga's functions cannot take: the attributes its machine class needs.
_RESERVED = frozenset(dir(FSM))


def _name(fn: Action) -> str:
    name = getattr(fn, "__name__", "")
    if not name.isidentifier() or name == "<lambda>":
        raise DefinitionError(f"saga actions must be named functions (def), got {fn!r}")
    return str(name)


def _caller_module() -> str:
    """The module that called ``saga()``: the machine is defined there (a supervisor runs
    the machines defined at the top level of its configured modules)."""
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    return str(caller.f_globals.get("__name__", __name__)) if caller is not None else __name__
