"""Run a real `pgdurable supervise` in a subprocess, with a NOTIFY_SOCKET to listen on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[database]
dsn = "{dsn}"
schema = "{schema}"

[runtime]
modules = {modules}
lease = {lease}
heartbeat = {heartbeat}
poll_ceiling = {poll_ceiling}
drain_timeout = {drain_timeout}
max_crashes = 3
{node_line}

[maintenance]
enabled = {maintenance_enabled}
interval = 1
gc_interval = {gc_interval}
retention = {retention}
queue_check_interval = {queue_check_interval}
snapshot_warning = {snapshot_warning}

[queues.rt]
processes = {processes}
concurrency = {concurrency}
prefetch = {prefetch}
batch = 20
"""


class Supervised:
    def __init__(
        self,
        tmp: Path,
        dsn: str,
        schema: str,
        name: str = "sup",
        extra: str = "",
        prefill: int = 0,
        **settings: object,
    ):
        opts = {
            "lease": 60,
            "heartbeat": 2,
            "poll_ceiling": 60,
            "drain_timeout": 10,
            "processes": 2,
            "concurrency": 4,
            "prefetch": 4,
            "maintenance_enabled": "true",
            "node_line": "",
            "modules": '["tests.runtime_machines"]',
            "gc_interval": 3600,
            "retention": 604800,
            "queue_check_interval": 60,
            "snapshot_warning": 600,
        }
        opts.update(settings)
        self.config = tmp / f"{name}.toml"
        self.config.write_text(BASE.format(dsn=dsn.replace('"', '\\"'), schema=schema, **opts) + extra)
        self.sock_path = tmp / f"{name}.notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:  # a full queue, for tests
            for _ in range(prefill):
                filler.sendto(b"X=filler", str(self.sock_path))
        self.messages: list[str] = []
        self.log = tmp / f"{name}.log"
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.sock_path),
            "PYTHONPATH": str(ROOT),
            "RUNTIME_TEST_DSN": dsn,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgdurable", "supervise", str(self.config)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )

    def wait_for(self, message: str, timeout: float = 30.0) -> None:
        if self.sock.fileno() < 0:  # closed after stop(): only what was collected counts
            assert any(message in m for m in self.messages), f"no {message!r}: {self.messages}"
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(message in m for m in self.messages):
                return
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                if self.proc.poll() is not None and not any(message in m for m in self.messages):
                    raise AssertionError(
                        f"supervisor exited {self.proc.returncode}:\n{self.log.read_text()}"
                    ) from None
        raise AssertionError(f"no {message!r} from the supervisor within {timeout}s:\n{self.log.read_text()}")

    def sent_during(self, seconds: float) -> list[str]:
        """What the supervisor sends in the next ``seconds`` (older messages discarded)."""
        self._collect()
        self.sock.settimeout(0.2)
        fresh: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                fresh.extend(self.sock.recv(4096).decode().splitlines())
        self.messages.extend(fresh)
        return fresh

    def ready(self) -> Supervised:
        self.wait_for("READY=1")
        return self

    def children(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            return []

    def workers(self) -> list[int]:
        """The worker processes (every child but the maintenance process)."""
        return [p for p in self.children() if not _is_maintenance(p)]

    def maintenance(self) -> list[int]:
        return [p for p in self.children() if _is_maintenance(p)]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def _collect(self) -> None:
        self.sock.setblocking(False)
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except (BlockingIOError, OSError):
                return

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._collect()
        if self.proc.poll() is None:
            with_group = os.getpgid(self.proc.pid)
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait(10)
        if self.sock.fileno() >= 0:
            self.sock.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # "pid (comm) state …": comm may hold spaces (a process title such as "pgdurable: work…").
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(sups, tmp_path, dsn, schema, **kw) -> Supervised:
    s = Supervised(tmp_path, dsn, schema, name=f"sup{len(sups)}", **kw)
    sups.append(s)
    return s.ready()


def _is_maintenance(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"pgdurable: maintenance")
    except OSError:
        return False
