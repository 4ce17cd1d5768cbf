"""The first steps of a process the supervisor forked: reset what it inherited."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

_PR_SET_PDEATHSIG = 1

#: The cyclic garbage collector of a worker process: a young collection once 10,000 more
#: container objects are alive than at the last one, instead of Python's 700. A worker
#: holds a claimed row, a task, a context and a result per step in flight (hundreds, with
#: a claim of 400), nearly all freed by reference counting; at 700 the collector ran every
#: few dozen steps and took 12 % of a busy worker's samples (docs/performance.md, the
#: levers). Cyclic garbage (a step's own) waits longer for it: 10,000 keeps that wait short,
#: and measured within noise of 50,000.
GC_THRESHOLDS = (10_000, 20, 100)


def reset_after_fork(parent_pid: int, signal_mask: set[int | signal.Signals], report_fd: int | None) -> None:
    """Entered with the supervisor's signals blocked (see ``Supervisor._spawn``): restore
    default handlers, keep SIGTERM blocked (pending, not lost) until the child's event loop
    has its graceful-stop handler, and die with the supervisor."""
    signal.set_wakeup_fd(-1)  # the supervisor's wake-up pipe is not ours
    for sig in (signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group: the supervisor decides, children wait for its
    # SIGTERM so that a drain is orderly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set(signal_mask) | {signal.SIGTERM})
    _die_with_parent(parent_pid)
    if report_fd is not None:
        os.set_blocking(report_fd, False)  # reports never block the event loop


def tune_gc() -> None:
    """Collect once, freeze what survives (the modules, the registry, the configuration:
    never traversed again by a collection), and raise the collector's thresholds
    (``GC_THRESHOLDS``). Cycles are still collected, less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM us when the supervisor dies (Linux), so no child outlives
    it; the graceful drain then runs. Elsewhere, the report pipe breaking stops us."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a process's main coroutine to its end on uvloop (asyncio where uvloop has no
    ``run``); imported here, after the fork, so the supervisor never loads it."""
    import asyncio

    import uvloop

    if hasattr(uvloop, "run"):
        return int(uvloop.run(main))
    return asyncio.run(main)
