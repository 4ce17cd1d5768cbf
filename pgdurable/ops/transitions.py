"""A machine's steps and transitions as its code declares them, read from the source.

A step decides at run time what it returns, so its transitions cannot be known in general.
What can be read is what is written: every outcome a step's body constructs —
``Next(self.x)``, ``Await(..., then=self.y)``, ``Spawn(..., then=...)``, ``Retry``,
``Done``, ``Stop`` — and any other call with a ``then=`` step, in the step itself and in
the methods of the class it calls as ``self.method(...)``. An exception goes to the
machine's ``handle()``, whose outcomes are read the same way (the default one fails the
instance). A job (``@job``) is one step ``perform``: its function's return finishes it,
an exception retries it until ``max_attempts``, ``Cancel`` fails it.

A step named as ``self.x``, ``Class.x`` or a string is drawn; anything else (a variable,
an expression) cannot be resolved from the text and is listed as not drawn, with its line.
So the graph is what the code declares, not a proof of what it does. ``observe`` adds what
the instances did: how often each transition was taken, from the step history, and the
transitions taken that the code does not show.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pgdurable.contract.fsm import FSM

#: Pseudo-nodes: where an instance ends, and the machine's handle() for a step's exception.
DONE, FAILED, ERROR = "__done", "__failed", "__error"
LABELS = {DONE: "done", FAILED: "failed", ERROR: "handle() on an exception"}
OUTCOMES = ("Next", "Retry", "Await", "Spawn", "Done", "Stop")


@dataclass(frozen=True, slots=True)
class Edge:
    source: str  # a step, or ERROR
    target: str  # a step, DONE, FAILED (ERROR for a Retry from handle(): the step that raised)
    outcome: str  # Next, Retry, Await, Spawn, Done, Stop, Cancel, or the callee of a then=
    detail: str = ""  # Await: the signal names; a job: when it happens
    seen: int | None = None  # observed: attempts that took it (None: history not read)
    declared: bool = True  # False: taken by instances, not written in the code


@dataclass(frozen=True, slots=True)
class NotDrawn:
    source: str
    outcome: str
    code: str
    line: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Graph:
    machine: str
    version: int
    queue: str
    initial: str
    steps: tuple[str, ...]
    edges: tuple[Edge, ...]
    not_drawn: tuple[NotDrawn, ...] = field(default=())
    observed: bool = False  # the edges carry what the step history saw

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def transitions(cls: type[FSM]) -> Graph:
    """The graph of a machine class (an FSM subclass or a @job)."""
    info = cls.__pgdurable__
    reader = _Reader(cls)
    if "fn" in vars(cls) and hasattr(cls, "max_attempts"):  # a @job: perform() wraps fn
        step = info.initial
        attempts = getattr(cls, "max_attempts", 1)
        reader.add(Edge(step, DONE, "Done", "the function returns"))
        if attempts > 1:
            reader.add(Edge(step, step, "Retry", f"an exception, until {attempts} attempts"))
        reader.add(Edge(step, FAILED, "Stop", f"Cancel, or an exception at attempt {attempts}"))
        reader.read(step, getattr(cls, "fn"))  # noqa: B009 - set by @job, unknown to the type
    else:
        for name in info.steps:
            reader.read(name, cls.__pgdurable_steps__[name].fn)
        if cls.handle is FSM.handle:
            reader.add(Edge(ERROR, FAILED, "Stop", "the default handle()"))
        else:
            reader.read(ERROR, cls.handle)
    return Graph(
        info.name,
        info.version,
        info.queue,
        info.initial,
        info.steps,
        tuple(reader.edges),
        tuple(reader.not_drawn),
    )


#: A history outcome as the edge it took: its outcome in code, and its target (None: the
#: history row's next_step; "" the step itself).
_TAKEN = {
    "next": ("Next", None),
    "await": ("Await", None),
    "spawn": ("Spawn", None),
    "retry": ("Retry", ""),
    "done": ("Done", DONE),
    "stop": ("Stop", FAILED),
}


def observe(g: Graph, taken: list[tuple[str, str, str | None, int]]) -> Graph:
    """``g`` with how often each transition was taken: ``taken`` holds (step, history
    outcome, next step, attempts) from ``history_transitions``. A declared edge matches on
    its source, target and outcome, whether a step returned it or ``handle()`` did after the
    step raised (history names the step either way); a transition taken that no declared
    edge draws is added, marked not declared. An outcome history does not know is left out.
    """
    counts: dict[tuple[str, str, str], int] = {}
    for step, outcome, next_step, n in taken:
        if outcome not in _TAKEN:
            continue
        name, target = _TAKEN[outcome]
        to = (next_step or step) if target is None else (step if target == "" else target)
        counts[step, to, name] = counts.get((step, to, name), 0) + n
    edges: list[Edge] = []
    matched: set[tuple[str, str, str]] = set()
    for e in g.edges:
        key = (e.source, e.target, e.outcome)
        if e.source == ERROR:
            edges.append(e)
            continue
        matched.add(key)
        edges.append(replace(e, seen=counts.get(key, 0)))
    # handle()'s edges stand for every step: what a step took through it is counted there.
    for e in g.edges:
        if e.source == ERROR:
            for (src, to, name), n in counts.items():
                through = to == e.target or (e.target == ERROR and to == src)  # Retry: the step again
                if (src, to, name) not in matched and name == e.outcome and through:
                    matched.add((src, to, name))
                    edges.append(Edge(src, to, name, "through handle()", n))
    edges += [
        Edge(src, to, name, "", n, declared=False)
        for (src, to, name), n in sorted(counts.items())
        if (src, to, name) not in matched
    ]
    return replace(g, edges=tuple(edges), observed=True)


class _Reader:
    def __init__(self, cls: type[FSM]):
        self.cls = cls
        self.steps = set(cls.__pgdurable__.steps)
        self.edges: list[Edge] = []
        self.not_drawn: list[NotDrawn] = []

    def add(self, edge: Edge) -> None:
        if edge not in self.edges:
            self.edges.append(edge)

    def skip(self, source: str, outcome: str, node: ast.AST | None, reason: str, base: int = 0) -> None:
        line = getattr(node, "lineno", None)
        code = ast.unparse(node) if node is not None else ""
        entry = NotDrawn(source, outcome, code, None if line is None else base + line - 1, reason)
        if entry not in self.not_drawn:
            self.not_drawn.append(entry)

    def read(self, source: str, fn: Callable[..., Any], seen: set[str] | None = None) -> None:
        """Add the edges written in ``fn`` (and the methods it calls) as leaving ``source``."""
        seen = set() if seen is None else seen
        try:
            lines, first = inspect.getsourcelines(fn)
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError) as exc:
            self.skip(
                source, "?", None, f"source of {getattr(fn, '__qualname__', fn)!r} not available: {exc}"
            )
            return
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and _callee(node.exc) == "Cancel"
            ):
                self.add(Edge(source, FAILED, "Cancel"))
            if not isinstance(node, ast.Call):
                continue
            name = _callee(node)
            if name in OUTCOMES:
                self.outcome(source, name, node, first)
            elif (then := _keyword(node, "then")) is not None:
                self.step_ref(source, name or "then", then, node, first)
            helper = _self_method(node)
            if (
                helper
                and helper not in self.steps
                and helper not in seen
                and helper not in ("handle", "backoff")
            ):
                method = getattr(self.cls, helper, None)
                if inspect.isfunction(method):
                    seen.add(helper)
                    self.read(source, method, seen)

    def outcome(self, source: str, name: str, node: ast.Call, base: int) -> None:
        if name == "Done":
            self.add(Edge(source, DONE, "Done"))
        elif name == "Stop":
            self.add(Edge(source, FAILED, "Stop"))
        elif name == "Retry":
            self.add(Edge(source, source, "Retry", "the step that raised" if source == ERROR else ""))
        elif name == "Next":
            ref = _keyword(node, "step") or (node.args[0] if node.args else None)
            self.step_ref(source, name, ref, node, base)
        else:  # Await, Spawn: the step after the wait is `then`
            ref = _keyword(node, "then") or (node.args[1] if len(node.args) > 1 else None)
            detail = ""
            if name == "Await":
                names = _keyword(node, "names") or (node.args[0] if node.args else None)
                detail = _signal_names(names)
            self.step_ref(source, name, ref, node, base, detail)

    def step_ref(
        self, source: str, outcome: str, ref: ast.expr | None, node: ast.Call, base: int, detail: str = ""
    ) -> None:
        target = _step_name(ref, self.cls)
        if target is None:
            self.skip(source, outcome, node, "the step is not written as self.x, Class.x or a string", base)
        elif target not in self.steps:
            self.skip(
                source, outcome, node, f"{target!r} is not a step of {self.cls.__pgdurable__.name}", base
            )
        else:
            self.add(Edge(source, target, outcome, detail))


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def _self_method(node: ast.Call) -> str | None:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self":
        return f.attr
    return None


def _step_name(ref: ast.expr | None, cls: type[FSM]) -> str | None:
    if isinstance(ref, ast.Constant) and isinstance(ref.value, str):
        return ref.value
    if (
        isinstance(ref, ast.Attribute)
        and isinstance(ref.value, ast.Name)
        and ref.value.id in ("self", "cls", cls.__name__)
    ):
        return ref.attr
    return None


def _signal_names(node: ast.expr | None) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if len(names) == len(node.elts):
            return ", ".join(names)
    return "…"


# --------------------------------------------------------------------------- rendering


def _label(edge: Edge) -> str:
    if not edge.detail:
        text = edge.outcome
    elif edge.outcome == "Await":
        text = f"{edge.outcome} {edge.detail}"
    else:
        text = f"{edge.outcome} ({edge.detail})"
    if edge.seen is not None:
        text += f" ×{edge.seen}"
    if not edge.declared:
        text += " (not in code)"
    return text


def _pseudo(g: Graph) -> Iterator[str]:
    used = {e.target for e in g.edges} | {e.source for e in g.edges}
    yield from (p for p in (DONE, FAILED, ERROR) if p in used)


def _header(g: Graph) -> str:
    text = (
        f"{g.machine} version {g.version}, queue {g.queue}: transitions declared in code "
        "(the outcomes written in each step and the methods it calls)"
    )
    if g.observed:
        text += "; ×N: step attempts that took it, from the step history"
    return text


def mermaid(g: Graph) -> str:
    """A Mermaid state diagram."""
    out = ["stateDiagram-v2", f"    %% {_header(g)}"]
    out += [f'    state "{LABELS[p]}" as {p}' for p in _pseudo(g)]
    out.append(f"    [*] --> {g.initial}")
    out += [f"    {s}" for s in g.steps if not any(s in (e.source, e.target) for e in g.edges)]
    out += [f"    {e.source} --> {e.target}: {_label(e)}" for e in g.edges]
    out += [f"    {p} --> [*]" for p in _pseudo(g) if p in (DONE, FAILED)]
    out += [f"    %% not drawn: {d.code} in {d.source} (line {d.line}): {d.reason}" for d in g.not_drawn]
    return "\n".join(out)


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(g: Graph) -> str:
    """A Graphviz digraph."""
    out = [f"digraph {_q(f'{g.machine} v{g.version}')} {{", f"    // {_header(g)}", "    rankdir=LR;"]
    out.append("    node [shape=box, style=rounded];")
    out.append('    "__start" [shape=point, label=""];')
    shapes = {DONE: "doublecircle", FAILED: "doublecircle", ERROR: "note"}
    out += [f"    {_q(p)} [label={_q(LABELS[p])}, shape={shapes[p]}];" for p in _pseudo(g)]
    out += [f"    {_q(s)};" for s in g.steps]
    out.append(f'    "__start" -> {_q(g.initial)};')
    for e in g.edges:
        style = "" if e.declared else ", style=dashed"
        out.append(f"    {_q(e.source)} -> {_q(e.target)} [label={_q(_label(e))}{style}];")
    out += [f"    // not drawn: {d.code} in {d.source} (line {d.line}): {d.reason}" for d in g.not_drawn]
    out.append("}")
    return "\n".join(out)
