"""Operating a cache: ``status``, ``verify``, ``gc``, ``pack``, ``migrate`` and ``bench``.

The ``featstore`` subcommands of the same names are thin wrappers around these functions. Each
returns a report with ``to_dict()`` (what ``--json`` prints) and ``text()`` (what a person reads).
Every verdict uses the entry states of :data:`featstore.vocabulary.STATES`.

One module per command, over one survey of a feature's entries:

- :mod:`~featstore.ops.files`: where a feature's files live and which are featstore's (the one
  place that decides what may be removed or moved)
- :mod:`~featstore.ops.survey`: every source checked, and the entries no source claims
- :mod:`~featstore.ops.histories`: history entries judged, and the histories the samples name
  counted; :mod:`~featstore.ops.history_explanation`: ``explain --history``
- :mod:`~featstore.ops.status_report`, :mod:`~featstore.ops.verification` (and the quarantine),
  :mod:`~featstore.ops.gc`, :mod:`~featstore.ops.migrate` (with :mod:`~featstore.ops.migrate_report`
  and :mod:`~featstore.ops.legacy_caches`), :mod:`~featstore.ops.benchmark`
- :mod:`~featstore.ops.journals`: leftover precompute journals merged
- :mod:`~featstore.ops.packing`: ``featstore pack``, entries moved into packs

A module is never named like a function re-exported here (``status_report``, not ``status``), so
``featstore.ops.status`` is always the function. Nothing here imports torch: the CLI imports this
package at start-up.
"""

from featstore.ops.benchmark import BenchReport, BenchRow, bench
from featstore.ops.gc import DEFAULT_MIN_TMP_AGE_S, GcItem, GcReport, WrongDataRootError, execute_gc, plan_gc
from featstore.ops.history_explanation import HistoryExplanation, explain_history
from featstore.ops.journals import merge_leftover_journals
from featstore.ops.migrate import execute_migrate, plan_migrate
from featstore.ops.migrate_report import MigrateItem, MigrateReport
from featstore.ops.packing import PackReport, pack
from featstore.ops.status_report import StatusReport, status
from featstore.ops.survey import EntryReport
from featstore.ops.verification import VerifyReport, quarantine, quarantine_dir, verify

__all__ = [
    "DEFAULT_MIN_TMP_AGE_S",
    "BenchReport",
    "BenchRow",
    "EntryReport",
    "GcItem",
    "GcReport",
    "HistoryExplanation",
    "MigrateItem",
    "MigrateReport",
    "PackReport",
    "StatusReport",
    "VerifyReport",
    "WrongDataRootError",
    "bench",
    "execute_gc",
    "execute_migrate",
    "explain_history",
    "merge_leftover_journals",
    "pack",
    "plan_gc",
    "plan_migrate",
    "quarantine",
    "quarantine_dir",
    "status",
    "verify",
]
