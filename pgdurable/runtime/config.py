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
batch = 400                    # most rows one claim takes (quick steps; slow ones take fewer)
history = true                 # a history row per step attempt (docs/history.md)
isolation = "thread"           # or "process": sync steps in killable step processes (docs/timeouts.md)

[logging]
format = "text"                # or "json": one JSON object per line, for log shippers
level = "info"                 # pgdurable supervise --log-level overrides it

[logging.levels]
"pgdurable.reaper" = "debug"   # per logger (quote names with dots)

[metrics]
listen = "127.0.0.1:9464"      # the Prometheus endpoint (off when absent; pgdurable[metrics])
database_interval = 15         # seconds the instance counts read from the database are kept

[tracing]
enabled = true                 # a span per step (pgdurable[otel]; docs/observability.md)
setup = "myapp.tracing:setup"  # called in each worker to install its tracer provider
```
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgdurable.contract.errors import ConfigError, ModuleImportError, SchemaNameError
from pgdurable.db.queries import check_schema_name
from pgdurable.engine.capture import CaptureSettings
from pgdurable.engine.limits import Gate, Limits, Rate

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Database(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    dsn: str | None = None
    schema: str = "pgdurable"
    data_dir: str = ".pgdurable/data"  # embedded PostgreSQL, relative to the config file


class RuntimeSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    modules: list[str] = []
    lease: float = 60.0
    heartbeat: float = 10.0
    poll_ceiling: float = 30.0
    drain_timeout: float = 30.0
    max_crashes: int = 3
    node_id: str | None = None  # default: derived from /etc/machine-id and the config path


class Maintenance(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = True
    interval: float = 5.0
    gc_interval: float = 60.0
    retention: float = 7 * 86400.0
    gc_batch: int = 1000
    queue_check_interval: float = 60.0  # 0: never look for unserved queues
    snapshot_warning: float = 600.0  # warn of a snapshot held longer (seconds; 0: never)


class QueueSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    processes: int = 1
    concurrency: int = 10
    prefetch: int = 10
    batch: int = 400
    history: bool = True  # false: the queue's step attempts leave no history rows
    isolation: str = "thread"  # where sync steps run: "thread" or "process" (ISOLATIONS)


#: Where a queue's sync steps run: the worker's threads, or step processes it can kill.
ISOLATIONS = ("thread", "process")

#: The log formats ``[logging] format`` takes, and the levels ``level`` and ``levels`` take.
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class LogSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[logging]``; ``runtime.logs.configure`` applies it."""

    format: str = "text"
    level: str = "info"
    levels: dict[str, str] = {}  # logger name -> level
    # Log capture of each step attempt, kept with its history row (docs/history.md).
    capture: bool = True
    capture_level: str = "info"
    capture_lines: int = 100
    capture_chars: int = 2000
    capture_print: bool = False

    def capture_settings(self) -> CaptureSettings | None:
        """What the executor captures (None: capture is off)."""
        if not self.capture:
            return None
        return CaptureSettings(
            logging.getLevelNamesMapping()[self.capture_level.upper()],
            self.capture_lines,
            self.capture_chars,
            self.capture_print,
        )


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[metrics]`` (docs/observability.md): the supervisor's Prometheus endpoint."""

    listen: str | None = None  # "HOST:PORT"; None: no endpoint, workers record nothing
    #: Seconds the per-queue instance counts (one query) are kept before a scrape reads again.
    database_interval: float = 15.0

    def address(self) -> tuple[str, int]:
        """``listen`` as (host, port); validated at load."""
        assert self.listen is not None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[tracing]`` (docs/observability.md): OpenTelemetry spans of the steps."""

    enabled: bool = False
    #: "module:function" each worker calls after the fork to install its tracer provider.
    setup: str | None = None


class DashboardUser(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[dashboard.users.NAME]``: a login of the web dashboard (docs/dashboard.md)."""

    password: str  # ${VAR} from the environment
    role: str = "read"  # "read" or "admin" (DASHBOARD_ROLES)


#: The dashboard's roles: ``read`` sees every page, ``admin`` may also act.
DASHBOARD_ROLES = ("read", "admin")


class DashboardSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[dashboard]``: ``pgdurable dashboard`` (docs/dashboard.md)."""

    listen: str = "127.0.0.1:8321"  # HOST:PORT; a port of 0 takes a free one
    secret: str | None = None  # signs session cookies (${VAR}); default: random at each start
    session_hours: float = 12.0
    users: dict[str, DashboardUser] = {}
    # Off by default: the identity a reverse proxy that authenticates users puts in a header.
    proxy_header: str | None = None
    proxy_roles: dict[str, str] = {}  # identity -> role; others get proxy_default_role
    proxy_default_role: str = "read"


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    database: Database = Database()
    runtime: RuntimeSettings = RuntimeSettings()
    maintenance: Maintenance = Maintenance()
    logging: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    queues: dict[str, QueueSettings] = {}
    path: str = ""
    limits: Limits = Limits()
    dashboard: DashboardSettings = DashboardSettings()

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()

    def dsn(self) -> str | None:
        """The DSN with ${VAR} references filled from the environment."""
        raw = self.database.dsn
        if raw is None:
            return None
        dsn = self.expand(raw, "database.dsn")
        try:
            conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"not a connection string or postgresql:// URI: {_one_line(exc)}",
                file=self.path,
                key="database.dsn",
            ) from exc
        return dsn

    def expand(self, raw: str, key: str) -> str:
        """``raw`` with ${VAR} references filled from the environment (a variable that is
        not set is a ConfigError naming ``key``)."""

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set", file=self.path, key=key)
            return value

        return _VAR.sub(sub, raw)


def _check_dashboard(cfg: Config) -> None:
    d, path = cfg.dashboard, cfg.path
    host, sep, port = d.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f'expected "HOST:PORT", got {d.listen!r}', file=path, key="dashboard.listen")
    if d.session_hours <= 0:
        raise ConfigError(
            f"expected a positive value, got {d.session_hours!r}", file=path, key="dashboard.session_hours"
        )
    roles: list[tuple[str, str]] = [(f"dashboard.users.{n}.role", u.role) for n, u in d.users.items()]
    roles += [(f"dashboard.proxy_roles.{n}", r) for n, r in d.proxy_roles.items()]
    roles.append(("dashboard.proxy_default_role", d.proxy_default_role))
    for key, role in roles:
        if role not in DASHBOARD_ROLES:
            raise ConfigError(f'expected "read" or "admin", got {role!r}', file=path, key=key)
    if d.proxy_header is not None and not re.fullmatch(r"[A-Za-z0-9-]+", d.proxy_header):
        raise ConfigError(
            f"expected an HTTP header name, got {d.proxy_header!r}", file=path, key="dashboard.proxy_header"
        )


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
        ("logging.capture_lines", cfg.logging.capture_lines, cfg.logging.capture_lines >= 1),
        ("logging.capture_chars", cfg.logging.capture_chars, cfg.logging.capture_chars >= 100),
        (
            "maintenance.queue_check_interval",
            cfg.maintenance.queue_check_interval,
            cfg.maintenance.queue_check_interval >= 0,
        ),
        (
            "maintenance.snapshot_warning",
            cfg.maintenance.snapshot_warning,
            cfg.maintenance.snapshot_warning >= 0,
        ),
    ]
    for name, q in cfg.queues.items():
        checks += [
            (f"queues.{name}.processes", q.processes, q.processes >= 1),
            (f"queues.{name}.concurrency", q.concurrency, q.concurrency >= 1),
            (f"queues.{name}.prefetch", q.prefetch, q.prefetch >= 0),
            (f"queues.{name}.batch", q.batch, q.batch >= 1),
        ]
    for name, q in cfg.queues.items():
        if q.isolation not in ISOLATIONS:
            expected = " or ".join(f'"{i}"' for i in ISOLATIONS)
            key = f"queues.{name}.isolation"
            raise ConfigError(f"expected {expected}, got {q.isolation!r}", file=cfg.path, key=key)
    for key, value, ok in checks:
        if not ok:
            expected = "a positive value" + (" below runtime.lease" if key == "runtime.heartbeat" else "")
            if key == "logging.capture_chars":
                expected = "at least 100 characters"
            raise ConfigError(f"expected {expected}, got {value!r}", file=cfg.path, key=key)
    try:
        check_schema_name(cfg.database.schema)
    except SchemaNameError as exc:
        raise ConfigError(str(exc), file=cfg.path, key="database.schema") from None


def _check_logging(raw: Any, path: str) -> None:
    """What msgspec cannot say well about ``[logging]``: the allowed values, and a dotted
    logger name left unquoted (TOML then reads ``pgdurable.reaper = …`` as a nested table)."""
    if not isinstance(raw, dict):
        return  # msgspec's "expected a table" names the key
    fmt = raw.get("format", "text")
    if isinstance(fmt, str) and fmt not in LOG_FORMATS:
        raise ConfigError(f'expected "text" or "json", got {fmt!r}', file=path, key="logging.format")
    _check_level(raw.get("level", "info"), "logging.level", path)
    _check_level(raw.get("capture_level", "info"), "logging.capture_level", path)
    levels = raw.get("levels", {})
    if not isinstance(levels, dict):
        return
    for name, level in levels.items():
        key = f'logging.levels."{name}"' if "." in name or not name.strip() else f"logging.levels.{name}"
        if not name.strip():
            raise ConfigError("a logger name must not be empty", file=path, key=key)
        if isinstance(level, dict):
            example, value = next(iter(_dotted(name, level)), (name, "debug"))
            raise ConfigError(
                f'a logger name with dots must be quoted: "{example}" = "{value}"', file=path, key=key
            )
        _check_level(level, key, path)


def _dotted(prefix: str, table: dict[str, Any]) -> list[tuple[str, Any]]:
    """What an unquoted TOML key was split into: ``a.b.c = v`` → ``("a.b.c", v)``."""
    pairs = []
    for k, v in table.items():
        pairs += _dotted(f"{prefix}.{k}", v) if isinstance(v, dict) else [(f"{prefix}.{k}", v)]
    return pairs


def _check_level(level: Any, key: str, path: str) -> None:
    if isinstance(level, str) and level.lower() not in LOG_LEVELS:
        raise ConfigError(f"expected one of {list(LOG_LEVELS)}, got {level!r}", file=path, key=key)


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


def parse_limits(
    concurrency_limits: dict[str, Any] | None = None,
    rate_limits: dict[str, Any] | None = None,
    *,
    file: str | None = None,
) -> Limits:
    """Validate the ``[concurrency_limits]`` and ``[rate_limits]`` tables.

    Also how a test builds the limits it gives ``testing.drain()``.
    """
    gates: dict[str, Gate] = {}
    for name, spec in (concurrency_limits or {}).items():
        key = f"concurrency_limits.{name}"
        _check_name(name, key, file)
        spec = _table(spec, key, file, {"limit", "shards"})
        limit = _int(spec.get("limit"), f"{key}.limit", file, required=True)
        shards = _int(spec.get("shards", 1), f"{key}.shards", file)
        gates[name] = Gate(limit, min(shards, limit))
    rates: dict[str, Rate] = {}
    for name, spec in (rate_limits or {}).items():
        key = f"rate_limits.{name}"
        _check_name(name, key, file)
        spec = _table(spec, key, file, {"allowed", "period", "burst", "shards"})
        allowed = _number(spec.get("allowed"), f"{key}.allowed", file, required=True, zero_ok=True)
        period = _period(spec.get("period"), f"{key}.period", file)
        burst = _number(spec.get("burst", max(allowed, 1.0)), f"{key}.burst", file)
        shards = _int(spec.get("shards", 1), f"{key}.shards", file)
        rates[name] = Rate(allowed, period, burst, shards)
    return Limits(gates, rates)


def _check_name(name: str, key: str, file: str | None) -> None:
    if not name or ":" in name:
        raise ConfigError("a limit name must be non-empty and contain no ':'", file=file, key=key)


def _table(spec: Any, key: str, file: str | None, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a table, got {spec!r}", file=file, key=key)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"unknown key (expected {sorted(allowed)})", file=file, key=f"{key}.{unknown[0]}")
    return spec


def _int(value: Any, key: str, file: str | None, *, required: bool = False) -> int:
    if value is None and required:
        raise ConfigError("missing", file=file, key=key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"expected a positive integer, got {value!r}", file=file, key=key)
    return value


def _number(
    value: Any, key: str, file: str | None, *, required: bool = False, zero_ok: bool = False
) -> float:
    if value is None and required:
        raise ConfigError("missing", file=file, key=key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"expected a positive number, got {value!r}", file=file, key=key)
    return float(value)


def _period(value: Any, key: str, file: str | None) -> float:
    """Seconds, from a number or a string such as "500ms", "30s", "1m", "1h", "1d"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _PERIOD.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f'expected seconds or a duration like "1m", got {value!r}', file=file, key=key)
    if seconds <= 0:
        raise ConfigError(f"expected a positive duration, got {value!r}", file=file, key=key)
    return seconds


def parse(data: dict[str, Any], path: str = "") -> Config:
    """Validate a decoded TOML document."""
    sections: dict[str, type[Any]] = {
        "database": Database,
        "runtime": RuntimeSettings,
        "maintenance": Maintenance,
        "logging": LogSettings,
        "metrics": MetricsSettings,
        "tracing": TracingSettings,
        "dashboard": DashboardSettings,
    }
    known = [*sections, "queues", "concurrency_limits", "rate_limits"]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown section (expected one of {known})", file=path, key=key)
    for key in ("concurrency_limits", "rate_limits"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError("expected a table", file=path, key=key)
    limits = parse_limits(data.get("concurrency_limits"), data.get("rate_limits"), file=path)
    _check_logging(data.get("logging", {}), path)
    users = data.get("dashboard", {}).get("users") if isinstance(data.get("dashboard"), dict) else None
    for name, user in users.items() if isinstance(users, dict) else ():
        _convert(user, DashboardUser, f"dashboard.users.{name}", path)  # the error names the login
    parts = {k: _convert(data.get(k, {}), t, k, path) for k, t in sections.items()}
    raw_queues = data.get("queues", {})
    if not isinstance(raw_queues, dict):
        raise ConfigError("expected a table of [queues.NAME] tables", file=path, key="queues")
    if not raw_queues:
        raise ConfigError("no queues configured: add a [queues.NAME] table", file=path, key="queues")
    queues = {name: _convert(q, QueueSettings, f"queues.{name}", path) for name, q in raw_queues.items()}
    cfg = Config(queues=queues, path=path, limits=limits, **parts)
    _positive(cfg)
    _check_observability(cfg)
    _check_dashboard(cfg)
    return cfg


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _check_observability(cfg: Config) -> None:
    """``[metrics]`` and ``[tracing]``: a listen address that parses, and the optional
    library each needs installed (found without importing it)."""
    m = cfg.metrics
    if m.listen is not None:
        host, sep, port = m.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f'expected "HOST:PORT" (e.g. "127.0.0.1:9464"), got {m.listen!r}',
                file=cfg.path,
                key="metrics.listen",
            )
        if not _installed("prometheus_client"):
            raise ConfigError(
                "the metrics endpoint needs prometheus_client: pip install 'pgdurable[metrics]'",
                file=cfg.path,
                key="metrics.listen",
            )
    if not (math.isfinite(m.database_interval) and m.database_interval > 0):
        raise ConfigError(
            f"expected a positive number of seconds, got {m.database_interval!r}",
            file=cfg.path,
            key="metrics.database_interval",
        )
    if cfg.tracing.enabled and not _installed("opentelemetry.sdk.trace"):
        raise ConfigError(
            "tracing needs OpenTelemetry: pip install 'pgdurable[otel]'", file=cfg.path, key="tracing.enabled"
        )


def load(path: str | Path) -> Config:
    """Read and validate a config file; a file that cannot be read or decoded is a ConfigError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except IsADirectoryError:
        raise ConfigError("the config path is a directory, not a TOML file", file=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", file=str(p)) from exc
    try:
        text = raw.decode("utf-8-sig")  # TOML is UTF-8; a byte-order mark some editors write is skipped
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
            "(TOML files must be UTF-8)",
            file=str(p),
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(p)) from None
    return parse(data, str(p))


def import_modules(cfg: Config) -> None:
    """Import ``runtime.modules``, with the config file's directory first on ``sys.path``.

    A module that is missing, or whose code raises on import, is a ModuleImportError
    naming the module, the file and the key, in one line; the module's exception is its
    ``__cause__`` (``pgdurable supervise --log-level debug`` prints its traceback).
    """
    base = str(cfg.base_dir)
    if sys.path[:1] != [base]:
        sys.path.insert(0, base)
    for name in cfg.runtime.modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            # The operator's code, not pgdurable's: any exception is reported, none hidden.
            if isinstance(exc, ModuleNotFoundError) and exc.name and (name + ".").startswith(exc.name + "."):
                message = f"cannot import module {name!r}: {_one_line(exc)}"
            else:
                message = (
                    f"module {name!r} failed to import: {type(exc).__name__}: {_one_line(exc)}{_where(exc)}"
                )
            raise ModuleImportError(message, module=name, file=cfg.path, key="runtime.modules") from exc


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or "(no message)"


def _where(exc: BaseException) -> str:
    """Where the exception was raised: its innermost frame outside the import machinery."""
    if isinstance(exc, SyntaxError):
        return ""  # its message already names the file and line
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    if not frames:
        return ""
    return f" (raised at {frames[-1].filename}:{frames[-1].lineno})"
