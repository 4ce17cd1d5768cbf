"""Start a real ``python -m pgdurable supervise cfg.toml`` for the benchmark.

The supervisor runs as a subprocess with a NOTIFY_SOCKET we bind, exactly as under systemd:
``ready()`` returns once it sent READY=1 (every worker reached the database). Its workers
are its children (``/proc/<pid>/task/<pid>/children``). ``stop()`` sends SIGTERM, the
graceful drain.
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

[queues.bench]
{queue}
"""


class SupervisorFleet:
    def __init__(self, dsn: str, schema: str, queue: dict[str, int | bool | str]):
        """``queue``: the keys of ``[queues.bench]``; a key left out takes pgdurable's default."""
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pgdurable-"))
        self.config = self.dir / "bench.toml"
        self.config.write_text(
            CONFIG.format(
                dsn=dsn.replace('"', '\\"'),
                schema=schema,
                queue="\n".join(f"{key} = {json.dumps(value)}" for key, value in queue.items()),
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
