"""One federation on a Grid (simulation or deployment), and the files it leaves in its run dir.

:func:`run_federation` builds the model and strategy of a :class:`~precode_flower.task.RunConfig`,
runs :func:`~precode_flower.federation.rounds.train_rounds`, evaluates the global model
centrally after every round, and writes to ``out_dir``: ``config.json``, ``rounds.jsonl``
(one JSON object per round), ``summary.json``, ``accuracy.png``, ``model.pt`` (the final
state dict) and, after every round, ``checkpoint.pt`` (see :mod:`precode_flower.checkpoint`),
from which ``resume`` continues.

Reliability: every train and evaluate reply is validated
(:class:`~precode_flower.strategies.validation.ReplyValidator`, with the run's
``max-update-norm``, ``max-reply-mb``, ``min-replies`` and ``max-examples``); a client that
fails, hangs past ``round-timeout`` (seconds per phase) or disappears costs only its own
reply. Everything written is owner-only (:mod:`precode_flower.private`): the global model
and the seed can be enough to rebuild a client's training images.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from precode_flower import checkpoint as ckpt_mod
from precode_flower import data as data_mod
from precode_flower import task
from precode_flower.plotting import plot_accuracy
from precode_flower.private import open_private, private_dir, write_private
from precode_flower.strategies import FedSGD, Observed, Observer
from precode_flower.strategies.arrays import arrays_view
from precode_flower.training import EvalStats, evaluate

from .rounds import (
    PartitionOrderedGrid,
    make_evaluate_validator,
    make_strategy,
    make_validator,
    train_rounds,
)
from .runlog import RoundLog

log = logging.getLogger(__name__)


def load_resume_checkpoint(cfg: task.RunConfig, out_dir: str | Path) -> ckpt_mod.Checkpoint:
    """The validated checkpoint in ``out_dir`` for resuming ``cfg``; CheckpointError if not."""
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    reference = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    return ckpt_mod.load_checkpoint(
        out_dir, config=cfg.to_config(), reference=reference.state_dict()
    )


def run_federation(
    grid: Grid,
    cfg: task.RunConfig,
    out_dir: str | Path,
    *,
    observers: Sequence[Observer] = (),
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``cfg.rounds`` rounds on ``grid``; write the run's files to ``out_dir``.

    After every round the checkpoint in ``out_dir`` is replaced. ``resume``: continue from
    it (validated first: :class:`~precode_flower.checkpoint.CheckpointError` if it is
    missing, corrupted or from another run; nothing is written then).
    Returns the summary (also written to ``summary.json``).
    """
    out = Path(out_dir)
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    param_keys = [n for n, _ in model.named_parameters()]
    strategy = make_strategy(cfg, param_keys)
    resumed = load_resume_checkpoint(cfg, out) if resume else None
    arrays = ArrayRecord(model.state_dict())
    if resumed is not None:
        arrays = ArrayRecord(resumed.model)
        if isinstance(strategy, FedSGD):
            try:
                strategy.load_state_dict(arrays, resumed.strategy)
            except ValueError as err:
                raise ckpt_mod.CheckpointError(f"checkpoint in {out}: {err}") from err
        ckpt_mod.set_rng_state(resumed.rng)
        log.info("resuming %s after round %d", out, resumed.round)
    private_dir(out)  # everything a run writes is owner-only: the model reveals client data
    write_private(out / "config.json", json.dumps(cfg.to_config(), indent=2) + "\n")
    observed = Observed(
        strategy,
        observers,
        make_validator(cfg, strategy),
        sort_replies=True,
        evaluate_validator=make_evaluate_validator(cfg, strategy, len(bundle.test)),
    )
    done = resumed.round if resumed is not None else 0
    if cfg.fraction < 1 or cfg.fraction_evaluate < 1:  # sampling: make it node-id-free
        grid = PartitionOrderedGrid(  # type: ignore[assignment]
            grid, min(cfg.round_timeout, 120.0), observed.partitions
        )
    round_log = RoundLog(
        out,
        observed,
        cfg.rounds,
        progress,
        resume_after=done,
        saved_rows=resumed.rows if resumed is not None else (),
    )
    if resumed is not None:
        round_log.initial = dict(resumed.initial)
        restore_privacy = getattr(strategy, "restore_privacy", None)
        if restore_privacy is not None:  # the epsilon spent before the interruption
            restore_privacy(round_log.rows)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> EvalStats:
        task.load_state(model, arrays_view(arrays))
        return evaluate(model, bundle.test)

    writer = ckpt_mod.CheckpointWriter(out)

    def after_round(server_round: int, arrays: ArrayRecord, stats: EvalStats) -> None:
        round_log.on_evaluation(server_round, stats.loss, stats.accuracy)
        # Snapshot what the next round changes (the server optimiser's buffers are updated
        # in place, the RNGs advance); the model record itself is replaced, never changed.
        state = copy.deepcopy(strategy.state_dict()) if isinstance(strategy, FedSGD) else {}
        rng, initial = ckpt_mod.rng_state(), dict(round_log.initial)
        rows = list(round_log.rows)  # rows are written once and never changed
        writer.submit(
            lambda: ckpt_mod.Checkpoint(
                round=server_round,
                config=cfg.to_config(),
                model=arrays.to_torch_state_dict(),
                strategy=state,
                rng=rng,
                initial=initial,
                rows=rows,
            )
        )

    started = time.perf_counter()
    try:
        if resumed is None:
            stats = central_evaluation(0, arrays)
            round_log.on_evaluation(0, stats.loss, stats.accuracy)
        strategy.summary()
        arrays = train_rounds(
            observed,
            grid,
            arrays,
            cfg,
            first_round=done + 1,
            evaluate_fn=central_evaluation,
            after_round=after_round,
        )
    finally:
        writer.close()  # the last round's checkpoint is on disk before the run returns
        observed.close()
        round_log.close()
    with open_private(out / "model.pt", "wb") as f:
        torch.save(arrays.to_torch_state_dict(), f)
    summary = {
        "rounds": len(round_log.rows),
        "resumed_after": done or None,
        "initial": round_log.initial,
        "final_test_accuracy": round_log.rows[-1]["test_accuracy"] if round_log.rows else None,
        "rejected_replies": sum(r.get("rejected", 0) for r in round_log.rows),
        "non_finite_replies": round_log.non_finite,
        "seconds": round(time.perf_counter() - started, 3),
        "data_source": bundle.source,
    }
    privacy_summary = getattr(strategy, "privacy_summary", None)
    if privacy_summary is not None:  # dp-server / dp-client
        summary["privacy"] = privacy_summary()
    write_private(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if round_log.non_finite:
        log.warning(
            "%d client update(s) over the run were non-finite (NaN/Inf) and rejected: local "
            "training diverged (lr %s, server-lr %s, beta %s; try a smaller learning rate)",
            round_log.non_finite,
            cfg.lr,
            cfg.server_lr,
            cfg.beta,
        )
    try:
        plot_accuracy(
            round_log.rows,
            out / "accuracy.png",
            initial_accuracy=round_log.initial.get("test_accuracy"),
            title=f"{cfg.mode} {cfg.model} on {cfg.dataset}, {cfg.clients} clients, "
            f"defenses: {','.join(cfg.defenses) or 'none'}",
        )
    except Exception:  # a missing plot must not fail a finished run
        log.exception("could not write accuracy.png")
    return summary


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
