"""Machines whose steps log and raise, run by real supervisors in tests/test_logs.py."""

from __future__ import annotations

from pgdurable import FSM, Done, job, step


@job(queue="rt", max_attempts=2, backoff=lambda attempt: 0.05)
def flaky(args: dict, ctx):
    """Logs, then raises: retried once (a warning), then the instance fails (an error)."""
    ctx.log.info("charging %s", args["amount"], extra={"event": "charging", "amount": args["amount"]})
    raise ValueError(f"card declined on attempt {ctx.attempt}")


class Chatty(FSM, name="chatty", queue="rt"):
    @step(initial=True)
    def hello(self, ctx):
        ctx.log.info("hello from %s", ctx.fsm)
        return Done({})
