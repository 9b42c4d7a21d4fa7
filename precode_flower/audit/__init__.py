"""Honest-but-curious server auditor: attack client updates off the aggregation path.

A :class:`LeakageAuditor` takes :class:`AuditJob` s (one client update each: the model the
client started from, the update exactly as the server received it, the training config the
server sent, and ground truth only where an explicit evaluation channel provides it) and runs
the configured gradient inversion attacks on them in worker processes, so that aggregation
never waits for an attack. Results are appended to ``leakage.jsonl`` as they finish; per
audited round an image grid is written; :meth:`LeakageAuditor.close` waits (with a limit) for
what is pending and writes a leakage plot and ``leakage_summary.md`` with one verdict per
defense.

One idea per module: :mod:`.jobs` (what a job is), :mod:`.worker` (the worker process),
:mod:`.auditor` (queueing, dispatch, limits), :mod:`.grids` (image grids), :mod:`.files`
(owner-only outputs, jsonl rows), :mod:`.report` (verdicts and the summary).

Nothing here imports Flower; ``precode_flower.strategies.auditor`` adapts it to Flower strategies.
"""

from __future__ import annotations

from .auditor import LeakageAuditor
from .files import latest_rows, private_dir
from .grids import GRID_COLUMNS, write_grid
from .jobs import AuditJob, UpdateKind, copy_model, task_seed, validate_attacks
from .report import (
    DEFAULT_SUCCESS_SSIM,
    STATUSES,
    image_successes,
    round_leakage,
    summarize,
    verdicts,
)
from .worker import attack_inputs

__all__ = [
    "DEFAULT_SUCCESS_SSIM",
    "GRID_COLUMNS",
    "STATUSES",
    "AuditJob",
    "LeakageAuditor",
    "UpdateKind",
    "attack_inputs",
    "copy_model",
    "image_successes",
    "latest_rows",
    "private_dir",
    "round_leakage",
    "summarize",
    "task_seed",
    "validate_attacks",
    "verdicts",
    "write_grid",
]
