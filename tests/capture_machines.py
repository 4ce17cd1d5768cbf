"""Steps that log (tests/test_capture.py)."""

from __future__ import annotations

import asyncio
import logging

from pgdurable import FSM, Done, Next, Retry, step

mine = logging.getLogger("shop.payments")


class Chatty(FSM, name="chatty", queue="cap"):
    @step(initial=True)
    def first(self, ctx):
        ctx.log.info("charging %s", ctx.state["amount"])
        mine.warning("slow gateway")
        print("a printed line")
        print("two", "words", end="")
        print(" ended")
        if ctx.attempt == 0:
            raise ConnectionError("gateway down")
        return Next(self.second)

    @step
    def second(self, ctx):
        for i in range(ctx.state.get("lines", 0)):
            ctx.log.info("line %d", i)
        if ctx.state.get("long"):
            ctx.log.info("x" * 5000)
        return Done(None)

    def handle(self, exc, ctx):
        return Retry(delay=0)


class Pair(FSM, name="pair", queue="cap"):
    """Two instances run at once in one worker, each logging before and after a pause."""

    @step(initial=True)
    async def talk(self, ctx):
        name = ctx.state["name"]
        ctx.log.info("%s before", name)
        await asyncio.sleep(0.3)
        ctx.log.info("%s after", name)
        return Done(name)
