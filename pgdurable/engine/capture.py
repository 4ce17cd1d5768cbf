"""Log capture: the log lines of a step attempt — ``ctx.log``, the step's own loggers and,
when asked, its ``print`` output — kept with its history row (docs/history.md#log-capture).

The executor marks each attempt with a context variable; one handler on the root logger
appends the records emitted under that mark to the attempt's lines. A context variable
follows the step into ``asyncio.to_thread`` (a sync step's thread) and into the tasks it
starts, and two steps running at once in one worker never see each other's mark. A step
that logs nothing costs the mark alone; the lines reach the history row with the group
commit, bounded in count and size.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from traceback import format_exception
from typing import Any, TextIO

import msgspec

from pgdurable.contract.fsm import STEP_LOGGER
from pgdurable.engine.history import storable

#: The lines of the attempt running in this context (None: not in a step, or capture off).
_current: ContextVar[Capture | None] = ContextVar("pgdurable_capture", default=None)


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """``[logging] capture_*``: the lowest level kept, at most ``lines`` lines of at most
    ``chars`` characters per attempt, and whether ``print`` output is kept too."""

    level: int = logging.INFO
    lines: int = 100
    chars: int = 2000
    prints: bool = False


class Line(msgspec.Struct, array_like=False, omit_defaults=True):
    """One captured line, as the history row stores it."""

    at: float  # seconds since the epoch
    level: str  # DEBUG … CRITICAL, or PRINT
    logger: str
    message: str


class Capture:
    """The lines of one attempt."""

    __slots__ = ("_partial", "dropped", "lines", "settings")

    def __init__(self, settings: CaptureSettings):
        self.settings = settings
        self.lines: list[Line] = []
        self.dropped = 0
        self._partial = ""

    def add(self, at: float, level: str, logger: str, message: str) -> None:
        if len(self.lines) >= self.settings.lines:
            self.dropped += 1
            return
        self.lines.append(Line(at, level, logger, storable(message, self.settings.chars)))

    def write(self, text: str) -> None:
        """Print output: kept a line at a time (a line not ended yet waits for its end)."""
        text = self._partial + text
        *done, self._partial = text.split("\n")
        for line in done:
            self.add(time.time(), "PRINT", "stdout", line)

    def document(self) -> bytes | None:
        """The lines as the history row's ``logs`` (JSON), None when there are none."""
        if self._partial:
            self.add(time.time(), "PRINT", "stdout", self._partial)
            self._partial = ""
        if not self.lines:
            return None
        lines = self.lines
        if self.dropped:
            more = f"[{self.dropped} more lines not kept: at most {self.settings.lines} per attempt]"
            lines = [*lines, Line(time.time(), "WARNING", "pgdurable.capture", more)]
        return _encoder.encode(lines)


_encoder = msgspec.json.Encoder()


class CaptureHandler(logging.Handler):
    """Appends each record emitted under a step's mark to that step's lines. pgdurable's own
    lines about the step (its error, its retry) are in the process log and in the history
    row's error and traceback already; only ``ctx.log`` (``pgdurable.step``) is kept."""

    def emit(self, record: logging.LogRecord) -> None:
        cap = _current.get()
        if cap is None or record.levelno < cap.settings.level:
            return
        name = record.name
        if name.startswith("pgdurable.") and name != STEP_LOGGER:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not fail the step
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += "\n" + "".join(format_exception(record.exc_info[1])).rstrip()
        cap.add(record.created, record.levelname, name, message)


class _Stdout:
    """``sys.stdout`` while print capture is on: what a step prints is written as before and
    also kept, when it is printed under a step's mark."""

    def __init__(self, real: TextIO):
        self._real = real

    def write(self, text: str) -> int:
        cap = _current.get()
        if cap is not None and cap.settings.prints:
            cap.write(text)
        return self._real.write(text)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install(settings: CaptureSettings) -> None:
    """Put the handler on the root logger (once per process) and, for print capture, the
    proxy in ``sys.stdout``. A record is kept only when its logger lets it through: the
    process's logging levels (``[logging] level``) come first."""
    root = logging.getLogger()
    if not any(isinstance(h, CaptureHandler) for h in root.handlers):
        root.addHandler(CaptureHandler())
    if settings.prints and not isinstance(sys.stdout, _Stdout):
        sys.stdout = _Stdout(sys.stdout)


def begin(settings: CaptureSettings | None) -> tuple[Capture | None, Any]:
    """Mark the running context as the attempt's: its capture and the token to ``end`` it."""
    cap = None if settings is None else Capture(settings)
    return cap, _current.set(cap)


def end(token: Any) -> None:
    _current.reset(token)
