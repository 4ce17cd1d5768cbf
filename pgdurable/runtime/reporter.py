"""The reporter: once a second, one JSON line to the supervisor over the report pipe, and
the process title.

The supervisor's health checks, status line, systemd watchdog and metrics all come from
these lines. A report never blocks the loop: when the supervisor lags, a line is dropped;
when the pipe is gone (the supervisor died), the process stops.
"""

from __future__ import annotations

import json
import os
from typing import Any

import setproctitle

from pgdurable.runtime.context import Runtime
from pgdurable.runtime.feedconn import FeedConnection
from pgdurable.runtime.lifecycle import Component, sleep_unless
from pgdurable.runtime.slots import Slots

REPORT_EVERY = 1.0


class Reporter(Component):
    name = "reporter"

    def __init__(self, rt: Runtime, slots: Slots, feed: FeedConnection, fd: int | None):
        super().__init__()
        self.rt, self.slots, self.feed, self.fd = rt, slots, feed, fd

    async def run(self) -> None:
        while True:
            self.report()
            if await sleep_unless(self.closing, REPORT_EVERY):
                return

    def report(self, **extra: Any) -> None:
        """Send one report line (alive, load, held rows, errors, LISTEN health)."""
        rt, slots = self.rt, self.slots
        q = rt.settings
        setproctitle.setproctitle(
            f"pgdurable: worker {rt.queue} {rt.index + 1}/{q.processes} "
            f"busy {len(slots.running)}/{q.concurrency}"
        )
        if self.fd is None:
            return
        feed = self.feed
        listening = feed.listening and rt.clock() - feed.seen < 3 * rt.cfg.runtime.heartbeat + 5
        msg = {
            "pid": os.getpid(),
            "worker": rt.worker_id,
            "queue": rt.queue,
            "busy": len(slots.running),
            "buffered": len(slots.buffer),
            "held": len(slots.held()),
            "concurrency": q.concurrency,
            "steps": rt.stats.steps,
            "stale": rt.stats.stale,
            "errors": rt.stats.errors,
            "limit_errors": rt.engine.limit_errors,
            "last_error": rt.stats.last_error,
            "listening": listening,
            **extra,
        }
        self.send((json.dumps(msg) + "\n").encode())

    def send(self, data: bytes) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            pass  # the supervisor is behind: a report may be dropped, never block the loop
        except OSError:
            self.rt.stopping.set()  # the supervisor is gone: stop
