"""pgdurable/client/sync.py is generated from aio.py: the file in the tree is what the
generator gives, and the generator's rewriting rules hold."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "tools" / "gen_sync_client.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_sync_client", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def test_sync_client_is_generated_from_the_async_one(tmp_path):
    out = tmp_path / "sync.py"
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    committed = (REPO / "pgdurable" / "client" / "sync.py").read_text()
    assert out.read_text() == committed, "the sync client drifted: run python tools/gen_sync_client.py"


def _body(source: str) -> str:
    """transform() of a module, without the header and docstring it puts first."""
    text = gen.transform('"""doc"""\n' + textwrap.dedent(source))
    return text.partition(gen.DOCSTRING)[2]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("async def f():\n    await g()\n", "def f():\n    g()\n"),
        (
            "async def f():\n    async with a() as b:\n        pass\n",
            "def f():\n    with a() as b:\n        pass\n",
        ),
        ("x = await (await c.execute(q)).fetchone()\n", "x = c.execute(q).fetchone()\n"),
        (  # as ruff lays out a long one: the line breaks go with the parentheses
            "x = await (\n    await c.execute(q, p)\n).fetchone()\n",
            "x = c.execute(q, p).fetchone()\n",
        ),
        ("async with (await self.pool()).connection() as c:\n", "with self.pool().connection() as c:\n"),
        ("f(await x).y\n", "f(x).y\n"),  # a call's parentheses stay
        ("(await a + b).c\n", "(a + b).c\n"),  # not a plain primary: the group stays
        ("return (await a)\n", "return (a)\n"),  # nothing after: left to the formatter
        (
            "def f(c: psycopg.AsyncConnection[Any]) -> AsyncClient: ...\n",
            "def f(c: psycopg.Connection[Any]) -> Client: ...\n",
        ),
        ('__all__ = ["AsyncClient"]\n', '__all__ = ["Client"]\n'),
        (  # prose is left alone
            '# AsyncClient awaits\ns = "an AsyncClient"\nt = f"{x} AsyncClient"\n',
            '# AsyncClient awaits\ns = "an AsyncClient"\nt = f"{x} AsyncClient"\n',
        ),
    ],
)
def test_transform(source, expected):
    assert _body(source) == "\n" + expected


def test_transform_refuses_a_name_without_counterpart():
    with pytest.raises(gen.GenerateError, match="AsyncWidget"):
        _body("x = AsyncWidget()\n")
    with pytest.raises(gen.GenerateError, match="asyncio"):
        _body("import asyncio\n")


def test_generated_header():
    text = (REPO / "pgdurable" / "client" / "sync.py").read_text()
    assert text.startswith(gen.HEADER)
    assert "do not edit by hand" in text.splitlines()[0]
