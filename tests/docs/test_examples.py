"""The examples of the README and of every page under docs/, so that they cannot rot: the quick
starts run as written (tiny example data and random weights; the docs include them from the
README), every other shell command parses with the CLI's own parser, and every Python example
compiles and names only things featstore has."""

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

REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
README = os.path.join(REPO, "README.md")
DOCS = sorted(os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(REPO, "docs"))
              for name in names if name.endswith(".md"))


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str
    line: int
    page: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(path: str = README) -> list[Block]:
    page = os.path.relpath(path, REPO)
    blocks, heading, fence, start, lines = [], "", None, 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if fence is None:
                if line.startswith("#"):
                    heading = line.strip("# \n")
                elif line.startswith("```"):
                    fence, start, lines = line[3:].strip(), number, []
            elif line.startswith("```"):
                blocks.append(Block(heading, fence, "".join(lines), start, page))
                fence = None
            else:
                lines.append(line)
    return blocks


BLOCKS = _blocks()
QUICK_STARTS = sorted({b.heading for b in BLOCKS if b.heading.startswith("Quick start")})
#: Every example: the README's, then each docs page's.
ALL_BLOCKS = BLOCKS + [block for page in DOCS for block in _blocks(page)]


def test_the_docs_have_pages_with_examples():
    pages = {b.page for b in ALL_BLOCKS}
    assert len(DOCS) >= 15 and len(pages) >= 10, pages  # the example tests below are not vacuous


def test_the_docs_include_both_quick_starts_from_the_readme():
    with open(os.path.join(REPO, "docs", "getting-started.md"), encoding="utf-8") as f:
        page = f.read()
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    for name in ("quick-start-vln", "quick-start-diffusion"):
        assert f'--8<-- "README.md:{name}"' in page
        assert f"--8<-- [start:{name}]" in readme and f"--8<-- [end:{name}]" in readme


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
        assert done.returncode == 0, (f"{block.where} ({section}) failed:\n{block.code}\n"
                                      f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
        assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _featstore_commands() -> list[tuple[int, list[str]]]:
    """``featstore ...`` (and ``torchrun ... -m featstore.cli ...``) command lines of the bash blocks,
    with where each is (``page:line``)."""
    found = []
    for block in ALL_BLOCKS:
        if block.language != "bash":
            continue
        for offset, line in enumerate(block.code.splitlines(), 1):
            for words in _commands_of(line):
                while words and "=" in words[0]:  # VAR=value featstore ...
                    words = words[1:]
                if words[:1] == ["featstore"]:
                    found.append((f"{block.page}:{block.line + offset}", words[1:]))
                elif "featstore.cli" in words:
                    found.append((f"{block.page}:{block.line + offset}", words[words.index("featstore.cli") + 1:]))
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


def test_the_docs_show_featstore_commands():
    assert len(COMMANDS) >= 30  # the parse test below is not vacuous


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[line for line, _ in COMMANDS])
def test_a_documented_command_parses(line, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{line}: `featstore {' '.join(argv)}` does not parse: {capsys.readouterr().err}"
                    f" (exit {exc.code})")


PYTHON = [b for b in ALL_BLOCKS if b.language == "python"]


def test_the_docs_show_python_examples():
    assert len(PYTHON) >= 10


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_a_documented_python_example_names_what_featstore_has(block):
    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featstore"):
            module = importlib.import_module(node.module)  # type: ignore[arg-type]
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain and chain[0] == "featstore":
                _resolve(chain, block.where)


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _resolve(chain: list[str], where: str) -> None:
    obj = importlib.import_module("featstore")
    for i, name in enumerate(chain[1:], 1):
        if not hasattr(obj, name):
            try:
                obj = importlib.import_module(".".join(chain[:i + 1]))
                continue
            except ImportError:
                pytest.fail(f"{where}: {'.'.join(chain[:i + 1])} does not exist")
        obj = getattr(obj, name)
