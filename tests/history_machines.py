"""Machines whose step history tests/test_history.py reads (also run by real supervisors)."""

from __future__ import annotations

from pgdurable import FSM, Await, Child, Done, Next, Retry, Spawn, Stop, job, step


@job(queue="hist")
def leaf(args: dict) -> dict:
    return {"leaf": args["n"]}


class Tour(FSM, name="tour", queue="hist"):
    """Every outcome kind of a machine that goes on, and an error it recovers from."""

    @step(initial=True)
    def begin(self, ctx):
        return Next(self.flaky, ctx.state)

    @step
    def flaky(self, ctx):
        if ctx.attempt == 0:
            raise ValueError("flaky the first time")
        return Await("go", then=self.parked)

    @step
    def parked(self, ctx):
        return Spawn([Child(leaf, {"n": 1})], then=self.joined)

    @step
    def joined(self, ctx):
        return Done({"children": len(ctx.children)})

    def handle(self, exc, ctx):
        return Retry(delay=0)


class Twice(FSM, name="twice", queue="hist"):
    """A plain Retry, then Done."""

    @step(initial=True)
    def again(self, ctx):
        if ctx.attempt == 0:
            return Retry(delay=0, error="not yet")
        return Done("ok")


class Refuses(FSM, name="refuses", queue="hist"):
    """A Stop without an exception."""

    @step(initial=True)
    def decide(self, ctx):
        return Stop("refused on purpose")


def _deep(n: int) -> None:
    if n == 0:
        raise RuntimeError("bottom of the stack")
    _deep(n - 1)


class Crashes(FSM, name="crashes", queue="hist"):
    """Raises from deep down; the default handle() fails the instance."""

    @step(initial=True)
    def fall(self, ctx):
        _deep(ctx.state.get("depth", 3))


@job(queue="hist", max_attempts=1)
def shouts(args: dict) -> None:
    """Raises an error whose message is far longer than a stored traceback."""
    raise ValueError("x" * args["size"] + "THE END")


@job(queue="hist", max_attempts=2, backoff=lambda attempt: 3600.0)
def recovers(args: dict, ctx) -> str:
    """Fails its first attempt (retried an hour later), then succeeds."""
    if ctx.attempt == 0:
        raise ConnectionError("gateway timeout")
    return "recovered"


class Quiet(FSM, name="quiet", queue="hist", history=False):
    @step(initial=True)
    def only(self, ctx):
        return Done(1)


@job(queue="hist", history=False)
def quiet_job(args: dict) -> int:
    return 2


@job(queue="rt")
def noted(args: dict) -> dict:
    return {"n": args["n"]}


@job(queue="rt", max_attempts=1)
def noted_failure(args: dict) -> None:
    raise KeyError("missing in a worker")


@job(queue="hquiet")
def unnoted(args: dict) -> dict:
    return {"n": args["n"]}


class Mixed(FSM, name="mixed", queue="mixed"):
    """One outcome per instance, chosen by its state: a flush of the general path."""

    @step(initial=True)
    def pick(self, ctx):
        kind = ctx.state["kind"]
        if kind == "await":
            return Await("never", then=self.pick)
        if kind == "raise":
            raise ValueError(f"instance {ctx.id}")
        return Next(self.pick, {"kind": "done"}) if kind == "next" else Done(ctx.id)
