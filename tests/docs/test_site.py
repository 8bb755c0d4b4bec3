"""The docs site builds with ``mkdocs build --strict`` (a broken link, anchor, snippet or API
reference fails it), and its command-line reference is each command's own ``--help``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from featstore.cli import build_parser
from featstore.cli.reference import commands, help_text, markdown

REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for name, _, _ in commands():
        assert f'id="featstore-{name}"' in reference  # the hook filled the page
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "featstore.FeatureStore" in api and "read_batch" in api and "CachedDataset" in api
    started = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert "Quick start: VLN" in started and "Quick start: diffusion" in started  # included from the README
    assert "--8<--" not in started


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings
            if action.help is not argparse.SUPPRESS]


def test_the_cli_reference_is_every_command_s_help():
    reference = markdown()
    listed = commands()
    assert [name for name, _, _ in listed] == list(next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)
    assert len(listed) >= 9
    for name, summary, parser in listed:
        assert f"## featstore {name}\n" in reference and summary
        assert help_text(parser) in reference + "\n"  # verbatim, not a paraphrase
        for flag in _options(parser):
            assert flag in reference, f"featstore {name} {flag} is not in the reference"
