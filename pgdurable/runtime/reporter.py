"""The reporter: once a second, one JSON line to the supervisor over the report pipe, and
the process title.

The supervisor's health checks, status line and systemd watchdog come from these lines. A
report never blocks the loop: when the supervisor lags, a line is dropped; when the pipe is
gone (the supervisor died), the process stops.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import setproctitle

from pgdurable.runtime.lifecycle import Component, sleep_unless

REPORT_EVERY = 1.0


class Reporter(Component):
    name = "reporter"

    def __init__(
        self,
        fd: int | None,
        snapshot: Callable[[], dict[str, Any]],
        title: Callable[[], str],
        on_gone: Callable[[], None],
    ):
        super().__init__()
        self.fd, self.snapshot, self.title, self.on_gone = fd, snapshot, title, on_gone
        self._pending = b""  # the part of a report line not written yet

    async def run(self) -> None:
        while True:
            self.report()
            if await sleep_unless(self.closing, REPORT_EVERY):
                # A last line on the way out: the totals of a drained worker are complete.
                unfinished = bool(self._pending)
                self.report()
                if unfinished:
                    self.report()  # the first call only finished the line before
                return

    def report(self) -> None:
        """Set the process title and send one report line."""
        setproctitle.setproctitle(self.title())
        if self.fd is None:
            return
        try:
            if not self._pending:
                # A line longer than the pipe's atomic size (a worker's metrics) may be
                # written in parts: the rest goes first next time, so lines stay whole.
                msg = {"pid": os.getpid(), **self.snapshot()}
                self._pending = (json.dumps(msg) + "\n").encode()
            self._pending = self._pending[os.write(self.fd, self._pending) :]
        except BlockingIOError:
            pass  # the supervisor is behind: a report may be dropped, never block the loop
        except OSError:
            self.on_gone()  # the supervisor is gone: stop
