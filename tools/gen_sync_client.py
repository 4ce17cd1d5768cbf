"""Generate the blocking client, pgdurable/client/sync.py, from the asyncio one, aio.py.

    python tools/gen_sync_client.py            # rewrite pgdurable/client/sync.py
    python tools/gen_sync_client.py --check    # exit 1 when sync.py is not what aio.py gives
    python tools/gen_sync_client.py --output PATH

``AsyncClient`` is the source; ``Client`` is the same code with the asyncio parts taken out,
as psycopg builds its sync classes from its async ones. The rewrite works on tokens, so the
comments and the layout of aio.py survive:

- ``async`` before ``def``/``with``/``for`` and every ``await`` are dropped, and the
  parentheses of ``(await x).attr`` go with them when ``x`` is a plain dotted call;
- names are renamed by ``NAMES`` (``AsyncConnection`` → ``Connection``, …), and so is a
  string that is just such a name (``__all__``); the right-hand names that are not
  psycopg's or the standard library's are the hand-written halves in ``concurrency.py``;
- the module docstring becomes ``DOCSTRING`` under a header saying the file is generated.

Text inside strings and comments is left alone, f-strings included. Then ruff sorts the
imports and formats the file. A name that still looks asynchronous afterwards is an error:
give it a counterpart in ``NAMES`` rather than editing sync.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import keyword
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("pgdurable/client/aio.py")
TARGET = Path("pgdurable/client/sync.py")

#: Every asynchronous name aio.py uses, and what it is in the blocking client.
NAMES = {
    "AsyncClient": "Client",
    "AsyncConnection": "Connection",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncIterator": "Iterator",
    "asynccontextmanager": "contextmanager",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "ALock": "Lock",
    "asleep": "sleep",
    "TaskEmitter": "ThreadEmitter",
}

HEADER = (
    "# Generated from pgdurable/client/aio.py by tools/gen_sync_client.py: do not edit by hand.\n"
    "# Change aio.py (or the generator), then run `python tools/gen_sync_client.py`.\n"
)

DOCSTRING = '''"""``Client``: insert, signal, read and wait, for producers that block.

Generated from ``aio.py`` (``AsyncClient``): the same statements in the same order, with a
thread where the asyncio client has a task (``concurrency.py``).
"""'''

#: Names that must not survive the rewrite.
_ASYNC_LOOKING = re.compile(r"(?i)async|^await$|^__a(enter|exit|iter|next)__$|^a(iter|next|close|sleep)$")
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)
_NOISE = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


class GenerateError(Exception):
    pass


def _code_tokens(source: str) -> list[tokenize.TokenInfo]:
    """The tokens that are code, without the insides of f-strings (one STRING token before
    Python 3.12, many after: skipping them keeps the output the same on every version)."""
    out: list[tokenize.TokenInfo] = []
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == _FSTRING_START:
            depth += 1
            if depth == 1:
                out.append(tok)
            continue
        if tok.type == _FSTRING_END:
            depth -= 1
            continue
        if depth == 0 and tok.type not in _NOISE:
            out.append(tok)
    return out


def _matching(toks: list[tokenize.TokenInfo], i: int) -> int:
    """The index of the bracket closing the one at ``i``."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].type == tokenize.OP and toks[j].string in "([{":
            depth += 1
        elif toks[j].type == tokenize.OP and toks[j].string in ")]}":
            depth -= 1
            if depth == 0:
                return j
    raise GenerateError(f"unbalanced bracket at line {toks[i].start[0]}")


def _is_callee(tok: tokenize.TokenInfo) -> bool:
    """A token after which ``(`` opens a call rather than a group."""
    if tok.type == tokenize.NAME:
        return not keyword.iskeyword(tok.string)
    return tok.type == tokenize.STRING or tok.string in (")", "]")


def _primary_atoms(toks: list[tokenize.TokenInfo], start: int, stop: int) -> list[tuple[int, int]] | None:
    """The parts of ``toks[start:stop]`` when it is names, dots and bracketed groups only
    (``a.b(c)[d].e()``): each a (first, last) token index. None for anything else."""
    atoms: list[tuple[int, int]] = []
    i = start
    while i < stop:
        tok = toks[i]
        if tok.type == tokenize.OP and tok.string in "([":
            atoms.append((i, _matching(toks, i)))
        elif (tok.type == tokenize.NAME and not keyword.iskeyword(tok.string)) or tok.string == ".":
            atoms.append((i, i))
        else:
            return None
        i = atoms[-1][1] + 1
    return atoms or None


def _await_group(toks: list[tokenize.TokenInfo], i: int) -> tuple[int, int, list[tuple[int, int]]] | None:
    """For ``await`` at ``i`` in ``(await x.y()).z``: the parentheses that only make the
    await bind first, which the blocking code does not need, and the parts between them."""
    if i < 1 or toks[i - 1].string != "(" or (i >= 2 and _is_callee(toks[i - 2])):
        return None
    close = _matching(toks, i - 1)
    if close + 1 >= len(toks) or toks[close + 1].string not in (".", "(", "["):
        return None
    atoms = _primary_atoms(toks, i + 1, close)
    return None if atoms is None else (i - 1, close, atoms)


def transform(source: str) -> str:
    """aio.py's text → sync.py's text, before ruff."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def at(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    toks = _code_tokens(source)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in source offsets
    docstring = next((t for t in toks if t.type != tokenize.NEWLINE), None)
    if docstring is None or docstring.type != tokenize.STRING:
        raise GenerateError(f"{SOURCE} must open with its module docstring")
    edits.append((at(docstring.start), at(docstring.end), DOCSTRING))
    for i, tok in enumerate(toks):
        if tok.type != tokenize.NAME:
            continue
        if tok.string == "async":
            if i + 1 >= len(toks) or toks[i + 1].string not in ("def", "with", "for"):
                raise GenerateError(f"line {tok.start[0]}: 'async' before {toks[i + 1].string!r}")
            edits.append((at(tok.start), at(toks[i + 1].start), ""))
        elif tok.string == "await":
            group = _await_group(toks, i)
            if group is None:
                edits.append((at(tok.start), at(toks[i + 1].start), ""))
                continue
            # the parentheses go, and with them the line breaks they allowed
            opening, closing, atoms = group
            gaps = [(opening, i + 1), *((a[1], b[0]) for a, b in itertools.pairwise(atoms))]
            gaps.append((closing - 1, closing))
            for k, (a, b) in enumerate(gaps):
                start = at(toks[a].start if k == 0 else toks[a].end)
                end = at(toks[b].end if k == len(gaps) - 1 else toks[b].start)
                if "#" in source[at(toks[a].end) : at(toks[b].start)]:
                    raise GenerateError(f"line {toks[a].start[0]}: a comment inside (await ...)")
                edits.append((start, end, ""))
        elif tok.string in NAMES:
            edits.append((at(tok.start), at(tok.end), NAMES[tok.string]))
    for tok in toks:  # a name as a string: in __all__, in a quoted annotation
        if tok.type == tokenize.STRING and tok.string[1:-1] in NAMES and tok.string[0] in "'\"":
            edits.append(
                (at(tok.start), at(tok.end), tok.string[0] + NAMES[tok.string[1:-1]] + tok.string[0])
            )
    out = source
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    for tok in _code_tokens(out):
        if tok.type == tokenize.NAME and _ASYNC_LOOKING.search(tok.string):
            raise GenerateError(
                f"{SOURCE}: {tok.string!r} has no blocking counterpart (line {tok.start[0]} of the"
                " output): add it to NAMES in tools/gen_sync_client.py"
            )
    return HEADER + out


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    if found is None:
        raise GenerateError("ruff is needed to format the output: pip install ruff")
    return [found]


def _run_ruff(args: list[str], text: str) -> str:
    # --stdin-filename: ruff reads the project's settings as for the real file
    cmd = [*_ruff(), *args, "--stdin-filename", str(TARGET), "-"]
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise GenerateError(f"{' '.join(cmd[-6:])} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def generate() -> str:
    """The text sync.py must have."""
    text = transform((ROOT / SOURCE).read_text())
    text = _run_ruff(["check", "--select", "I", "--fix", "--quiet"], text)
    return _run_ruff(["format", "--quiet"], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--output", type=Path, default=ROOT / TARGET, help="where to write (default: %(default)s)"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the output would change"
    )
    args = parser.parse_args(argv)
    try:
        text = generate()
    except GenerateError as exc:
        print(f"gen_sync_client: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != text:
            print(f"{args.output} is stale: run python tools/gen_sync_client.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
