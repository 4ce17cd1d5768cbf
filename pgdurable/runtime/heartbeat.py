"""The heartbeat: one statement extends the lease of every row the process holds."""

from __future__ import annotations

from pgdurable.runtime.context import Runtime
from pgdurable.runtime.lifecycle import Component, sleep_unless
from pgdurable.runtime.slots import Slots


class Heartbeat(Component):
    """Every ``runtime.heartbeat`` seconds, extend the leases of the rows held (if any)."""

    name = "heartbeat"

    def __init__(self, rt: Runtime, slots: Slots):
        super().__init__()
        self.rt, self.slots = rt, slots

    async def run(self) -> None:
        rt = self.rt
        while not await sleep_unless(self.closing, rt.cfg.runtime.heartbeat):
            held = self.slots.held()
            if held:
                await self.beat(held)

    async def beat(self, held: list[int]) -> None:
        rt = self.rt
        try:
            async with rt.pool.connection() as conn:
                await conn.execute(
                    rt.queries["instance_lease_extend_many"],
                    {"worker": rt.worker_id, "ids": held, "lease": rt.engine.lease},
                    prepare=True,
                )
        except Exception as exc:  # noqa: BLE001 - the next beat tries again; leases are long
            rt.stats.error(f"heartbeat failed: {exc!r}")
