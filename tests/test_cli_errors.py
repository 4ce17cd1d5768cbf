"""An operator's mistake gets one line naming what is wrong and a non-zero exit, never a traceback.

Every test runs the real ``pgdurable`` command in a subprocess.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgdurable.contract.errors import SchemaNameError
from pgdurable.db import migrations
from pgdurable.db.queries import check_schema_name


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_line(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single line an operator error prints on stderr (and nothing that looks like a crash)."""
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    assert res.returncode == code, res.stderr
    line = res.stderr.strip()
    assert line.startswith("pgdurable: ") and "\n" not in line, res.stderr
    return line


def config(tmp_path: Path, *, dsn: str, schema: str = "pgdurable", modules: str = "[]") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\ndsn = "{dsn}"\nschema = "{schema}"\n\n'
        f"[runtime]\nmodules = {modules}\n\n[queues.q]\nprocesses = 1\n"
    )
    return path


def refused_dsn(dsn: str) -> str:
    """The test database's address on a port where nothing listens (1 needs root to bind)."""
    return make_conninfo(dsn, host="127.0.0.1", port="1")


# --------------------------------------------------------------------------- 1. schema names


@pytest.mark.parametrize("name", ["jobs\n", "jobs\r\n", " jobs", "1jobs", "a" * 64, ""])
def test_check_schema_name_refuses_whatever_is_not_exactly_an_identifier(name):
    with pytest.raises(SchemaNameError, match="plain identifier"):
        check_schema_name(name)
    with pytest.raises(ValueError, match="plain identifier"):  # still a ValueError for callers
        check_schema_name(name)


def test_migrate_refuses_a_schema_name_with_a_trailing_newline(tmp_path, dsn):
    line = one_line(cli("migrate", "--dsn", dsn, "--schema", "jobs\n", cwd=tmp_path))
    assert "schema name 'jobs\\n' must be a plain identifier" in line


def test_supervise_refuses_a_schema_name_with_a_trailing_newline(tmp_path, dsn):
    path = config(tmp_path, dsn=dsn, schema="jobs\\n")  # a TOML escape: the value ends in a newline
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert "must be a plain identifier" in line
    assert f"file {path}" in line and "key 'database.schema'" in line


# --------------------------------------------------------------------------- 2. runtime.modules


def test_a_missing_module_is_named_with_the_key_and_the_file(tmp_path, dsn, schema):
    path = config(tmp_path, dsn=dsn, schema=schema, modules='["myapp.machnes"]')
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line == (
        "pgdurable: cannot import module 'myapp.machnes': No module named 'myapp' "
        f"(file {path}, key 'runtime.modules')"
    )


def test_a_missing_dependency_of_a_module_names_both(tmp_path, dsn, schema):
    (tmp_path / "needsdep.py").write_text("import nosuchdependency_xyz\n")
    path = config(tmp_path, dsn=dsn, schema=schema, modules='["needsdep"]')
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert "module 'needsdep' failed to import: ModuleNotFoundError: " in line
    assert "No module named 'nosuchdependency_xyz'" in line and "needsdep.py:1" in line
    assert f"file {path}" in line and "--log-level debug" in line


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('x = 1\nraise RuntimeError("no API key")\n', "RuntimeError: no API key (raised at "),
        ("def broken(:\n", "SyntaxError: "),
    ],
)
def test_a_module_that_raises_on_import_is_one_line_and_debug_shows_its_traceback(
    tmp_path, dsn, schema, source, expected
):
    (tmp_path / "brokenmod.py").write_text(source)
    path = config(tmp_path, dsn=dsn, schema=schema, modules='["brokenmod"]')
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line.startswith("pgdurable: module 'brokenmod' failed to import: ")
    assert expected in line and "brokenmod.py" in line
    assert f"(file {path}, key 'runtime.modules')" in line
    assert line.endswith("; --log-level debug prints its traceback")

    debug = cli("supervise", str(path), "--log-level", "debug", cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "brokenmod.py" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("pgdurable: module 'brokenmod' failed to import: ")
    assert "--log-level" not in last


# --------------------------------------------------------------------------- 3. the config file


def test_a_config_path_that_is_a_directory(tmp_path):
    line = one_line(cli("supervise", str(tmp_path), cwd=tmp_path))
    assert line == f"pgdurable: the config path is a directory, not a TOML file (file {tmp_path})"


def test_a_missing_config_file(tmp_path):
    path = tmp_path / "nope.toml"
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line == f"pgdurable: config file not found (file {path})"


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[queues.q]\n# caf\u00e9\n".encode("latin-1"))
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line == (
        f"pgdurable: not UTF-8 text: byte 0xe9 at line 2, column 6 (TOML files must be UTF-8) (file {path})"
    )


def test_a_config_file_that_is_not_toml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[queues.q]\nprocesses = = 2\n")
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line.startswith("pgdurable: not valid TOML: ")
    assert "(at line 2, column 13)" in line and line.endswith(f"(file {path})")


def test_a_dsn_in_the_config_that_does_not_parse(tmp_path):
    path = config(tmp_path, dsn="notadsn")
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert line.startswith("pgdurable: not a connection string or postgresql:// URI: ")
    assert line.endswith(f"(file {path}, key 'database.dsn')")


# --------------------------------------------------------------------------- 4. privileges


@pytest.fixture
def weak_role(dsn):
    """A login role without CREATE on the database nor USAGE on any schema; dropped after."""
    role = f"pgd_weak_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield role
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_migrate_as_a_role_without_create_says_which_privilege(tmp_path, dsn, weak_role):
    fresh = f"m_{secrets.token_hex(5)}"
    db = conninfo_to_dict(dsn)["dbname"]
    res = cli("migrate", "--dsn", make_conninfo(dsn, user=weak_role), "--schema", fresh, cwd=tmp_path)
    line = one_line(res)
    assert line == (
        f"pgdurable: role '{weak_role}' may not migrate schema '{fresh}': "
        f"permission denied for database {db}; it needs CREATE on database '{db}' to create the "
        f'schema (GRANT CREATE ON DATABASE "{db}" TO "{weak_role}"), or run migrate as a role that has it'
    )


def test_check_as_a_role_without_usage_on_the_schema(tmp_path, dsn, schema, weak_role):
    res = cli(
        "migrate", "--dsn", make_conninfo(dsn, user=weak_role), "--schema", schema, "--check", cwd=tmp_path
    )
    line = one_line(res)  # 2, not 1: the version could not be read, it is not known to be behind
    assert f"role '{weak_role}' may not read the version of schema '{schema}'" in line
    assert f'GRANT USAGE ON SCHEMA "{schema}" TO "{weak_role}"' in line


# --------------------------------------------------------------------------- 5. addresses


@pytest.mark.parametrize("check", [False, True])
def test_migrate_against_a_port_where_nothing_listens(tmp_path, dsn, check):
    res = cli("migrate", "--dsn", refused_dsn(dsn), *(["--check"] if check else []), cwd=tmp_path)
    line = one_line(res)
    assert "port 1 failed: Connection refused; " in line


def test_migrate_against_a_missing_database(tmp_path, dsn):
    missing = f"nodb_{secrets.token_hex(4)}"
    line = one_line(cli("migrate", "--dsn", make_conninfo(dsn, dbname=missing), cwd=tmp_path))
    assert f'database "{missing}" does not exist' in line


def test_migrate_with_a_dsn_that_does_not_parse(tmp_path):
    line = one_line(cli("migrate", "--dsn", "notadsn", cwd=tmp_path))
    assert line.startswith("pgdurable: the DSN is not a connection string or postgresql:// URI: ")


def test_supervise_against_a_port_where_nothing_listens(tmp_path, dsn):
    path = config(tmp_path, dsn=refused_dsn(dsn))
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert "port 1 failed: Connection refused; " in line


# --------------------------------------------------------------------------- 6. other mistakes


def test_migrate_without_a_database_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PGDURABLE_DSN"}
    res = subprocess.run(
        [sys.executable, "-m", "pgdurable", "migrate"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    assert one_line(res) == "pgdurable: no database: give --dsn, --config FILE or set PGDURABLE_DSN"


def test_check_on_a_database_without_the_schema_names_the_database(tmp_path, dsn):
    nothing = f"m_{secrets.token_hex(5)}"
    db = conninfo_to_dict(dsn)["dbname"]
    line = one_line(cli("migrate", "--dsn", dsn, "--schema", nothing, "--check", cwd=tmp_path), code=1)
    want = migrations.latest()
    assert line == (
        f"pgdurable: schema '{nothing}' has no pgdurable tables in database '{db}' (version 0); "
        f"this pgdurable needs {want} ({want} migration{'s' if want != 1 else ''} behind); "
        f"run: pgdurable migrate --schema {nothing}"
    )


def test_supervise_on_a_database_without_the_schema(tmp_path, dsn):
    nothing = f"m_{secrets.token_hex(5)}"
    path = config(tmp_path, dsn=dsn, schema=nothing)
    line = one_line(cli("supervise", str(path), cwd=tmp_path))
    assert f"schema '{nothing}' has no pgdurable tables in database" in line
    assert f"run: pgdurable migrate --schema {nothing}" in line
