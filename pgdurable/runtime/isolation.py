"""Step processes: the sync steps of a queue with ``isolation = "process"`` run in child
processes of the worker, so that a step past its timeout can be killed (docs/timeouts.md).

Each step process is *spawned* (a fresh interpreter: ``python -c``), never forked from the
worker: the worker runs an event loop, a thread pool and database connections, and a fork of
that is a child with locks held by threads that do not exist and sockets it must not touch.
A spawned child imports ``runtime.modules`` itself and finds a step by machine name, version
and step name in its own registry, as the worker does.

The worker and a step process talk over a socket pair, in frames (a 4-byte length, then a
msgpack ``_Msg``):

- worker → child ``hello``: the config (JSON) and the log level; child → worker ``ready``
  (or ``failed`` with the reason when ``runtime.modules`` do not import there);
- worker → child ``run``: the claimed row (JSON) and the step; child → worker ``started``,
  then ``ok`` with the validated ``Result`` (JSON: every outcome crosses, already checked
  by ``executor.prepare``) or ``raised`` with the exception (pickled; when it does not
  pickle, a ``StepProcessError`` with its type and message) and its traceback text.

A step process that dies after ``started`` charges that row a ``StepProcessDied``; one that
dies before (while idle) is replaced and the row runs in the new one: no other row pays.
A step past its deadline: its process gets SIGTERM (``finally`` blocks run), SIGKILL after
``KILL_GRACE`` seconds, and is replaced by the next ``acquire``. The worker never waits on
a step process without a bound, and it dies with the worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback
from typing import Any

import msgspec

from pgdurable.contract.errors import PgdurableError, StepProcessDied
from pgdurable.engine.claim import Claimed
from pgdurable.engine.executor import Executor
from pgdurable.engine.outcome import Result
from pgdurable.runtime.config import Config

log = logging.getLogger("pgdurable.isolation")

#: Seconds between the SIGTERM and the SIGKILL of an overdue step process.
KILL_GRACE = 5.0
#: Seconds a new step process may take to import the modules and answer ``ready``.
START_TIMEOUT = 60.0
#: How often a row is handed to a fresh process when the one it got died before starting it.
START_TRIES = 3

_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class StepProcessError(PgdurableError):
    """What a step raised in its step process, when that exception does not pickle: its type
    name and message (``error_type``, ``message``). ``handle()`` gets this instead."""

    def __init__(self, error_type: str, message: str):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (StepProcessError, (self.error_type, self.message))


class _Msg(msgspec.Struct, array_like=True):
    kind: str
    body: bytes = b""
    text: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Msg).decode


class _Hello(msgspec.Struct):
    config: Config
    queue: str
    level: str
    path: list[str]


class _Gone(Exception):
    """The step process closed its end: it died (or is dying)."""


def describe(returncode: int | None) -> str:
    """How a process ended, in words: ``signal 9``, ``exit status 3``."""
    if returncode is None:
        return "unknown exit"
    if returncode < 0:
        return f"signal {-returncode}"
    return f"exit status {returncode}"


# -- the worker's side ------------------------------------------------------------------------
class StepProcess:
    """One step process, as the worker sees it."""

    def __init__(self, pool: StepPool, proc: subprocess.Popen[bytes], sock: socket.socket):
        self.pool, self.proc, self.sock = pool, proc, sock
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._gone: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)

    async def send(self, msg: _Msg) -> None:
        assert self.writer is not None
        data = _encode(msg)
        try:
            self.writer.write(_HEADER.pack(len(data)) + data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _Gone from exc

    async def recv(self) -> _Msg:
        assert self.reader is not None
        try:
            size = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))[0]
            return _decode(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _Gone from exc

    def exited(self) -> asyncio.Future[int]:
        """Completes with the return code once the process is gone (reaped)."""
        if self._gone is None:
            self._gone = asyncio.ensure_future(asyncio.to_thread(self.proc.wait))
        return self._gone

    async def finish(self, grace: float, *, term: bool = True) -> int:
        """End the process: SIGTERM (unless ``term=False``: it is exiting already), SIGKILL
        after ``grace`` seconds; its return code."""
        if term and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        gone = self.exited()
        done, _ = await asyncio.wait([gone], timeout=grace)
        if not done:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await asyncio.shield(gone)
        self.pool.forget(self)
        return code

    async def run_row(self, row: Claimed, step: str) -> Result | None:
        """Run one step here; None when this process died before it started the step."""
        try:
            await self.send(_Msg("run", msgspec.json.encode(row), step))
            started = await self.recv()
        except _Gone:
            code = await self.finish(KILL_GRACE, term=False)
            self.pool.log.warning(
                "step process %d died while idle (%s); the row goes to a fresh one",
                self.pid,
                describe(code),
                extra={"event": "step_process_lost", "child": self.pid, "instance": row.id},
            )
            return None
        assert started.kind == "started", started.kind
        try:
            reply = await self.recv()
        except _Gone:
            code = await self.finish(KILL_GRACE, term=False)
            self.pool.log.error(
                "step process %d died during step %r of instance %d: %s",
                self.pid,
                step,
                row.id,
                describe(code),
                extra={"event": "step_process_died", "child": self.pid, "instance": row.id, "step": step},
            )
            raise StepProcessDied(step, describe(code)) from None
        self.pool.release(self)
        if reply.kind == "ok":
            return msgspec.json.decode(reply.body, type=Result)
        raise _exception(reply)


def _exception(reply: _Msg) -> BaseException:
    exc: BaseException
    if reply.kind == "raised":
        # Our own child wrote it, over a socket pair only the two processes hold.
        exc = pickle.loads(reply.body)  # noqa: S301
    else:  # "unpicklable": error type and message
        error_type, _, message = reply.body.decode().partition("\n")
        exc = StepProcessError(error_type, message)
    if reply.text:
        exc.add_note(f"in the step process:\n{reply.text.rstrip()}")
    return exc


class _Lease:
    """A step process acquired for one step (``executor.StepRunner``)."""

    def __init__(self, pool: StepPool, process: StepProcess):
        self.pool, self.process = pool, process

    async def run(self, row: Claimed, step: str) -> Result:
        for _ in range(START_TRIES):
            try:
                result = await self.process.run_row(row, step)
            except asyncio.CancelledError:
                # Overdue, or the worker's drain: the process is killed, then replaced.
                await self.process.finish(KILL_GRACE)
                raise
            if result is not None:
                return result
            self.process = await self.pool.acquire_process()
        raise StepProcessDied(step, f"{START_TRIES} step processes died before starting it")


class StepPool:
    """The step processes of one worker: at most ``concurrency``, started on first use and
    kept; one process runs one step at a time (``executor.StepProcesses``)."""

    def __init__(self, cfg: Config, queue: str, logger: logging.Logger | None = None):
        self.cfg, self.queue = cfg, queue
        self.size = cfg.queues[queue].concurrency
        self.log = logger or log
        self.idle: list[StepProcess] = []
        self.live: set[StepProcess] = set()  # started, not yet reaped (idle, busy or dying)
        self.started = 0  # processes started so far
        self._changed: asyncio.Event | None = None  # set when a process is released or gone
        self._closed = False

    async def acquire(self) -> _Lease:
        return _Lease(self, await self.acquire_process())

    async def acquire_process(self) -> StepProcess:
        """An idle live process, or a new one while fewer than ``size`` live.

        The slots never run more sync steps than ``concurrency`` (an overdue one keeps its
        slot until its process is gone), so this waits only when steps outnumber them."""
        while True:
            if self._closed:
                raise PgdurableError("the worker is stopping: no step process")
            while self.idle:
                process = self.idle.pop()
                if process.proc.poll() is None:
                    return process
                self.forget(process)  # it died while idle (reaped by poll): never used
            if len(self.live) < self.size:
                return await self._start()
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()

    def release(self, process: StepProcess) -> None:
        self.idle.append(process)
        if self._changed is not None:
            self._changed.set()

    def forget(self, process: StepProcess) -> None:
        if process.writer is not None:
            process.writer.close()
        else:
            process.sock.close()
        self.live.discard(process)
        with contextlib.suppress(ValueError):
            self.idle.remove(process)
        if self._changed is not None:
            self._changed.set()

    async def _start(self) -> StepProcess:
        parent, child = socket.socketpair()
        env = {**os.environ, "PGDURABLE_STEP_FD": str(child.fileno()), "PGDURABLE_WORKER": str(os.getpid())}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from pgdurable.runtime.isolation import main; main()"],
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            raise PgdurableError(f"cannot start a step process: {exc}") from exc
        finally:
            child.close()
        process = StepProcess(self, proc, parent)
        self.live.add(process)
        self.started += 1
        try:
            await process.connect()
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
            hello = msgspec.json.encode(_Hello(self.cfg, self.queue, level, sys.path))
            async with asyncio.timeout(START_TIMEOUT):
                await process.send(_Msg("hello", hello))
                ready = await process.recv()
        except (_Gone, TimeoutError) as exc:
            code = await process.finish(0)
            raise PgdurableError(f"a step process did not start: {describe(code)}") from exc
        except BaseException:
            await process.finish(0)
            raise
        if ready.kind != "ready":
            await process.finish(0)
            raise PgdurableError(f"a step process did not start: {ready.text}")
        self.log.debug(
            "step process %d started for queue %s",
            process.pid,
            self.queue,
            extra={"event": "step_process_started", "child": process.pid, "queue": self.queue},
        )
        return process

    async def close(self) -> None:
        """Stop every step process (an idle one exits at the end of its socket)."""
        self._closed = True
        live = list(self.live)
        if live:
            await asyncio.gather(*(p.finish(KILL_GRACE) for p in live), return_exceptions=True)


# -- the step process's side ------------------------------------------------------------------
def main() -> None:
    """The body of a step process (``python -c``): serve ``run`` requests until the socket ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the supervisor decides
    signal.signal(signal.SIGTERM, _terminated)
    worker = int(os.environ.pop("PGDURABLE_WORKER"))
    _die_with(worker)
    sock = socket.socket(fileno=int(os.environ.pop("PGDURABLE_STEP_FD")))
    stream = sock.makefile("rwb")
    hello = _read(stream)
    if hello is None:
        return
    try:
        executor = _setup(msgspec.json.decode(hello.body, type=_Hello))
    except BaseException as exc:  # noqa: BLE001 - told to the worker, which reports it
        _write(stream, _Msg("failed", text=f"{type(exc).__name__}: {exc}"))
        return
    _write(stream, _Msg("ready"))
    while (msg := _read(stream)) is not None:
        row = msgspec.json.decode(msg.body, type=Claimed)
        _write(stream, _Msg("started"))
        _write(stream, _serve(executor, row, msg.text))


def _setup(hello: _Hello) -> Executor:
    import setproctitle

    from pgdurable.contract.fsm import Registry
    from pgdurable.runtime import config as config_mod
    from pgdurable.runtime import logs

    cfg = hello.config
    setproctitle.setproctitle(f"pgdurable: step process {hello.queue}")
    sys.path[:] = hello.path
    logs.configure(cfg.logging, hello.level)
    config_mod.import_modules(cfg)
    return Executor(Registry.from_modules(cfg.runtime.modules), limits=cfg.limits)


def _serve(executor: Executor, row: Claimed, step: str) -> _Msg:
    try:
        result = executor.run_here(row, step)
    except Exception as exc:  # noqa: BLE001 - the worker routes it to handle()
        text = "".join(traceback.format_exception(exc))
        try:
            body = pickle.dumps(exc)
            pickle.loads(body)  # noqa: S301 - our own bytes: does it come back in one piece?
        except Exception:  # noqa: BLE001 - anything pickle raises: send type and message
            return _Msg("unpicklable", f"{type(exc).__qualname__}\n{exc}".encode(), text)
        return _Msg("raised", body, text)
    return _Msg("ok", msgspec.json.encode(result))


def _read(stream: Any) -> _Msg | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the worker closed its end: exit
    (size,) = _HEADER.unpack(header)
    return _decode(stream.read(size))


def _write(stream: Any, msg: _Msg) -> None:
    data = _encode(msg)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the step: its finally blocks run


def _die_with(worker: int) -> None:
    """SIGKILL when the worker dies (Linux), so that no step outlives it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker:
        os._exit(1)
