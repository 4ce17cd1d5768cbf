"""Config loading: every error names the file and the key."""

from __future__ import annotations

import pytest

from pgdurable.contract.errors import ConfigError
from pgdurable.runtime.config import load, parse

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
        ({**Q, "maintenance": {"retention": -1}}, "maintenance.retention", "positive"),
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
