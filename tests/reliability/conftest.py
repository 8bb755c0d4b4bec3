"""Figures and shared helpers of the reliability suite.

Each test records what it did with the ``figures`` fixture: runs (independent scenarios: kills,
processes, payloads, corpus files), cases (individual verifications: entries checked, reads,
parsed inputs) and failures (verifications that failed; the tests then fail too). At the end of
the session a table is printed, also under ``-q``, and written to
``target/reliability/summary.json``. Rows from the Rust fuzz test (``cargo test --test
header_fuzz``, which leaves its figures in ``target/tmp/reliability/``) are added when present.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch

from featstore import FeatureStore, _core
from featstore.errors import CorruptEntryError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


@dataclass
class Row:
    """One row of the summary table; ``seconds`` is wall time spent in the category's tests."""

    category: str
    runs: int = 0
    cases: int = 0
    failures: int = 0
    seconds: float = 0.0
    note: str = ""


#: Rows of the summary table, in the order categories were first recorded.
RESULTS: dict[str, Row] = {}


class Figures:
    """Adds to one category's row of the summary table."""

    def __init__(self, category: str) -> None:
        self.row = RESULTS.setdefault(category, Row(category))

    def add(self, *, runs: int = 0, cases: int = 0, failures: int = 0) -> None:
        self.row.runs += runs
        self.row.cases += cases
        self.row.failures += failures

    def note(self, text: str) -> None:
        self.row.note = text


@pytest.fixture
def figures() -> Iterator[Callable[[str], Figures]]:
    """``figures(category)`` gives a recorder; the test's wall time is added to its category."""
    made: list[Figures] = []
    started = time.perf_counter()

    def make(category: str) -> Figures:
        f = Figures(category)
        made.append(f)
        return f

    yield make
    for f in made:
        f.row.seconds += (time.perf_counter() - started) / len(made)


def _rust_rows() -> list[Row]:
    rows = []
    labels = {"header_fuzz_memory": "hostile entries: Rust header parser, in memory (proptest)",
              "header_fuzz_files": "hostile entries: Rust readers on files (proptest)"}
    for name, label in labels.items():
        path = os.path.join(TARGET, "tmp", "reliability", f"{name}.json")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        age = time.time() - os.path.getmtime(path)
        build = "release" if doc.get("optimized") else "debug"
        rows.append(Row(label, 1, int(doc["cases"]), int(doc["failures"]), float(doc["seconds"]),
                        f"cargo test ({build}) {age / 60:.0f} min ago"))
    return rows


def table(rows: list[Row]) -> list[str]:
    """The summary table as Markdown lines."""
    lines = ["| category | runs | cases | failures | seconds | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.category} | {r.runs:,} | {r.cases:,} | {r.failures:,} | {r.seconds:.1f} | {r.note} |")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    rows = sorted(RESULTS.values(), key=lambda r: r.category) + _rust_rows()
    terminalreporter.write_sep("=", "featstore reliability figures")
    for line in table(rows):
        terminalreporter.write_line(line)
    out = os.path.join(TARGET, "reliability", "summary.json")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
        terminalreporter.write_line(f"(written to {out})")
    except OSError as exc:  # a read-only checkout still gets the printed table
        terminalreporter.write_line(f"(not written to {out}: {exc})")


# ----------------------------------------------------------------------------------- helpers
def entry_files(root: str, feature: str) -> list[str]:
    """Every sidecar entry file of ``feature`` under ``root`` (absolute paths, sorted)."""
    suffix = f".{feature}.safetensors"
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(suffix))


def temp_files(root: str) -> list[str]:
    """featstore's temporary files (``.<name>.<random>.tmp``) under ``root``."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.startswith(".") and f.endswith(".tmp"))


def expected_outputs(encoder: object, root: str, rels: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """What ``encoder`` gives for each image alone: the values every entry must hold."""
    out = {}
    with torch.inference_mode():
        for rel in rels:
            image = encoder.preprocess(os.path.join(root, rel))  # type: ignore[attr-defined]
            got = encoder.encode(image[None].float() / 255)  # type: ignore[attr-defined]
            out[rel] = {k: v[0].clone() for k, v in got.items()}
    return out


def check_entries(root: str, feature: str, expected: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Checks every entry file of ``feature`` under ``root`` in full: it parses, its data matches
    its checksum, it names its source, and ``FeatureStore.get`` serves exactly the expected values.
    Returns what is wrong (empty when all is well)."""
    problems = []
    store = FeatureStore(root, feature)
    suffix = f".{feature}.safetensors"
    for path in entry_files(root, feature):
        rel = os.path.relpath(path, root)[: -len(suffix)]
        try:
            meta = _core.verify_entry(path)
        except CorruptEntryError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if meta.get("source") != rel or meta.get("feature") != feature:
            problems.append(f"{path}: names source {meta.get('source')!r}, feature {meta.get('feature')!r}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = store.get(rel)
        want = expected[rel]
        if got is None or set(got) != set(want):
            problems.append(f"{path}: served {None if got is None else sorted(got)}, expected {sorted(want)}")
            continue
        for name, t in want.items():
            if got[name].shape != t.shape or not torch.allclose(got[name], t, rtol=0, atol=1e-6):
                problems.append(f"{path}: tensor {name!r} differs from the encoder's output")
    return problems


def in_one_thread(fn: Callable[..., Any], args: tuple) -> Any:
    """Runs ``fn(*args)`` with torch held to one thread: for forked children, as libgomp cannot
    start a parallel region in a child forked after its parent ran one (the child waits forever
    at the first barrier). With one thread torch never enters one, as in DataLoader workers; the
    pipeline, which would set more threads for itself, is held to it too."""
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # this child's copy of torch only
    return fn(*args)


def fork(fn: Callable[..., Any], *args: Any) -> multiprocessing.process.BaseProcess:
    """Starts ``fn(*args)`` in a forked child (torch already imported: no two-second start)."""
    proc = multiprocessing.get_context("fork").Process(target=in_one_thread, args=(fn, args))
    proc.start()
    return proc


def copy_tree(template: str, dest: str) -> str:
    """A copy of an image tree with the same mtimes (aged images stay out of the racy window)."""
    shutil.copytree(template, dest)
    return dest


def listing(tmp_path: Any, rels: list[str]) -> str:
    """A ``--files-from`` list of ``rels`` under ``tmp_path``; its path."""
    path = str(tmp_path / "listed.txt")
    with open(path, "w") as f:
        f.write("\n".join(rels) + "\n")
    return path
