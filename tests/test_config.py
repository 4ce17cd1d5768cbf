"""Config loading: every error names the file and the key."""

from __future__ import annotations

import secrets
import sys

import pytest

from pgdurable.contract.errors import ConfigError, ModuleImportError
from pgdurable.runtime.config import LogSettings, import_modules, load, parse

Q = {"queues": {"q": {}}}


@pytest.mark.parametrize(
    ("data", "key", "text"),
    [
        ({"queues": {"q": {"processes": "two"}}}, "queues.q.processes", "Expected `int`"),
        ({"queues": {"q": {"procs": 1}}}, "queues.q.procs", "unknown key"),
        ({"queues": {"q": {"concurrency": 0}}}, "queues.q.concurrency", "positive"),
        ({**Q, "runtime": {"lease": 5, "heartbeat": 10}}, "runtime.heartbeat", "below runtime.lease"),
        ({**Q, "runtime": {"modules": [1]}}, "runtime.modules[0]", "Expected `str`"),
        ({**Q, "runtime": 3}, "runtime", "expected a table"),
        ({**Q, "bogus": {}}, "bogus", "unknown section"),
        ({}, "queues", "no queues"),
        ({"queues": 3}, "queues", "expected a table"),
        ({**Q, "database": {"schema": "bad;name"}}, "database.schema", "identifier"),
        ({**Q, "database": {"schema": "jobs\n"}}, "database.schema", "identifier"),
        ({**Q, "maintenance": {"retention": -1}}, "maintenance.retention", "positive"),
        ({**Q, "logging": {"format": "xml"}}, "logging.format", 'expected "text" or "json", got \'xml\''),
        ({**Q, "logging": {"format": 1}}, "logging.format", "Expected `str`"),
        ({**Q, "logging": {"level": "loud"}}, "logging.level", "expected one of ['debug', 'info'"),
        ({**Q, "logging": {"colour": True}}, "logging.colour", "unknown key"),
        (
            {**Q, "logging": {"levels": {"pgdurable.reaper": "verbose"}}},
            'logging.levels."pgdurable.reaper"',
            "got",
        ),
        (
            {**Q, "logging": {"levels": {"pgdurable": {"reaper": "debug"}}}},
            "logging.levels.pgdurable",
            "quoted",
        ),
        ({**Q, "logging": {"levels": {"": "debug"}}}, 'logging.levels.""', "must not be empty"),
        ({**Q, "logging": {"levels": ["x"]}}, "logging.levels", "expected a table"),
        ({**Q, "logging": "json"}, "logging", "expected a table"),
    ],
)
def test_errors_name_file_and_key(data, key, text):
    with pytest.raises(ConfigError) as err:
        parse(data, "/etc/pgdurable/x.toml")
    assert err.value.key == key and err.value.file == "/etc/pgdurable/x.toml"
    assert text in str(err.value) and f"key {key!r}" in str(err.value)


def test_defaults():
    cfg = parse(Q, "x.toml")
    assert cfg.database.dsn is None and cfg.database.schema == "pgdurable"
    assert (cfg.runtime.lease, cfg.runtime.heartbeat, cfg.runtime.max_crashes) == (60, 10, 3)
    assert cfg.queues["q"].processes == 1 and cfg.maintenance.enabled


def test_logging_defaults_and_values():
    assert parse(Q, "x.toml").logging == LogSettings(format="text", level="info", levels={})
    cfg = parse(
        {**Q, "logging": {"format": "json", "level": "WARNING", "levels": {"pgdurable.reaper": "debug"}}}
    )
    assert (cfg.logging.format, cfg.logging.level, cfg.logging.levels) == (
        "json",
        "WARNING",
        {"pgdurable.reaper": "debug"},
    )


def test_a_bad_log_format_names_the_file_and_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[queues.q]\n\n[logging]\nformat = "yaml"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert (err.value.file, err.value.key) == (str(path), "logging.format")
    assert str(err.value) == f"expected \"text\" or \"json\", got 'yaml' (file {path}, key 'logging.format')"
    path.write_text('[queues.q]\n\n[logging.levels]\npgdurable.reaper = "debug"\n')
    with pytest.raises(ConfigError, match='must be quoted: "pgdurable.reaper" = "debug"') as err:
        load(path)
    assert (err.value.file, err.value.key) == (str(path), "logging.levels.pgdurable")


def test_dsn_takes_secrets_from_the_environment(monkeypatch):
    cfg = parse({**Q, "database": {"dsn": "postgresql://app:${PGD_TEST_SECRET}@db/app"}}, "x.toml")
    monkeypatch.setenv("PGD_TEST_SECRET", "s3cret")
    assert cfg.dsn() == "postgresql://app:s3cret@db/app"
    monkeypatch.delenv("PGD_TEST_SECRET")
    with pytest.raises(ConfigError, match="PGD_TEST_SECRET is not set") as err:
        cfg.dsn()
    assert err.value.key == "database.dsn"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[queues.q\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load(bad)
    assert err.value.file == str(bad)
    with pytest.raises(ConfigError, match="is a directory") as err:
        load(tmp_path)
    assert err.value.file == str(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"[queues.q]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text: byte 0xe9 at line 2, column 6") as err:
        load(latin)
    assert err.value.file == str(latin)


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[queues.q]\n")
    assert list(load(path).queues) == ["q"]


def test_a_dsn_that_does_not_parse_names_the_key():
    cfg = parse({**Q, "database": {"dsn": "notadsn"}}, "x.toml")
    with pytest.raises(ConfigError, match="not a connection string") as err:
        cfg.dsn()
    assert err.value.key == "database.dsn" and "\n" not in str(err.value)


def test_import_modules_names_the_module_the_file_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"cfgmod_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text('raise KeyError("missing setting")\n')
    path = str(tmp_path / "c.toml")
    with pytest.raises(ModuleImportError) as err:
        import_modules(parse({**Q, "runtime": {"modules": [name]}}, path))
    assert str(err.value).startswith(
        f"module {name!r} failed to import: KeyError: 'missing setting' (raised at "
    )
    assert (err.value.file, err.value.key, err.value.module) == (path, "runtime.modules", name)
    assert isinstance(err.value.__cause__, KeyError) and not err.value.not_found

    with pytest.raises(ModuleImportError) as err:
        import_modules(parse({**Q, "runtime": {"modules": [f"{name}_pkg.machines"]}}, path))
    assert str(err.value) == (
        f"cannot import module '{name}_pkg.machines': No module named '{name}_pkg' "
        f"(file {path}, key 'runtime.modules')"
    )
    assert err.value.not_found


@pytest.mark.parametrize(
    ("limits", "key", "message"),
    [
        (
            {"concurrency_limits": {"a:b": {"limit": 1}}},
            "concurrency_limits.a:b",
            "a limit name must be non-empty and contain no ':'",
        ),
        ({"concurrency_limits": {"s": 3}}, "concurrency_limits.s", "expected a table, got 3"),
        (
            {"concurrency_limits": {"s": {"limit": 2, "size": 1}}},
            "concurrency_limits.s.size",
            "unknown key (expected ['limit', 'shards'])",
        ),
        ({"concurrency_limits": {"s": {}}}, "concurrency_limits.s.limit", "missing"),
        (
            {"concurrency_limits": {"s": {"limit": True}}},
            "concurrency_limits.s.limit",
            "expected a positive integer, got True",
        ),
        (
            {"concurrency_limits": {"s": {"limit": 2, "shards": 0}}},
            "concurrency_limits.s.shards",
            "expected a positive integer, got 0",
        ),
        ({"rate_limits": {"r": {"period": 1}}}, "rate_limits.r.allowed", "missing"),
        (
            {"rate_limits": {"r": {"allowed": -1, "period": 1}}},
            "rate_limits.r.allowed",
            "expected a positive number, got -1",
        ),
        (
            {"rate_limits": {"r": {"allowed": 1, "period": 1, "burst": 0}}},
            "rate_limits.r.burst",
            "expected a positive number, got 0",
        ),
        (
            {"rate_limits": {"r": {"allowed": 1, "period": "soon"}}},
            "rate_limits.r.period",
            "expected seconds or a duration like \"1m\", got 'soon'",
        ),
        (
            {"rate_limits": {"r": {"allowed": 1, "period": "0s"}}},
            "rate_limits.r.period",
            "expected a positive duration, got '0s'",
        ),
        ({"rate_limits": 3}, "rate_limits", "expected a table"),
    ],
)
def test_limit_errors_name_file_and_key(limits, key, message):
    with pytest.raises(ConfigError) as err:
        parse({**Q, **limits}, "/etc/pgdurable/x.toml")
    assert err.value.key == key and err.value.file == "/etc/pgdurable/x.toml"
    assert str(err.value) == f"{message} (file /etc/pgdurable/x.toml, key {key!r})"


def test_limits_are_parsed():
    cfg = parse(
        {
            **Q,
            "concurrency_limits": {"stripe": {"limit": 3, "shards": 5}},
            "rate_limits": {"geo": {"allowed": 6, "period": "1m"}, "api": {"allowed": 0, "period": 2.5}},
        },
        "x.toml",
    )
    assert cfg.limits.gates["stripe"].limit == 3 and cfg.limits.gates["stripe"].shards == 3
    geo, api = cfg.limits.rates["geo"], cfg.limits.rates["api"]
    assert (geo.allowed, geo.period, geo.burst, geo.shards, geo.rate) == (6.0, 60.0, 6.0, 1, 0.1)
    assert (api.allowed, api.period, api.burst) == (0.0, 2.5, 1.0)
