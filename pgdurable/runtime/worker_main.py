"""The first code a forked worker runs: reset what it inherited, then start the loop."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

import setproctitle

from pgdurable.contract.fsm import Registry
from pgdurable.runtime.board import RunningBoard
from pgdurable.runtime.config import Config

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM us when the supervisor dies (Linux), so no worker outlives
    it; the graceful drain then runs. Elsewhere, the report pipe breaking stops us."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(
    cfg: Config,
    dsn: str,
    queue: str,
    index: int,
    registry: Registry,
    worker_id: str,
    report_fd: int,
    parent_pid: int,
    signal_mask: set[signal.Signals],
    board: RunningBoard,
) -> int:
    # Entered with the supervisor's signals blocked (see Supervisor._spawn).
    signal.set_wakeup_fd(-1)  # the supervisor's wake-up pipe is not ours
    for sig in (signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group: the supervisor decides, workers wait for its
    # SIGTERM so that a drain is orderly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Everything but SIGTERM back to normal; SIGTERM stays blocked (pending, not lost) until
    # the event loop has its graceful-stop handler (Worker.run).
    signal.pthread_sigmask(signal.SIG_SETMASK, set(signal_mask) | {signal.SIGTERM})
    _die_with_parent(parent_pid)
    os.set_blocking(report_fd, False)  # reports never block the event loop
    q = cfg.queues[queue]
    setproctitle.setproctitle(f"pgdurable: worker {queue} {index + 1}/{q.processes}")
    logging.getLogger("pgdurable.worker").debug("worker %s starting", worker_id)

    import uvloop

    from pgdurable.runtime.worker import Worker

    worker = Worker(cfg, dsn, queue, index, registry, worker_id, report_fd, board)
    return uvloop.run(worker.run()) if hasattr(uvloop, "run") else asyncio.run(worker.run())
