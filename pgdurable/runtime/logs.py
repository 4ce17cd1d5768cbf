"""The log output of ``pgdurable supervise``: one line per record on stdout, text or JSON.

Every module logs with the standard library (``logging.getLogger("pgdurable.…")``) and
names what happened in a stable ``event`` (``extra={"event": "reclaimed", …}``), with the
instance, machine, step and attempt where there is one. ``configure`` installs one handler
on the root logger whose formatter is structlog's ``ProcessorFormatter``: it turns each
record — pgdurable's, the application's, a library's — into an event dict (time, level,
logger, pid, event, message, the extra fields, the traceback) and renders it as
``key=value`` text or as a JSON object.

The supervisor configures logging before it forks, so the workers and the maintenance
process inherit the handler. Each record is written with one ``write(2)`` on the shared
stdout: lines of different processes never interleave in a file, nor in a pipe or the
journal up to the pipe's atomic size (4 KiB).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.dev import Column, ConsoleRenderer, KeyValueColumnFormatter, plain_traceback
from structlog.typing import EventDict, Processor, WrappedLogger

from pgdurable.runtime.config import LogSettings

#: The event of a record that names none: a line of a library (psycopg, asyncio) or of the
#: application's own loggers. pgdurable's own lines always name theirs.
FOREIGN_EVENT = "log"

#: The first keys of a JSON line, in this order; the context fields follow.
_FIRST = ("time", "level", "logger", "pid", "event", "message")


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes each record with one ``write(2)``.

    The supervisor, its workers and its maintenance process share one stdout: a record
    split over several writes could interleave with another process's. It remembers the
    settings it was configured with, so that a later ``configure`` (a reload) can undo
    per-logger levels that are gone.
    """

    def __init__(self, stream: TextIO, settings: LogSettings):
        super().__init__(stream)
        self.settings = settings

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
            super().emit(record)
            return
        try:
            data = memoryview((self.format(record) + self.terminator).encode("utf-8", "backslashreplace"))
            self.stream.flush()  # whatever was print()ed before goes first
            while data:
                data = data[os.write(fd, data) :]
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report it, never raise
            self.handleError(record)


def configure(
    settings: LogSettings, override_level: str | None = None, *, stream: TextIO | None = None
) -> LineHandler:
    """Send every log record to ``stream`` (stdout), formatted as ``settings.format`` says.

    ``override_level`` (``pgdurable supervise --log-level``) replaces ``settings.level``, the
    root logger's level; the per-logger levels of ``settings.levels`` apply either way.
    Calling it again (a reload) replaces the handler it installed before and resets the
    levels of loggers no longer named.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(old)
        for name in old.settings.levels:
            if name not in settings.levels:
                logging.getLogger(name).setLevel(logging.NOTSET)
    handler = LineHandler(stream or sys.stdout, settings)
    handler.setFormatter(formatter(settings.format))
    root.addHandler(handler)
    root.setLevel(_level(override_level or settings.level))
    for name, level in settings.levels.items():
        logging.getLogger(name).setLevel(_level(level))
    logging.captureWarnings(True)  # Python warnings become records too, not bare stderr
    return handler


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``[logging] format``: ``"text"`` or ``"json"``."""
    last: list[Processor]
    if fmt == "json":
        when: Processor = _iso_time
        last = [
            structlog.processors.format_exc_info,  # the traceback as one "exception" string
            _json_order,
            structlog.processors.JSONRenderer(),
        ]
    elif fmt == "text":
        when = _local_time
        last = [_logger_pid, _text_renderer()]
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    return structlog.stdlib.ProcessorFormatter(
        # Every record comes from the standard library: this chain makes its event dict.
        foreign_pre_chain=[
            _record_fields,
            structlog.stdlib.ExtraAdder(),  # extra={"event": …, "instance": …} of the call
            _default_event,
            when,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
    )


def _level(name: str) -> int:
    return int(logging.getLevelName(name.upper()))


# -- processors: (logger, method, event dict) -> event dict ------------------------------------
# ProcessorFormatter hands a stdlib record over as {"event": <the message>, "_record": …};
# pgdurable's "event" is the stable name from extra, so the message moves to "message" first.


def _record_fields(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    record: logging.LogRecord = ed["_record"]
    ed["message"] = ed.pop("event").rstrip("\n")  # a warning's text ends in one
    ed["level"] = record.levelname.lower()
    ed["logger"] = record.name
    ed["pid"] = record.process
    return ed


def _default_event(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    ed.setdefault("event", FOREIGN_EVENT)
    ed.pop("asctime", None)  # left on the record by another formatter (pytest's, say)
    return ed


def _iso_time(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    # The record's own time (when it was logged), in UTC.
    ed["time"] = dt.datetime.fromtimestamp(ed["_record"].created, dt.UTC).isoformat(timespec="milliseconds")
    return ed


def _local_time(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    ed["time"] = dt.datetime.fromtimestamp(ed["_record"].created).isoformat(" ", timespec="milliseconds")
    return ed


def _json_order(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    first = {k: ed.pop(k) for k in _FIRST if k in ed}
    return {**first, **ed}


def _logger_pid(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    ed["logger"] = f"{ed['logger']}[{ed.pop('pid')}]"
    return ed


def _text_value(value: object) -> str:
    """A value of ``key=value``: bare when it is one word, else quoted as JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(value, separators=(",", ":"), default=repr)  # [11,12,13]: one word
    else:
        text = str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text)


def _text_renderer() -> ConsoleRenderer:
    """``2026-01-05 10:00:00.123 INFO pgdurable.worker[4211] message event=… key=value``."""

    def plain(value_repr: Any = str, key: bool = False) -> KeyValueColumnFormatter:
        return KeyValueColumnFormatter(
            key_style="" if key else None, value_style="", reset_style="", value_repr=value_repr
        )

    return ConsoleRenderer(
        columns=[
            Column("", plain(_text_value, key=True)),  # the context fields, as they were given
            Column("time", plain()),
            Column("level", plain(lambda v: str(v).upper())),
            Column("logger", plain()),
            Column("message", plain()),
            Column("event", plain(_text_value, key=True)),
        ],
        sort_keys=False,
        exception_formatter=plain_traceback,
    )
