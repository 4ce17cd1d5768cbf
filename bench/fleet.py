"""Start a real ``python -m pgdurable supervise cfg.toml`` for the benchmark.

The supervisor runs as a subprocess with a NOTIFY_SOCKET we bind, exactly as under systemd:
``ready()`` returns once it sent READY=1 (every worker reached the database). Its workers
are its children (``/proc/<pid>/task/<pid>/children``). ``stop()`` sends SIGTERM, the
graceful drain. ``queue`` and ``maintenance`` add keys to the queue's and the maintenance
sections of the generated config (a variant of the defaults, as bench/scale.py measures).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import BENCH_DIR, children

CONFIG = """
[database]
dsn = "{dsn}"
schema = "{schema}"

[runtime]
modules = ["pgdurable_machines"]
poll_ceiling = 30

[maintenance]
interval = 5
{maintenance}
[queues.bench]
{queue}
{others}"""


def toml_keys(keys: dict[str, Any] | None) -> str:
    """``key = value`` lines of a TOML table (booleans, numbers and strings)."""
    lines = []
    for key, value in (keys or {}).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a TOML basic string
        lines.append(f"{key} = {text}\n")
    return "".join(lines)


class SupervisorFleet:
    def __init__(
        self,
        dsn: str,
        schema: str,
        queue: dict[str, Any],
        maintenance: dict[str, Any] | None = None,
        others: dict[str, dict[str, Any]] | None = None,
    ):
        """``queue``, ``maintenance``: keys of ``[queues.bench]`` and ``[maintenance]``; a key
        left out takes pgdurable's default (``maintenance.interval`` is 5). ``others``: more
        queues, by name, with their keys."""
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pgdurable-"))
        self.config = self.dir / "bench.toml"
        self.config.write_text(
            CONFIG.format(
                dsn=dsn.replace('"', '\\"'),
                schema=schema,
                queue=toml_keys(queue),
                maintenance=toml_keys(maintenance),
                others="".join(
                    f"\n[queues.{name}]\n{toml_keys(keys)}" for name, keys in (others or {}).items()
                ),
            )
        )
        self.sock_path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        self.log = self.dir / "supervisor.log"
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.sock_path),
            "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgdurable", "supervise", str(self.config), "--log-level", "warning"],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"supervisor exited {self.proc.returncode}: {self.log.read_text()}"
                    ) from None
        raise RuntimeError(f"no READY=1 within {timeout} s: {self.log.read_text()}")

    async def ready(self, timeout: float = 60.0) -> SupervisorFleet:
        await asyncio.to_thread(self._wait_ready, timeout)
        return self

    def pids(self) -> dict[str, list[int]]:
        if self.proc.poll() is not None:
            return {}
        return {"supervisor": [self.proc.pid], "worker": children(self.proc.pid)}

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.sock.close()
