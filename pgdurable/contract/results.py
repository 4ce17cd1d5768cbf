"""Parallel results: a typed, ordered view of the children of a Spawn, and ``parallel()``.

``ctx.results()`` reads ``ctx.children`` (every child the instance ever spawned, as the
claim loaded them) and keeps those of the last Spawn, in the order it gave them — not the
order of their ids, which the insert chooses for its locks. docs/coordination.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast, overload

import msgspec

from pgdurable.contract.errors import ChildrenFailed
from pgdurable.contract.fsm import ChildInfo, latest_spawn
from pgdurable.contract.outcomes import KEEP, Spawn, StepRef
from pgdurable.contract.spec import Insert

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChildResult(Generic[T]):
    """One child of the last Spawn: ``value`` is its result when it finished ``done``
    (converted to the requested type), None otherwise; ``error`` why it did not."""

    id: int
    fsm: str
    #: Its position in the Spawn (a child whose correlation key was taken was not created:
    #: its position is missing from the results).
    index: int | None
    status: str
    value: T | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == "done"


class Results(Sequence[ChildResult[T]]):
    """The children of the last Spawn, in the order it gave them."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[ChildResult[T]]):
        self._items = tuple(items)

    @overload
    def __getitem__(self, i: int) -> ChildResult[T]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[ChildResult[T]]: ...

    def __getitem__(self, i: int | slice) -> ChildResult[T] | Sequence[ChildResult[T]]:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[ChildResult[T]]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Results({list(self._items)!r})"

    @property
    def ok(self) -> bool:
        """Every child finished ``done``."""
        return all(r.ok for r in self._items)

    @property
    def failed(self) -> list[ChildResult[T]]:
        """The children that did not finish ``done`` (failed, or cancelled — by a fail-fast
        Spawn whose sibling failed, say), in order."""
        return [r for r in self._items if not r.ok]

    def values(self) -> list[T]:
        """Every child's value, in order; raises ``ChildrenFailed`` (naming each) when one
        did not finish ``done`` — from a step, that error goes to ``handle()``."""
        bad = self.failed
        if bad:
            names = "; ".join(f"child {r.id} ({r.fsm} #{r.index}) {r.status}: {r.error}" for r in bad)
            raise ChildrenFailed(
                f"{len(bad)} of {len(self._items)} children did not finish: {names}", tuple(bad)
            )
        return [cast(T, r.value) for r in self._items]  # every one is done: its value is there


def results_of(children: list[ChildInfo], type_: Any = None) -> Results[Any]:
    """``ctx.results(type_)``: the last Spawn's children, each done one's result converted
    to ``type_`` (msgspec's rules; a result that does not fit raises ``msgspec.ValidationError``)."""
    out: list[ChildResult[Any]] = []
    for c in latest_spawn(children):
        value = c.result if c.status == "done" else None
        if value is not None and type_ is not None:
            value = msgspec.convert(value, type_, strict=False)
        out.append(ChildResult(c.id, c.fsm, c.index, c.status, value, c.error))
    return Results(out)


def parallel(children: Iterable[Any], then: StepRef, *, fail_fast: bool = False, state: Any = KEEP) -> Spawn:
    """Run ``children`` in parallel and go on to ``then`` with their results in order
    (``ctx.results()``). Each is an ``Insert``/``Child``, a machine or job (its state None),
    or a ``(machine, state)`` pair. ``fail_fast``: the first child that fails cancels the
    others (see ``Spawn``)."""
    items: list[Insert] = []
    for c in children:
        if isinstance(c, Insert):
            items.append(c)
        elif isinstance(c, tuple) and len(c) == 2:
            items.append(Insert(c[0], c[1]))
        else:
            items.append(Insert(c))
    return Spawn(items, then, state, fail_fast)
