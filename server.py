"""The server side of a federation: Flower's ServerApp, and a CLI that submits it to a SuperLink.

``app`` (``server:app``) is the ServerApp that ``flwr run .`` and the SuperLink execute; it
reads the run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``--run-config``), trains for ``rounds`` rounds with FedAvg (Flower's) or FedSGD (ours),
both wrapped in :class:`strategies.Observed`, evaluates the global model centrally after
every round, and writes to ``out-dir``: ``config.json``, ``rounds.jsonl`` (one JSON object
per round), ``summary.json``, ``accuracy.png``, ``model.pt`` (the final state dict) and,
after every round, ``checkpoint.pt`` (see :mod:`precode_flower.checkpoint`); with the
run-config key ``resume = true`` (``--resume DIR``) a run continues from the checkpoint in
``out-dir``.

Reliability: every reply is validated (:class:`strategies.validation.ReplyValidator`, with
the run's ``max-update-norm``, ``max-reply-mb`` and ``min-replies``); a client that fails,
hangs past ``round-timeout`` (seconds per phase: train, then evaluate; round r's evaluation
is in flight while round r+1's training starts, see :func:`train_rounds`) or disappears costs
only its own reply; after the first round the server samples whichever nodes are online,
so a node that left does not stall the run.

``python server.py --superlink HOST:PORT --root-certificates ca.pem [training flags]``
(or ``--insecure``, with a warning, for plain-text local tests) submits that app to a
running SuperLink (which runs the ServerApp) and streams its log until the run ends.
It calls ``flwr run`` with a throw-away ``FLWR_HOME`` holding a single SuperLink connection,
so no Flower config file needs editing (``--connection NAME`` uses a connection from your
own ``$FLWR_HOME/config.toml`` instead). docs/DEPLOYMENT.md shows the secure deployment
(TLS, SuperNode authentication). Insecure, step by step (all on 127.0.0.1)::

    flower-superlink --insecure --host 127.0.0.1 --port 9093 \\
        --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \\
        --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9095 \\
        --node-config "partition-id=1 num-partitions=2"
    python server.py --superlink 127.0.0.1:9093 --insecure --clients 2 --rounds 2 --out runs/demo
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from tqdm.auto import tqdm

from precode_flower import checkpoint as ckpt_mod
from precode_flower import data as data_mod
from precode_flower import heap, task
from precode_flower.defenses import DEFENSES, parse_defenses
from precode_flower.models import MODELS
from precode_flower.partition import SCHEMES
from precode_flower.plotting import plot_accuracy
from precode_flower.strategies import FedSGD, Observed, Observer, ReplyValidator, aggregate_metrics
from precode_flower.strategies.arrays import arrays_view
from precode_flower.strategies.auditor import (
    add_audit_args,
    audit_from_run_config,
    audit_run_config,
)
from precode_flower.strategies.replies import collect_replies
from precode_flower.training import EvalStats, evaluate

log = logging.getLogger("precode_flower.server")

APP_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# The federation (shared by simulation and deployment)


def make_strategy(cfg: task.RunConfig, param_keys: Sequence[str]) -> Strategy:
    """Flower's FedAvg (mode fedavg) or our FedSGD (mode fedsgd), sampling ``fraction``."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction,
        fraction_evaluate=cfg.fraction_evaluate,
        # The fractions decide how many are sampled; wait until all `clients` are connected.
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.clients,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    if cfg.mode == "fedsgd":
        return FedSGD(
            param_keys=param_keys,
            server_lr=cfg.server_lr,
            server_momentum=cfg.server_momentum,
            optimizer=cfg.server_optimizer,
            **common,
        )
    return FedAvg(**common)


class RoundLog:
    """Writes ``rounds.jsonl`` and the per-round progress line, from the central evaluation.

    :meth:`on_evaluation` is called with the central evaluation once before training
    (round 0) and after each round, once client training and evaluation are done; so at
    that point the round's record in :attr:`Observed.rounds` is complete.
    """

    def __init__(
        self,
        out_dir: Path,
        observed: Observed,
        rounds: int,
        progress: bool,
        *,
        resume_after: int = 0,
    ) -> None:
        """``resume_after``: keep the rows of rounds 1..k already written, drop later ones
        (written after the last checkpoint, they are about to be redone)."""
        self.path = out_dir / "rounds.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_after and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by the interruption
                    continue
                if isinstance(row, dict) and 1 <= row.get("round", 0) <= resume_after:
                    self.rows.append(row)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
        self.observed = observed
        self.rounds = rounds
        self.initial: dict[str, float] = {}
        self.bar = tqdm(
            total=rounds,
            initial=resume_after,
            desc="rounds",
            unit="round",
            disable=None if progress else True,
        )
        self._last = time.perf_counter()

    def on_evaluation(self, server_round: int, loss: float, accuracy: float) -> None:
        now = time.perf_counter()
        if server_round == 0:
            self.initial = {"test_loss": loss, "test_accuracy": accuracy}
            self._last = now
            return
        rec = self.observed.record(server_round)
        train = rec.train_metrics or {}
        ev = rec.evaluate_metrics or {}
        row = {
            "round": server_round,
            "clients": rec.clients,
            "partitions": rec.partitions,
            "rejected": rec.rejected,
            "failed": rec.failed,
            "dropped": rec.dropped,
            "train_loss": train.get("train-loss"),
            "train_accuracy": train.get("train-accuracy"),
            "client_eval_loss": ev.get("eval-loss"),
            "client_eval_accuracy": ev.get("eval-accuracy"),
            "test_loss": loss,
            "test_accuracy": accuracy,
            "seconds": round(now - self._last, 3),
            "skipped": rec.skipped,
            "rejections": rec.rejections,
            "failures": rec.failures,
            "dropped_nodes": rec.dropped_nodes,
            "evaluate_failures": rec.evaluate_failures,
        }
        self._last = now
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        tl = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "n/a"
        extra = (
            f" (rejected {rec.rejected}, failed {rec.failed}, no reply {rec.dropped})"
            if rec.rejected or rec.failed or rec.dropped
            else ""
        )
        if rec.skipped:
            extra += f" [round skipped, model unchanged: {rec.skipped}]"
        leak = [s(server_round) for o in self.observed.observers if (s := _round_status(o))]
        leak_text = "".join(f" | {t}" for t in leak if t)
        tqdm.write(
            f"round {server_round}/{self.rounds}: {rec.clients} clients replied{extra}, "
            f"train loss {tl}, test accuracy {accuracy:.4f} ({row['seconds']:.1f} s){leak_text}"
        )

    def close(self) -> None:
        self.bar.close()


def _round_status(observer: Observer) -> Any:
    """An observer's per-round console text hook (the auditor's leakage), if it has one."""
    return getattr(observer, "round_status", None)


def make_validator(cfg: task.RunConfig, strategy: Strategy) -> ReplyValidator:
    """The reply checks of ``cfg`` (norm bound, byte limit, quorum) for ``strategy``."""
    return ReplyValidator.from_limits(
        getattr(strategy, "reply_keys", None),
        getattr(strategy, "weighted_by_key", "num-examples"),
        max_update_norm=cfg.max_update_norm,
        max_reply_mb=cfg.max_reply_mb,
        min_replies=cfg.min_replies,
    )


def load_resume_checkpoint(cfg: task.RunConfig, out_dir: str | Path) -> ckpt_mod.Checkpoint:
    """The validated checkpoint in ``out_dir`` for resuming ``cfg``; CheckpointError if not."""
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    reference = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    return ckpt_mod.load_checkpoint(
        out_dir, config=cfg.to_config(), reference=reference.state_dict()
    )


class PartitionOrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes in partition order.

    Flower samples nodes with ``random.sample`` over ``get_node_ids()``, whose order follows
    the node ids, and these are random per run (simulation) or per registration. Ordered by
    partition id, the same seeded ``random`` state samples the same partitions in every run,
    so a resumed run samples what the uninterrupted one would have. Each node is asked its
    partition id once (a ``query`` message); nodes that do not answer within ``timeout``
    come last, by node id. With ``reseed`` set, ``random`` is seeded with it just before the
    list is returned, i.e. right before Flower samples from it: other threads (Flower's retry
    jitter) also draw from the global ``random``, so a seed set earlier may be disturbed.
    Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, timeout: float, partitions: dict[int, int]) -> None:
        self.grid = grid
        self.timeout = timeout
        self.partitions = partitions  # node id -> partition id (shared with Observed)
        self._asked: set[int] = set()
        self.reseed: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> list[int]:
        nodes = list(self.grid.get_node_ids())
        unknown = [n for n in nodes if n not in self.partitions and n not in self._asked]
        if unknown:
            self._ask(unknown)
        ordered = sorted(
            nodes, key=lambda n: (n not in self.partitions, self.partitions.get(n, 0), n)
        )
        if self.reseed is not None:
            random.seed(self.reseed)
        return ordered

    def _ask(self, nodes: list[int]) -> None:
        self._asked.update(nodes)
        messages = [
            Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        try:
            replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        except Exception:  # ordering is a nicety: never fail the run for it
            log.exception("could not ask %d nodes for their partition ids", len(nodes))
            return
        for reply in replies:
            try:
                pid = reply.content["metrics"]["partition-id"]
            except Exception:  # error replies, old ClientApps: order by node id
                continue
            if isinstance(pid, int) and not isinstance(pid, bool):
                self.partitions[reply.metadata.src_node_id] = pid


def _seed_round(seed: int, server_round: int) -> tuple[int, int]:
    """Seed the server's RNGs from (seed, round) alone, so a resumed run samples the same
    nodes as an uninterrupted one (Flower samples with the ``random`` module); returns the
    seeds of the round's train and evaluate sampling."""
    s, s_train, s_eval = task.derive_seeds(seed, server_round, -1, n=3)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s_train, s_eval


def train_rounds(
    observed: Observed,
    grid: Grid,
    arrays: ArrayRecord,
    cfg: task.RunConfig,
    *,
    first_round: int = 1,
    evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    after_round: Callable[[int, ArrayRecord, Any], None] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round..cfg.rounds`` as Flower's ``Strategy.start`` runs them (train,
    client evaluation, central evaluation), then ``after_round(round, arrays, result)``
    with the central evaluation's result (None without ``evaluate_fn``).

    Unlike ``start``, it can begin at any round (resume), seeds each round from
    (seed, round), and after the first round samples whichever nodes are online instead of
    waiting for all ``cfg.clients``: a node that left must not stall the run. And it does
    not wait for a round's evaluation before sending the next round's training, which
    starts from the same model: round r's evaluate messages are pushed right after its
    aggregation, round r+1's train messages right behind them, and round r ends (its
    replies aggregated, then ``after_round``) while the clients train for r+1. The central
    evaluation, ``evaluate_fn(round, arrays)``, runs on a thread of its own meanwhile, and
    ``after_round`` waits for it (and gets its error). Each phase may take up to
    ``cfg.round_timeout`` seconds; a round's training is timed from when its clients'
    evaluation of the previous model is in. Returns the final global arrays.
    """
    train_config = ConfigRecord(cfg.to_config())
    evaluate_config = ConfigRecord(cfg.to_config())
    inner = observed.strategy
    reorder = grid if isinstance(grid, PartitionOrderedGrid) else None
    with ThreadPoolExecutor(1, thread_name_prefix="central-evaluation") as central:

        def start_evaluation(
            server_round: int, arrays: ArrayRecord, s_eval: int
        ) -> tuple[int, ArrayRecord, list[str], Any]:
            if reorder is not None:
                reorder.reseed = s_eval
            result = None
            if evaluate_fn is not None:  # beside the clients' evaluation of the same model
                result = central.submit(evaluate_fn, server_round, arrays)
            messages = observed.configure_evaluate(server_round, arrays, evaluate_config, grid)
            return server_round, arrays, list(grid.push_messages(messages)), result

        def finish_evaluation(
            server_round: int, arrays: ArrayRecord, ids: list[str], result: Any
        ) -> None:
            replies = collect_replies(grid, ids, cfg.round_timeout)
            observed.aggregate_evaluate(server_round, replies)
            del replies
            stats = None if result is None else result.result()
            if after_round is not None:
                after_round(server_round, arrays, stats)

        evaluation = None  # the previous round's, in flight
        for server_round in range(first_round, cfg.rounds + 1):
            s_train, s_eval = _seed_round(cfg.seed, server_round)
            if reorder is not None:
                reorder.reseed = s_train
            messages = observed.configure_train(server_round, arrays, train_config, grid)
            train_ids = list(grid.push_messages(messages))
            del messages
            if evaluation is not None:
                finish_evaluation(*evaluation)
            replies = collect_replies(grid, train_ids, cfg.round_timeout)
            new, _ = observed.aggregate_train(server_round, replies)
            del replies  # the round's model-sized messages (emptied by Observed): let them go
            heap.release_freed_memory(min_free=heap.TRIM_MIN_FREE)
            if new is not None:
                arrays = new
            if hasattr(inner, "min_available_nodes"):
                inner.min_available_nodes = 1
            evaluation = start_evaluation(server_round, arrays, s_eval)
        if evaluation is not None:
            finish_evaluation(*evaluation)
    return arrays


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
    if isinstance(getattr(grid, "pull_interval", None), float):
        # Flower's in-memory grid (simulation) polls for replies every 0.1 s, a dict lookup;
        # with client messages of tens of ms that idled the actors ~0.1 s a round.
        grid.pull_interval = min(grid.pull_interval, 0.005)  # type: ignore[attr-defined]
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_config(), indent=2) + "\n")
    observed = Observed(strategy, observers, make_validator(cfg, strategy), sort_replies=True)
    done = resumed.round if resumed is not None else 0
    if cfg.fraction < 1 or cfg.fraction_evaluate < 1:  # sampling: make it node-id-free
        grid = PartitionOrderedGrid(  # type: ignore[assignment]
            grid, min(cfg.round_timeout, 120.0), observed.partitions
        )
    round_log = RoundLog(out, observed, cfg.rounds, progress, resume_after=done)
    if resumed is not None:
        round_log.initial = dict(resumed.initial)

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
        writer.submit(
            lambda: ckpt_mod.Checkpoint(
                round=server_round,
                config=cfg.to_config(),
                model=arrays.to_torch_state_dict(),
                strategy=state,
                rng=rng,
                initial=initial,
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
    torch.save(arrays.to_torch_state_dict(), out / "model.pt")
    summary = {
        "rounds": len(round_log.rows),
        "resumed_after": done or None,
        "initial": round_log.initial,
        "final_test_accuracy": round_log.rows[-1]["test_accuracy"] if round_log.rows else None,
        "seconds": round(time.perf_counter() - started, 3),
        "data_source": bundle.source,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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


def make_server_app(
    cfg: task.RunConfig,
    out_dir: str | Path,
    *,
    observers: Sequence[Observer] = (),
    progress: bool = True,
    resume: bool = False,
    grid_wrapper: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp that runs ``cfg`` (for ``run_simulation``, which ignores run configs).

    ``grid_wrapper``: applied to the Grid that Flower gives the app (simulate.py's
    :class:`~strategies.ray_transport.SharedModelGrid`).
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        if grid_wrapper is not None:
            grid = grid_wrapper(grid)
        run_federation(grid, cfg, out_dir, observers=observers, progress=progress, resume=resume)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run`` / the SuperLink: the config comes from the run config."""
    cfg = task.RunConfig.from_mapping(context.run_config)
    out = str(cfg.extra.get("out-dir") or "") or default_out_dir()
    resume = str(cfg.extra.get("resume", False)).strip().lower() in ("1", "true", "yes")
    if resume and not cfg.extra.get("out-dir"):
        raise ValueError("resume needs out-dir: the run directory holding checkpoint.pt")
    if resume:  # fail before the audit starts workers
        load_resume_checkpoint(cfg, out)
    # The honest-but-curious audit, if the run config asks for it (no ground truth here).
    audit = audit_from_run_config(context.run_config, out, seed=cfg.seed)
    run_federation(
        grid, cfg, out, observers=[audit] if audit else (), progress=False, resume=resume
    )


# --------------------------------------------------------------------------------------------
# Command-line flags (shared with simulate.py)


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _defense_list(value: str) -> str:
    try:
        parse_defenses(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def add_training_args(parser: argparse.ArgumentParser, *, default_clients: int) -> None:
    """The training flags of simulate.py and server.py (defaults: :class:`task.RunConfig`)."""
    d = task.RunConfig()
    lower = str.lower
    g = parser.add_argument_group("training")
    g.add_argument(
        "--clients", type=_positive_int, default=default_clients, help="number of clients"
    )
    g.add_argument("--rounds", type=_positive_int, default=d.rounds)
    g.add_argument("--mode", type=lower, choices=task.MODES, default=d.mode)
    g.add_argument("--dataset", type=lower, choices=data_mod.DATASETS, default=d.dataset)
    g.add_argument(
        "--data-dir", default="", help="dataset directory (default: data pack, else embedded)"
    )
    g.add_argument("--model", type=lower, choices=MODELS, default=d.model)
    g.add_argument(
        "--defense",
        action="append",
        type=_defense_list,
        metavar="NAME[,NAME]",
        help=f"repeatable or comma list; one of: {', '.join(DEFENSES)} (default: none)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    g.add_argument("--local-epochs", type=float, default=d.local_epochs, help="FedAvg local epochs")
    g.add_argument(
        "--local-steps",
        type=int,
        default=d.local_steps,
        help="FedAvg local steps (>0 overrides epochs)",
    )
    g.add_argument("--lr", type=float, default=d.lr, help="client SGD learning rate (FedAvg)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="client SGD momentum")
    g.add_argument(
        "--server-lr", type=float, default=d.server_lr, help="FedSGD server learning rate"
    )
    g.add_argument("--server-momentum", type=float, default=d.server_momentum)
    g.add_argument(
        "--server-optimizer", type=lower, choices=task.SERVER_OPTIMIZERS, default=d.server_optimizer
    )
    g.add_argument("--partition", type=lower, choices=SCHEMES, default=d.partition)
    g.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
    g.add_argument("--classes-per-client", type=_positive_int, default=d.classes_per_client)
    g.add_argument(
        "--fraction", type=float, default=d.fraction, help="fraction of clients per round"
    )
    g.add_argument("--fraction-evaluate", type=float, default=d.fraction_evaluate)
    g.add_argument("--clip", type=float, default=d.clip, help="noise defense: L2 clipping bound C")
    g.add_argument("--sigma", type=float, default=d.sigma, help="noise defense: std = sigma * C")
    g.add_argument(
        "--prune-rate", type=float, default=d.prune_rate, help="prune defense: fraction zeroed"
    )
    g.add_argument(
        "--latent-dim", type=_positive_int, default=d.latent_dim, help="PRECODE latent size"
    )
    g.add_argument("--beta", type=float, default=d.beta, help="PRECODE KL weight")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--audit-ground-truth",
        action="store_true",
        help="clients also report the train-split indices they used (evaluation only)",
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds to wait for replies, per phase (train, evaluate); later replies are lost",
    )
    g.add_argument("--fault-injection", default="", help=argparse.SUPPRESS)
    g.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    r = parser.add_argument_group("reliability")
    r.add_argument(
        "--max-update-norm",
        type=float,
        default=d.max_update_norm,
        help="reject updates whose L2 norm (FedSGD: gradient; FedAvg: weights - global) "
        "exceeds this (default 0: no bound)",
    )
    r.add_argument(
        "--max-reply-mb",
        type=float,
        default=d.max_reply_mb,
        help="reject replies larger than this many MiB (default 0: twice the model + 8 MiB)",
    )
    r.add_argument(
        "--min-replies",
        type=_positive_int,
        default=d.min_replies,
        help="skip a round (model unchanged) with fewer valid replies than this",
    )
    r.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its last completed round (same flags; --rounds may "
        "grow); results are appended there",
    )


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> task.RunConfig:
    """The RunConfig of parsed flags; invalid combinations exit via ``parser.error``."""
    try:
        return task.RunConfig(
            mode=args.mode,
            dataset=args.dataset,
            data_dir=args.data_dir,
            model=args.model,
            defenses=parse_defenses(args.defense or ()),
            latent_dim=args.latent_dim,
            beta=args.beta,
            clip=args.clip,
            sigma=args.sigma,
            prune_rate=args.prune_rate,
            batch_size=args.batch_size,
            local_epochs=args.local_epochs,
            local_steps=args.local_steps,
            lr=args.lr,
            momentum=args.momentum,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            partition=args.partition,
            alpha=args.alpha,
            classes_per_client=args.classes_per_client,
            clients=args.clients,
            rounds=args.rounds,
            fraction=args.fraction,
            fraction_evaluate=args.fraction_evaluate,
            seed=args.seed,
            audit_ground_truth=args.audit_ground_truth,
            round_timeout=args.round_timeout,
            fault_injection=args.fault_injection,
            max_update_norm=args.max_update_norm,
            max_reply_mb=args.max_reply_mb,
            min_replies=args.min_replies,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


# --------------------------------------------------------------------------------------------
# Submitting the app to a SuperLink


def _toml_value(v: bool | int | float | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def flwr_config_toml(address: str, *, insecure: bool, root_certificates: str | None) -> str:
    """A Flower ``config.toml`` with one default SuperLink connection named ``target``."""
    lines = ["[superlink]", 'default = "target"', "", "[superlink.target]"]
    lines.append(f"address = {json.dumps(address)}")
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"


def _last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (flwr's ``--format json``)."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def submit(
    run_config: dict[str, bool | int | float | str],
    *,
    superlink: str | None,
    insecure: bool = False,
    root_certificates: str | None = None,
    connection: str | None = None,
    stream: bool = True,
    app_dir: Path = APP_DIR,
) -> tuple[int, str | None, str | None]:
    """Submit ``app_dir`` with ``run_config``; return (exit status, run id, final status).

    ``flwr run --format json`` starts the run; with ``stream`` its log is then followed
    with ``flwr log`` until the run ends, and ``flwr ls`` reports how it ended.
    """
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    with tempfile.TemporaryDirectory(prefix="precode-flwr-") as tmp:
        env = dict(os.environ)
        overrides = Path(tmp) / "run_config.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        if connection is None:
            home = Path(tmp) / "home"
            home.mkdir()
            (home / "config.toml").write_text(
                flwr_config_toml(
                    superlink or "", insecure=insecure, root_certificates=root_certificates
                )
            )
            env["FLWR_HOME"] = str(home)
            connection = "target"

        def flwr_cmd(*args: str, capture: bool) -> subprocess.CompletedProcess[str]:
            cmd = [flwr, *args]
            print("$", shlex.join(cmd), flush=True)
            return subprocess.run(cmd, env=env, check=False, text=True, capture_output=capture)

        started = flwr_cmd(
            "run", str(app_dir), connection, "--run-config", str(overrides), "--format", "json",
            capture=True,
        )  # fmt: skip
        run_id = _last_json(started.stdout).get("run-id")
        if started.returncode != 0 or not run_id:
            sys.stderr.write(started.stdout + started.stderr)
            return started.returncode or 1, None, None
        print(f"started run {run_id}", flush=True)
        if not stream:
            return 0, str(run_id), None
        flwr_cmd("log", str(run_id), connection, "--stream", capture=False)
        listed = flwr_cmd(
            "ls", connection, "--run-id", str(run_id), "--format", "json", capture=True
        )
        status = _run_status(_last_json(listed.stdout))
        ok = status is not None and "completed" in status
        return (0 if ok else 1), str(run_id), status


def _run_status(listing: dict[str, Any]) -> str | None:
    """The status of the single run in ``flwr ls --run-id ... --format json`` output."""
    runs = listing.get("runs") or []
    return str(runs[0].get("status")) if runs else None


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="server.py",
        description="Submit the PRECODE federation to a running Flower SuperLink.",
    )
    c = parser.add_argument_group("connection")
    c.add_argument(
        "--superlink", default="127.0.0.1:9093", help="SuperLink address host:port (Control API)"
    )
    c.add_argument("--insecure", action="store_true", help="plain HTTP (no TLS)")
    c.add_argument("--root-certificates", default=None, help="CA certificate (PEM) for TLS")
    c.add_argument(
        "--connection",
        default=None,
        help="use this named connection from $FLWR_HOME/config.toml instead of --superlink",
    )
    c.add_argument("--no-stream", action="store_true", help="return after submitting")
    add_training_args(parser, default_clients=2)
    add_audit_args(parser, simulation=False)
    return parser


INSECURE_WARNING = (
    "WARNING: --insecure: traffic to the SuperLink is plain text and the SuperLink is not "
    "authenticated. Use it only for local tests; see docs/DEPLOYMENT.md for TLS."
)


def out_dir_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """``--resume DIR`` (``--out``, if given, must name the same directory), ``--out``, or
    a fresh ``runs/<timestamp>``."""
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume DIR continues in DIR; --out must be DIR or left out")
        return Path(args.resume)
    return Path(args.out) if args.out else default_out_dir()


def check_resumable(parser: argparse.ArgumentParser, cfg: task.RunConfig, out: Path) -> None:
    """Exit with the reason if ``out`` holds no checkpoint that ``cfg`` can resume."""
    try:
        load_resume_checkpoint(cfg, out)
    except ckpt_mod.CheckpointError as err:
        parser.error(f"--resume: {err}")


def cli(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    if args.insecure and args.root_certificates:
        parser.error("--insecure and --root-certificates contradict; TLS needs only the latter")
    if not args.insecure and not args.root_certificates and args.connection is None:
        parser.error(
            "refusing to connect without TLS: give --root-certificates CA.pem (see "
            "docs/DEPLOYMENT.md), or --insecure for a plain-text local test"
        )
    if args.root_certificates and not Path(args.root_certificates).is_file():
        parser.error(f"--root-certificates: no such file {args.root_certificates}")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    out = out_dir_from_args(parser, args)
    if args.resume and Path(out).exists():  # the SuperLink may see another filesystem
        check_resumable(parser, cfg, out)
    run_config: dict[str, bool | int | float | str] = dict(cfg.to_config())
    # The ServerApp runs in the SuperLink's process tree: give it an absolute path.
    run_config["out-dir"] = str(out.resolve())
    run_config["resume"] = bool(args.resume)
    run_config.update(audit_run_config(args))
    code, run_id, status = submit(
        run_config,
        superlink=args.superlink,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        connection=args.connection,
        stream=not args.no_stream,
    )
    if run_id and not args.no_stream:
        print(f"run {run_id}: {status or 'unknown status'}; results in {out.resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(cli())
