"""The README's examples, so that they cannot rot: the quick starts run as written (tiny example
data and random weights), every other shell command parses with the CLI's own parser, and every
Python example compiles and names only things featstore has."""

from __future__ import annotations

import ast
import importlib
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from featstore.cli import build_parser

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str
    line: int


def _blocks() -> list[Block]:
    blocks, heading, fence, start, lines = [], "", None, 0, []
    with open(README, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if fence is None:
                if line.startswith("#"):
                    heading = line.strip("# \n")
                elif line.startswith("```"):
                    fence, start, lines = line[3:].strip(), number, []
            elif line.startswith("```"):
                blocks.append(Block(heading, fence, "".join(lines), start))
                fence = None
            else:
                lines.append(line)
    return blocks


BLOCKS = _blocks()
QUICK_STARTS = sorted({b.heading for b in BLOCKS if b.heading.startswith("Quick start")})


def test_the_readme_has_both_quick_starts():
    assert [q.split(":")[0] for q in QUICK_STARTS] == ["Quick start", "Quick start"]
    assert any("VLN" in q for q in QUICK_STARTS) and any("diffusion" in q for q in QUICK_STARTS)


@pytest.mark.parametrize("section", QUICK_STARTS)
def test_a_quick_start_runs_as_written(section, tmp_path):
    if "diffusion" in section:
        pytest.importorskip("diffusers")
        from featstore.examples.pipelines import unavailable

        if unavailable("qwen_image_edit"):
            pytest.skip(unavailable("qwen_image_edit"))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for block in (b for b in BLOCKS if b.heading == section):
        if block.language == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", block.code]
        elif block.language == "python":
            cmd = [sys.executable, "-c", block.code]
        else:
            continue
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"README line {block.line} ({section}) failed:\n{block.code}\n"
                                      f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
        assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _featstore_commands() -> list[tuple[int, list[str]]]:
    """``featstore ...`` (and ``torchrun ... -m featstore.cli ...``) command lines of the bash blocks."""
    found = []
    for block in BLOCKS:
        if block.language != "bash":
            continue
        for offset, line in enumerate(block.code.splitlines(), 1):
            for words in _commands_of(line):
                while words and "=" in words[0]:  # VAR=value featstore ...
                    words = words[1:]
                if words[:1] == ["featstore"]:
                    found.append((block.line + offset, words[1:]))
                elif "featstore.cli" in words:
                    found.append((block.line + offset, words[words.index("featstore.cli") + 1:]))
    return found


def _commands_of(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at ``&&``, ``||``, ``;`` and ``|`` (quotes kept)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


COMMANDS = _featstore_commands()


def test_the_readme_shows_featstore_commands():
    assert len(COMMANDS) >= 15  # the parse test below is not vacuous


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[str(line) for line, _ in COMMANDS])
def test_a_readme_command_parses(line, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README line {line}: `featstore {' '.join(argv)}` does not parse: {capsys.readouterr().err}"
                    f" (exit {exc.code})")


PYTHON = [b for b in BLOCKS if b.language == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=[str(b.line) for b in PYTHON])
def test_a_readme_python_example_names_what_featstore_has(block):
    tree = ast.parse(block.code, filename=f"README.md:{block.line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featstore"):
            module = importlib.import_module(node.module)  # type: ignore[arg-type]
            for alias in node.names:
                assert hasattr(module, alias.name), f"README line {block.line}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain and chain[0] == "featstore":
                _resolve(chain, block.line)


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _resolve(chain: list[str], line: int) -> None:
    obj = importlib.import_module("featstore")
    for i, name in enumerate(chain[1:], 1):
        if not hasattr(obj, name):
            try:
                obj = importlib.import_module(".".join(chain[:i + 1]))
                continue
            except ImportError:
                pytest.fail(f"README line {line}: {'.'.join(chain[:i + 1])} does not exist")
        obj = getattr(obj, name)
