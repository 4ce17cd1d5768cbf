"""The supervisor's TOML configuration: loaded, validated, every error naming file and key.

```toml
[database]
dsn = "postgresql://app:${DB_PASSWORD}@db/app"   # ${VAR} from the environment; omit for embedded
schema = "pgdurable"

[runtime]
modules = ["myapp.machines"]   # imported by the supervisor; their machines are run
lease = 60                     # seconds a claim stays valid without a heartbeat
heartbeat = 10                 # seconds between lease extensions and reports
poll_ceiling = 30              # longest idle sleep without a notification
drain_timeout = 30             # graceful stop: how long in-flight steps may take
max_crashes = 3                # reclaims of one step before the instance fails

[maintenance]
enabled = true                 # this node runs reaper, await deadlines and GC
interval = 5                   # seconds between reaper / deadline sweeps
gc_interval = 60
retention = 604800             # seconds terminal rows are kept

[queues.checkout]
processes = 2                  # worker processes
concurrency = 10               # steps in flight per process
prefetch = 10                  # claimed-but-not-started rows per process
batch = 50                     # most rows one claim takes
```
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from pgdurable.contract.errors import ConfigError
from pgdurable.db.queries import check_schema_name
from pgdurable.engine.limits import Limits

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH = re.compile(r"at `\$\.?([^`]*)`")


class Database(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    dsn: str | None = None
    schema: str = "pgdurable"
    data_dir: str = ".pgdurable/data"  # embedded PostgreSQL, relative to the config file


class Runtime(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    modules: list[str] = []
    lease: float = 60.0
    heartbeat: float = 10.0
    poll_ceiling: float = 30.0
    drain_timeout: float = 30.0
    max_crashes: int = 3


class Maintenance(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = True
    interval: float = 5.0
    gc_interval: float = 60.0
    retention: float = 7 * 86400.0
    gc_batch: int = 1000


class Queue(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    processes: int = 1
    concurrency: int = 10
    prefetch: int = 10
    batch: int = 50


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    database: Database = Database()
    runtime: Runtime = Runtime()
    maintenance: Maintenance = Maintenance()
    queues: dict[str, Queue] = {}
    path: str = ""
    limits: Limits = Limits()

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()

    def dsn(self) -> str | None:
        """The DSN with ${VAR} references filled from the environment."""
        raw = self.database.dsn
        if raw is None:
            return None

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                raise ConfigError(
                    f"environment variable {m.group(1)} is not set", file=self.path, key="database.dsn"
                )
            return value

        return _VAR.sub(sub, raw)


def _positive(cfg: Config) -> None:
    checks: list[tuple[str, float, bool]] = [
        ("runtime.lease", cfg.runtime.lease, cfg.runtime.lease > 0),
        ("runtime.heartbeat", cfg.runtime.heartbeat, 0 < cfg.runtime.heartbeat < cfg.runtime.lease),
        ("runtime.poll_ceiling", cfg.runtime.poll_ceiling, cfg.runtime.poll_ceiling > 0),
        ("runtime.drain_timeout", cfg.runtime.drain_timeout, cfg.runtime.drain_timeout >= 0),
        ("runtime.max_crashes", cfg.runtime.max_crashes, cfg.runtime.max_crashes >= 1),
        ("maintenance.interval", cfg.maintenance.interval, cfg.maintenance.interval > 0),
        ("maintenance.gc_interval", cfg.maintenance.gc_interval, cfg.maintenance.gc_interval > 0),
        ("maintenance.retention", cfg.maintenance.retention, cfg.maintenance.retention >= 0),
        ("maintenance.gc_batch", cfg.maintenance.gc_batch, cfg.maintenance.gc_batch >= 1),
    ]
    for name, q in cfg.queues.items():
        checks += [
            (f"queues.{name}.processes", q.processes, q.processes >= 1),
            (f"queues.{name}.concurrency", q.concurrency, q.concurrency >= 1),
            (f"queues.{name}.prefetch", q.prefetch, q.prefetch >= 0),
            (f"queues.{name}.batch", q.batch, q.batch >= 1),
        ]
    for key, value, ok in checks:
        if not ok:
            expected = "a positive value" + (" below runtime.lease" if key == "runtime.heartbeat" else "")
            raise ConfigError(f"expected {expected}, got {value!r}", file=cfg.path, key=key)
    try:
        check_schema_name(cfg.database.schema)
    except ValueError as exc:
        raise ConfigError(str(exc), file=cfg.path, key="database.schema") from None


def _convert(value: Any, typ: type[Any], key: str, path: str) -> Any:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, where = text.partition(" - at ")
        m = _PATH.search(text)
        sub = m.group(1) if m else ""
        if message.startswith("Object contains unknown field"):
            sub = ".".join(p for p in (sub, message.split("`")[1]) if p)
            message = "unknown key"
        elif message.startswith("Expected `object`"):
            message = f"expected a table, {message[len('Expected `object`, ') :]}"
        full = ".".join(p for p in (key, sub) if p)
        raise ConfigError(message, file=path, key=full) from None


def parse(data: dict[str, Any], path: str = "") -> Config:
    """Validate a decoded TOML document."""
    sections: dict[str, type[Any]] = {"database": Database, "runtime": Runtime, "maintenance": Maintenance}
    known = [*sections, "queues", "concurrency_limits", "rate_limits"]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown section (expected one of {known})", file=path, key=key)
    for key in ("concurrency_limits", "rate_limits"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError("expected a table", file=path, key=key)
    limits = Limits.parse(data.get("concurrency_limits"), data.get("rate_limits"), file=path)
    parts = {k: _convert(data.get(k, {}), t, k, path) for k, t in sections.items()}
    raw_queues = data.get("queues", {})
    if not isinstance(raw_queues, dict):
        raise ConfigError("expected a table of [queues.NAME] tables", file=path, key="queues")
    if not raw_queues:
        raise ConfigError("no queues configured: add a [queues.NAME] table", file=path, key="queues")
    queues = {name: _convert(q, Queue, f"queues.{name}", path) for name, q in raw_queues.items()}
    cfg = Config(queues=queues, path=path, limits=limits, **parts)
    _positive(cfg)
    return cfg


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(p)) from None
    return parse(data, str(p))
