"""The honest-but-curious server auditor as Flower glue: attach it to any Message-API strategy.

    from flwr.serverapp.strategy import FedAvg
    from precode_flower.strategies import Auditor, LocalTraining

    strategy = Auditor(FedAvg(), model=Net, input_shape=(3, 32, 32), mean=(0.5,) * 3,
                       std=(0.5,) * 3, local=LocalTraining(batch_size=32, epochs=1, lr=0.1,
                       momentum=0.9), attacks=["labels", "ig", "fedavg"], out_dir="runs/demo")
    with strategy:          # close() on leaving: waits for pending attacks, writes the summary
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

:class:`Auditor` is an :class:`~strategies.observed.Observed` strategy with an
:class:`AuditObserver`: every round it sees each valid reply exactly as the server received
it, together with the global arrays and the train config that the server sent, and queues
attacks on them in :class:`precode_flower.audit.LeakageAuditor`'s worker processes. It never
sends anything to clients and never touches the replies that the wrapped strategy
aggregates, so ``Auditor(FedAvg())`` aggregates exactly like ``FedAvg()``.

What the auditor attacks is what an honest-but-curious server holds: the clients' model
(``model=``: a class, a zero-argument callable, a template module or ``"pkg.module:Name"``;
without it the project's own model described by the train config) loaded with the global
arrays, and per reply the update: FedSGD gradients (named like ``model.named_parameters()``),
or for weight replies the difference reply - global, with what the server knows of the local
training (``local=``, a :class:`~precode_flower.local_training.LocalTraining`; values found in
the round's train config override it). What nobody stated is guessed, warned about once and
written next to every result and in the verdict ("assumed ...").

Ground truth (scores) only through an explicit channel: ``ground_truth=True`` with the run's
train config ``audit-ground-truth`` on (the project's own clients report ``batch-indices``;
the auditor loads those examples from the clients' own partitioning), or
``ground_truth=partition_fn`` with ``partition_fn(partition_id) -> (images, labels)`` for any
simulated app whose clients report their ``partition-id`` (each reconstruction is scored
against its best match in the partition). The strategy and the attacks never see them.
Without it (deployment) nothing is scored and the summary says why.

Entry points: :func:`add_audit_args` and :func:`audit_from_args` give simulate.py and
server.py their ``--audit*`` flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from precode_flower import data as data_mod
from precode_flower import task
from precode_flower.audit import (
    DEFAULT_SUCCESS_SSIM,
    AuditJob,
    LeakageAuditor,
    UpdateKind,
    validate_attacks,
)
from precode_flower.local_training import LocalTraining
from precode_flower.model_source import ModelSource, model_factory

from .observed import ClientReply, Observed, Observer, RoundContext
from .secagg import AGGREGATE_KEY

log = logging.getLogger(__name__)

__all__ = [
    "AuditObserver",
    "Auditor",
    "DataSpec",
    "LocalTraining",
    "PartitionFn",
    "add_audit_args",
    "audit_from_args",
    "audit_from_run_config",
    "audit_run_config",
    "simulation_ground_truth",
]

#: Train-config key of the explicit evaluation channel (clients report ``batch-indices``).
GROUND_TRUTH_KEY = "audit-ground-truth"
INDICES_KEY = "batch-indices"
#: ``partition_fn(partition_id) -> (images, labels)``: a simulated client's examples.
PartitionFn = Callable[[int], tuple[Any, Any]]
#: The project's own clients train with plain local SGD (momentum from the config).
PROJECT_TRAINING = LocalTraining(optimizer="sgd", weight_decay=0.0)
#: Partitions kept in memory by a ``ground_truth=partition_fn`` audit.
PARTITION_CACHE = 4


@dataclass(frozen=True)
class DataSpec:
    """Input geometry and normalisation of the model's data (for attacks and grids)."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class _RoundSpec:
    """What the server knows of a round's model: how to build it, its data, update kind."""

    model: Callable[[], nn.Module]
    data: DataSpec
    kind: UpdateKind
    defense: str
    cfg: task.RunConfig | None
    training: LocalTraining  # what is known of the local training (merged with the config)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class AuditObserver(Observer):
    """Observer that turns each audited round's replies into :class:`AuditJob` s.

    Args:
        auditor: the :class:`LeakageAuditor` that runs the attacks.
        ground_truth: False (deployment: nothing scored); True: score against the clients'
            true examples when the run's evaluation channel (train config
            ``audit-ground-truth``) provides their indices (the project's own clients); or
            ``partition_fn(partition_id) -> (images, labels)`` (images as the model takes
            them, normalised) for any simulated app whose clients report ``partition-id`` in
            their metrics: each reconstruction is scored against its best match there.
        model: the clients' model: a class, a zero-argument callable, a template module or
            ``"pkg.module:Name"`` (see :func:`precode_flower.model_source.model_factory`);
            needs ``input_shape`` (and ``mean``/``std``, default 0 and 1 per channel).
        input_shape, mean, std: (C, H, W) of one example and the input normalisation.
        local: what the server knows of the clients' local training; values in the round's
            train config override it. Default: nothing (guessed, and the guess is stated).
        model_fn, data_spec: the older form of ``model``: ``model_fn(train_config)`` (a
            module-level function) with a :class:`DataSpec`.
        kind: ``"gradients"`` or ``"weights"``; default from the config's ``mode``
            (``fedsgd`` -> gradients), else weights (Flower's FedAvg, FedProx, ...).
        defense: the defense named in verdicts; default the config's ``defenses``.
        close_timeout: seconds :meth:`close` waits for pending attacks (None: no limit).

    Raises:
        ValueError, TypeError: a model that cannot be built or sent to the workers, or
            inconsistent arguments, before anything runs.
    """

    def __init__(
        self,
        auditor: LeakageAuditor,
        *,
        ground_truth: bool | PartitionFn = False,
        model: ModelSource | None = None,
        input_shape: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        local: LocalTraining | None = None,
        model_fn: Callable[[dict[str, Any]], nn.Module] | None = None,
        data_spec: DataSpec | None = None,
        kind: UpdateKind | None = None,
        defense: str | None = None,
        close_timeout: float | None = 600.0,
    ) -> None:
        if model is not None and model_fn is not None:
            raise ValueError("give model= or model_fn=, not both")
        if model_fn is not None and data_spec is None:
            raise ValueError("model_fn needs data_spec (input shape, mean, std)")
        if model is not None:
            data_spec = data_spec or _data_spec(input_shape, mean, std)
        elif input_shape is not None or mean is not None or std is not None:
            if model_fn is None:
                raise ValueError("input_shape, mean and std describe model=; pass model= too")
        if kind not in (None, "gradients", "weights"):
            raise ValueError(f"kind must be 'gradients' or 'weights', got {kind!r}")
        if local is not None and not isinstance(local, LocalTraining):
            raise TypeError(f"local must be a LocalTraining, got {type(local).__name__}")
        if not isinstance(ground_truth, bool) and not callable(ground_truth):
            raise TypeError("ground_truth must be True/False or partition_fn(partition_id)")
        self.auditor = auditor
        self.ground_truth = ground_truth
        self.model_factory = model_factory(model) if model is not None else None
        self.model_fn = model_fn
        self.data_spec = data_spec
        self.local = local
        self.kind = kind
        self.defense = defense
        self.close_timeout = close_timeout
        self.summary: str | None = None
        self._audited: list[int] = []  # rounds submitted, in order
        self._reported: set[int] = set()
        self._warned_channel = False
        self._warned_guess = False
        self._model_error: str | None = None
        self._model_checked = False
        self._partitions: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        log.info("audit: outputs in %s", auditor.out_dir.resolve())

    # ---- Observer -----------------------------------------------------------------------

    def observe(self, context: RoundContext, replies: list[ClientReply]) -> None:
        """Queue this round's sampled replies; returns once they are copied (never waits)."""
        server_round = context.server_round
        if not replies or not self.auditor.should_audit(server_round):
            return
        by_client = {_client_id(r): r for r in replies}
        chosen = self.auditor.sample_clients(server_round, by_client)
        try:
            spec = self._round_spec(context)
            self._check_once(spec, context.global_arrays, dict(context.train_config))
        except Exception as err:  # e.g. a train config this auditor cannot rebuild a model from
            why = str(err) if isinstance(err, _ModelError) else f"cannot rebuild the model: {err}"
            for client in chosen:
                self.auditor.report_error(server_round, client, why)
            return
        jobs = []
        for client in chosen:
            try:
                jobs.append(self._job(context, by_client[client], client, spec))
            except Exception as err:  # one malformed reply must not cost the others
                self.auditor.report_error(
                    server_round, client, f"{type(err).__name__}: {err}", defense=spec.defense
                )
        if jobs:
            self.auditor.submit_many(jobs)
            self._audited.append(server_round)

    def check_start(
        self, initial_arrays: Mapping[str, Any], train_config: Mapping[str, Any]
    ) -> None:
        """Before the first round: the model must load ``initial_arrays`` and every attack
        must apply to it; guesses are warned about.

        Raises ValueError naming the cause (the keys the model does not have, the attack that
        cannot apply and why).
        """
        context = RoundContext(0, dict(initial_arrays), dict(train_config))
        spec = self._round_spec(context)
        self._check_once(spec, context.global_arrays, context.train_config, strict=True)

    def close(self) -> None:
        """Wait for pending attacks (up to ``close_timeout``), write and print the summary."""
        if self.summary is None:
            self.summary = self.auditor.close(self.close_timeout)

    @property
    def closed(self) -> bool:
        return self.summary is not None

    # ---- console ------------------------------------------------------------------------

    def round_status(self, server_round: int) -> str | None:
        """Leakage text for the console line of ``server_round``.

        Shows the audited rounds whose results are all in and not shown yet (``leak: ...``
        for this round, ``leak r2: ...`` for an earlier one), and which are still pending.
        """
        parts, pending = [], []
        for r in self._audited:
            if r in self._reported or r > server_round:
                continue
            line = self.auditor.round_line(r)
            if line is None:
                pending.append(f"r{r}")
                continue
            self._reported.add(r)
            parts.append(line if r == server_round else line.replace("leak:", f"leak r{r}:", 1))
        if pending:
            parts.append(f"audit pending: {', '.join(pending)}")
        return "; ".join(parts) or None

    # ---- building jobs ------------------------------------------------------------------

    def _round_spec(self, context: RoundContext) -> _RoundSpec:
        config = dict(context.train_config)
        if self.model_factory is not None:
            assert self.data_spec is not None
            model, spec_data, cfg = self.model_factory, self.data_spec, None
            base = self.local.with_defaults() if self.local else LocalTraining()
        elif self.model_fn is not None:
            assert self.data_spec is not None
            model = functools.partial(self.model_fn, config)
            spec_data, cfg = self.data_spec, None
            base = self.local.with_defaults() if self.local else LocalTraining()
        else:
            cfg = task.RunConfig.from_mapping(config)
            bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
            model = functools.partial(
                task.build_model, cfg, bundle.num_classes, tuple(bundle.input_shape)
            )
            spec_data = DataSpec(tuple(bundle.input_shape), bundle.mean, bundle.std)
            base = self.local.with_defaults() if self.local else PROJECT_TRAINING
        kind: UpdateKind = self.kind or (
            "gradients" if str(config.get("mode", "")).lower() == "fedsgd" else "weights"
        )
        defense = self.defense or str(config.get("defenses") or "none")
        return _RoundSpec(model, spec_data, kind, defense, cfg, base.merged(config))

    def _check_once(
        self,
        spec: _RoundSpec,
        global_arrays: Mapping[str, Any],
        config: Mapping[str, Any],
        strict: bool = False,
    ) -> None:
        """Fail fast: the model must load the global arrays (else every job fails with the
        cause); an attack that cannot apply is logged (``strict``: raised); a guessed
        training is warned about once."""
        if self._model_error is not None:
            raise _ModelError(self._model_error)
        if not self._model_checked and global_arrays:
            try:
                model = spec.model()
                state = {k: torch.as_tensor(np.asarray(v)) for k, v in global_arrays.items()}
                model.load_state_dict(state, strict=True)
            except Exception as err:
                name = getattr(self.model_factory, "name", None) or "the auditor's model"
                hint = (
                    "pass model= (the clients' model)"
                    if self.model_factory is None and self.model_fn is None
                    else "is it the clients' model?"
                )
                self._model_error = (
                    f"{name} does not load the global arrays: {type(err).__name__}: "
                    f"{_first_line(err)}; {hint}"
                )
                log.error("audit: %s", self._model_error)
                raise _ModelError(self._model_error) from None
            self._model_checked = True
            problems = _inapplicable(model, spec.data.input_shape, self.auditor)
            if problems:
                text = "attack(s) cannot apply to this model: " + "; ".join(problems)
                log.error("audit: %s", text)  # the other attacks still run
                if strict:
                    raise ValueError(text)
        if spec.kind == "weights" and not self._warned_guess:
            unknown = spec.training.unknown()
            if unknown:
                self._warned_guess = True
                resolved, guessed = spec.training.resolve(1000)
                text = (
                    f"audit: the clients' local training is not fully known ({', '.join(unknown)} "
                    f"unstated: neither local= nor the train config says); the attacks assume "
                    f"{resolved.describe(None, guessed)}. Pass local=LocalTraining(...) to "
                    "describe it; every result states what was assumed."
                )
                log.warning(text)
                warnings.warn(text, UserWarning, stacklevel=2)

    def _job(
        self, context: RoundContext, reply: ClientReply, client: int, spec: _RoundSpec
    ) -> AuditJob:
        training: LocalTraining | None = None
        assumed: list[str] = []
        aggregate = _is_aggregate(reply)
        if spec.kind == "gradients":
            update = dict(reply.arrays)
            examples = reply.num_examples or spec.training.batch_size or 1
            steps, lr, batch = 1, spec.training.lr, examples
        else:
            # The weight update as the server sees it: reply - the global model it answers.
            glob = context.global_arrays
            update = {
                k: v.astype(np.float64) - glob[k].astype(np.float64)
                for k, v in reply.arrays.items()
                if k in glob and np.issubdtype(v.dtype, np.floating)
            }
            update = {k: v.astype(reply.arrays[k].dtype) for k, v in update.items()}
            n = reply.num_examples or spec.training.batch_size or 1
            training, assumed = spec.training.resolve(n)
            if aggregate and training.batch_size is not None:
                # The SecAgg+ mean of m clients' local training, attacked as one client that
                # trained on all their examples with m times the batch (FedSGD: exactly the
                # gradient of their union batch).
                clients = max(1, int(reply.metrics.get("clients", 1)))
                training = dataclasses.replace(training, batch_size=training.batch_size * clients)
            steps = training.total_steps(n)
            examples = training.used_examples(n)
            lr, batch = training.lr, training.batch_size
        truth, truth_kind, why = self._ground_truth(context, reply, spec, examples)
        if truth is not None and truth_kind == "batch":
            examples = len(truth[1])
        return AuditJob(
            round=context.server_round,
            client=client,
            model=spec.model,
            update=update,
            kind=spec.kind,
            input_shape=spec.data.input_shape,
            mean=spec.data.mean,
            std=spec.data.std,
            batch_size=examples,
            local_steps=steps,
            lr=float(lr) if lr is not None else None,
            local_batch_size=batch or None,
            global_state=context.global_arrays,
            ground_truth=truth,
            defense=spec.defense,
            training=training,
            assumed=tuple(assumed),
            truth_kind=truth_kind,
            unscored_reason=why,
            aggregate_only=aggregate,
        )

    def _ground_truth(
        self, context: RoundContext, reply: ClientReply, spec: _RoundSpec, examples: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str, str | None]:
        """(the client's examples or None, "batch" or "partition", why there are none)."""
        if self.ground_truth is False:
            return None, "batch", "no ground truth given to the auditor (as in deployment)"
        if callable(self.ground_truth) and not isinstance(self.ground_truth, bool):
            return self._partition_truth(reply)
        if not _truthy(context.train_config.get(GROUND_TRUTH_KEY)):
            if not self._warned_channel:
                log.warning(
                    "audit: ground truth requested but the run's evaluation channel "
                    "(%s) is off: scores unavailable",
                    GROUND_TRUTH_KEY,
                )
                self._warned_channel = True
            return None, "batch", f"the evaluation channel (train config {GROUND_TRUTH_KEY}) is off"
        indices = reply.metrics.get(INDICES_KEY)
        if spec.cfg is None:
            return (
                None,
                "batch",
                (
                    "ground_truth=True needs the project's own partitioning; for another app "
                    "pass ground_truth=partition_fn"
                ),
            )
        if indices is None:
            return None, "batch", f"the client reported no {INDICES_KEY}"
        if _is_aggregate(reply):
            return self._aggregate_truth(spec, indices), "batch", None
        if reply.partition_id is None:
            return None, "batch", "the client reported no partition-id"
        idx = np.asarray(list(indices), dtype=np.int64)
        if spec.kind == "weights":  # every local step's batch: each example once
            _, first = np.unique(idx, return_index=True)
            idx = idx[np.sort(first)]
        # The clients' own partitioning: the reported indices must be the client's examples.
        cfg = spec.cfg
        part = task.client_data(cfg, reply.partition_id, cfg.clients)
        pos = np.searchsorted(part.train_indices, idx)
        pos = np.clip(pos, 0, max(len(part.train_indices) - 1, 0))
        if len(part.train_indices) == 0 or not np.array_equal(part.train_indices[pos], idx):
            raise ValueError(
                f"reported {INDICES_KEY} are not all in partition {reply.partition_id}"
            )
        if len(idx) != examples:
            log.warning(
                "audit: round %d partition %d reported %d examples, update implies %d",
                context.server_round,
                reply.partition_id,
                len(idx),
                examples,
            )
        where = torch.from_numpy(pos)
        return (part.x_train[where], part.y_train[where]), "batch", None

    @staticmethod
    def _aggregate_truth(spec: _RoundSpec, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples of a SecAgg+ sum, of every client: straight from the train split."""
        assert spec.cfg is not None
        idx = np.asarray(list(indices), dtype=np.int64)
        if spec.kind == "weights":  # every local step's batch: each example once
            _, first = np.unique(idx, return_index=True)
            idx = idx[np.sort(first)]
        bad = ValueError(f"reported {INDICES_KEY} are not in the train split")
        if len(idx) == 0 or idx.min() < 0:
            raise bad
        train = data_mod.load(spec.cfg.dataset, spec.cfg.data_dir or None).train_split
        try:
            return train.rows(idx)
        except IndexError:
            raise bad from None

    def _partition_truth(
        self, reply: ClientReply
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str, str | None]:
        """The reporting client's whole partition, from the user's ``partition_fn``."""
        pid = reply.partition_id
        if pid is None:
            return None, "partition", "the client reported no partition-id in its metrics"
        if pid not in self._partitions:
            fn = self.ground_truth
            assert callable(fn)
            try:
                images, labels = fn(pid)
                x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor)
                                    else images).float()  # fmt: skip
                y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor)
                                    else labels).long().flatten()  # fmt: skip
            except Exception as err:  # the user's hook: its failure is a reason, not a crash
                return None, "partition", f"partition_fn({pid}) failed: {type(err).__name__}: {err}"
            if x.dim() != 4 or len(x) != len(y) or len(x) == 0:
                return (
                    None,
                    "partition",
                    (
                        f"partition_fn({pid}) returned images {tuple(x.shape)} and labels "
                        f"{tuple(y.shape)}; expected (N, C, H, W) and (N,)"
                    ),
                )
            self._partitions[pid] = (x, y)
            while len(self._partitions) > PARTITION_CACHE:
                self._partitions.popitem(last=False)
        self._partitions.move_to_end(pid)
        return self._partitions[pid], "partition", None


def _inapplicable(model: nn.Module, input_shape: Sequence[int], auditor: LeakageAuditor) -> list:
    """Why configured attacks cannot apply to ``model`` at all (structure, not data).

    Checked once at start so that a run does not find out from every job's error row. Only
    the attacks whose requirements are structural are checked here.
    """
    from precode_flower.attacks.analytic import choose_layer
    from precode_flower.attacks.ignore_bottleneck import matched_parameters
    from precode_flower.precode import find_classifier

    options = getattr(auditor, "_options", {})
    checks: dict[str, Callable[[], object]] = {
        "analytic": lambda: choose_layer(
            model, input_shape, options.get("analytic", {}).get("layer")
        ),
        "ignore-bottleneck": lambda: matched_parameters(model, input_shape),
        "labels": lambda: find_classifier(model, input_shape),
    }
    problems = []
    for attack in auditor.attacks:
        check = checks.get(attack)
        if check is None:
            continue
        try:
            check()
        except ValueError as err:
            problems.append(f"{attack}: {err}")
    return problems


class _ModelError(ValueError):
    """The auditor's model cannot attack this run (it does not load the global arrays)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:3])[:400]


def _data_spec(
    input_shape: Sequence[int] | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> DataSpec:
    if input_shape is None or len(tuple(input_shape)) != 3:
        raise ValueError(f"model= needs input_shape=(C, H, W), got {input_shape!r}")
    shape = tuple(int(d) for d in input_shape)
    channels = shape[0]
    mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * channels))
    std = tuple(float(v) for v in (std if std is not None else (1.0,) * channels))
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel)")
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be positive, got {std}")
    return DataSpec(shape, mean, std)  # type: ignore[arg-type]


def _client_id(reply: ClientReply) -> int | str:
    """The partition id where the client reports it (stable across rounds), else the node
    id; ``"aggregate"`` for a SecAgg+ round's sum."""
    if _is_aggregate(reply):
        return "aggregate"
    return reply.partition_id if reply.partition_id is not None else reply.node_id


def _is_aggregate(reply: ClientReply) -> bool:
    """Whether ``reply`` is a SecAgg+ sum (:data:`strategies.secagg.AGGREGATE_KEY`), which
    only the server builds: clients' replies never reach observers in a SecAgg+ round."""
    return bool(reply.metrics.get(AGGREGATE_KEY)) and reply.node_id == 0


class Auditor(Observed):
    """Wraps any Message-API strategy with the leakage auditor; aggregation is unchanged.

    Args:
        strategy: the strategy to wrap (ours, or Flower's FedAvg, FedProx, ...).
        attacks: attack names (see :data:`precode_flower.attacks.ATTACKS`).
        model, input_shape, mean, std, local, ground_truth: the clients' model, its input,
            what is known of their local training and where ground truth comes from; see
            :class:`AuditObserver`.
        every, clients, iterations, time_limit, device, seed, success_ssim, max_pending,
            workers: the audit budget; see :class:`precode_flower.audit.LeakageAuditor`
            (``clients`` is its ``clients_per_round``; None audits every client).
        out_dir: where the audit's outputs go (logged as an absolute path).
        model_fn, data_spec, kind, defense, close_timeout: see :class:`AuditObserver`.
        observers, validator, sort_replies: passed to :class:`Observed`.
        attack_options: per-attack options, e.g. ``{"ig": {"tv": 1e-4}}``.
        references: images none of the clients trained on (e.g. test images,
            :func:`precode_flower.data.reference_pool`): scored reconstructions are also
            tested for re-identification against them; see
            :class:`precode_flower.audit.LeakageAuditor`.

    Use it as a context manager (``with strategy: strategy.start(...)``) or call
    :meth:`close` at the end: that waits for the pending attacks and writes the summary. An
    auditor that is never closed warns and is closed when it is garbage-collected or at
    interpreter exit, whichever comes first.

    Raises:
        ValueError, TypeError: an unknown attack, a senseless budget, or a model that cannot
            be built or sent to the workers, before the run starts; :meth:`start` also
            raises when the model does not load the initial arrays.
    """

    def __init__(
        self,
        strategy: Strategy,
        attacks: Sequence[str] | str = ("analytic",),
        *,
        model: ModelSource | None = None,
        input_shape: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        local: LocalTraining | None = None,
        ground_truth: bool | PartitionFn = False,
        every: int = 1,
        clients: int | None = 2,
        iterations: int | None = None,
        time_limit: float | None = None,
        device: str = "cpu",
        out_dir: str | os.PathLike[str] = "audit",
        seed: int = 0,
        success_ssim: float = DEFAULT_SUCCESS_SSIM,
        max_pending: int = 16,
        workers: int = 1,
        model_fn: Callable[[dict[str, Any]], nn.Module] | None = None,
        data_spec: DataSpec | None = None,
        kind: UpdateKind | None = None,
        defense: str | None = None,
        close_timeout: float | None = 600.0,
        attack_options: Mapping[str, Mapping[str, Any]] | None = None,
        observers: Sequence[Observer] = (),
        validator: Any = None,
        sort_replies: bool = False,
        progress: bool = True,
        references: torch.Tensor | None = None,
    ) -> None:
        # The model first: a model that cannot be built fails before any process starts.
        factory = model_factory(model) if model is not None else None
        leakage = LeakageAuditor(
            out_dir,
            attacks,
            every=every,
            clients_per_round=clients,
            iterations=iterations,
            time_limit=time_limit,
            device=device,
            success_ssim=success_ssim,
            max_pending=max_pending,
            workers=workers,
            seed=seed,
            attack_options=attack_options,
            progress=progress,
            references=references,
        )
        try:
            self.audit = AuditObserver(
                leakage,
                ground_truth=ground_truth,
                model=factory,
                input_shape=input_shape,
                mean=mean,
                std=std,
                local=local,
                model_fn=model_fn,
                data_spec=data_spec,
                kind=kind,
                defense=defense,
                close_timeout=close_timeout,
            )
        except BaseException:
            leakage.close(0)
            raise
        super().__init__(strategy, [*observers, self.audit], validator, sort_replies=sort_replies)
        # Not self: the finaliser must not keep the auditor alive.
        self._finalizer = weakref.finalize(self, _finalise_unclosed, self.audit)

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    ) -> Result:
        """Flower's :meth:`Strategy.start`, after checking that the model loads
        ``initial_arrays`` (ValueError naming the cause) and warning about guessed training."""
        arrays = {k: v.numpy() for k, v in initial_arrays.items()}
        self.audit.check_start(arrays, dict(train_config or {}))
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def close(self) -> None:
        """Close every observer, the audit included: waits for pending attacks (with its
        limit) and writes the summary. Idempotent."""
        self._finalizer.detach()
        super().close()


def _finalise_unclosed(observer: AuditObserver) -> None:
    """Close an auditor nobody closed (garbage collection or interpreter exit), loudly."""
    if observer.closed:
        return
    text = (
        "audit: Auditor was never closed; closing it now so that the audit is not lost "
        f"(outputs in {observer.auditor.out_dir.resolve()}). Use `with strategy:` or call "
        "strategy.close() after strategy.start()."
    )
    log.warning(text)
    warnings.warn(text, RuntimeWarning, stacklevel=1)
    observer.close()


# --------------------------------------------------------------------------------------------
# Command-line flags (simulate.py, server.py) and run-config keys (flwr run)


def _attack_list(value: str) -> tuple[str, ...]:
    try:
        return validate_attacks(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
        if not number > 0 or (isinstance(number, float) and not math.isfinite(number)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
        return number

    return parse


def add_audit_args(parser: argparse.ArgumentParser, *, simulation: bool) -> None:
    """The ``--audit*`` flags (and, in simulation, ``--no-audit-ground-truth``).

    ``--audit-ground-truth`` itself is a training flag (the clients must report their batch
    indices); see :func:`simulation_ground_truth` for how simulation resolves the pair.
    """
    g = parser.add_argument_group(
        "leakage audit (honest-but-curious server)",
        "Attack the clients' updates off the aggregation path and report how much leaks. "
        + (
            "In simulation --audit turns the explicit evaluation channel on by default "
            "(clients report their batch indices, the auditor scores against those examples); "
            "--no-audit-ground-truth audits without it, as in deployment."
            if simulation
            else "In deployment there is no ground truth: scores are unavailable and the "
            "summary shows the reference-free evidence."
        ),
    )
    g.add_argument(
        "--audit",
        type=_attack_list,
        default=None,
        metavar="ATTACK[,ATTACK]",
        help="attacks to run, e.g. analytic,ig,ignore-bottleneck (default: no audit)",
    )
    g.add_argument("--audit-every", type=_positive(int), default=1, help="audit every k-th round")
    g.add_argument(
        "--audit-clients", type=_positive(int), default=2, help="clients audited per round"
    )
    g.add_argument(
        "--audit-iterations",
        type=_positive(int),
        default=None,
        help="iteration budget of each iterative attack (default: the attack's)",
    )
    g.add_argument(
        "--audit-time-limit",
        type=_positive(float),
        default=None,
        help="wall-time limit per attack run in seconds (default: none)",
    )
    g.add_argument("--audit-device", default="cpu", help="device of the attacks (cpu, cuda)")
    g.add_argument(
        "--audit-memory-gb",
        type=_positive(float),
        default=None,
        help="memory the attacks may use, in GB (default: half the memory available at "
        "start); a run estimated above it is skipped, a worker exceeding it fails that run",
    )
    g.add_argument(
        "--audit-wait",
        type=_positive(float),
        default=600.0,
        help="seconds to wait at the end for pending attacks",
    )
    if simulation:
        g.add_argument(
            "--no-audit-ground-truth",
            action="store_true",
            help="audit without the evaluation channel, as in deployment (no scores)",
        )


def simulation_ground_truth(args: argparse.Namespace) -> bool:
    """Whether a simulation runs the evaluation channel: ``--audit-ground-truth``, or
    ``--audit`` without ``--no-audit-ground-truth``. ValueError if both flags are given."""
    if getattr(args, "no_audit_ground_truth", False):
        if getattr(args, "audit_ground_truth", False):
            raise ValueError("--audit-ground-truth and --no-audit-ground-truth contradict")
        return False
    return bool(getattr(args, "audit_ground_truth", False) or args.audit)


def audit_from_args(
    args: argparse.Namespace,
    out_dir: str | os.PathLike[str],
    *,
    ground_truth: bool,
    references: torch.Tensor | None = None,
) -> AuditObserver | None:
    """The observer the flags ask for (None without ``--audit``); ValueError on bad budgets.

    With ``args.resume`` set the audit continues the run directory's ``leakage.jsonl``;
    ``references`` is the re-identification pool (:class:`LeakageAuditor`).
    """
    if not args.audit:
        return None
    auditor = LeakageAuditor(
        out_dir,
        args.audit,
        every=args.audit_every,
        clients_per_round=args.audit_clients,
        iterations=args.audit_iterations,
        time_limit=args.audit_time_limit,
        device=args.audit_device,
        memory_gb=getattr(args, "audit_memory_gb", None),
        seed=getattr(args, "seed", 0),
        append=bool(getattr(args, "resume", None)),  # a resumed run keeps its earlier rows
        references=references,
    )
    return AuditObserver(auditor, ground_truth=ground_truth, close_timeout=args.audit_wait)


def audit_run_config(args: argparse.Namespace) -> dict[str, bool | int | float | str]:
    """The ``--audit*`` flags as run-config keys, for a ServerApp started by ``flwr run``.

    Empty without ``--audit``. Unset budgets are 0 (run configs have no null).
    """
    if not args.audit:
        return {}
    return {
        "audit": ",".join(args.audit),
        "audit-every": args.audit_every,
        "audit-clients": args.audit_clients,
        "audit-iterations": args.audit_iterations or 0,
        "audit-time-limit": args.audit_time_limit or 0.0,
        "audit-device": args.audit_device,
        "audit-wait": args.audit_wait,
        "audit-memory-gb": getattr(args, "audit_memory_gb", None) or 0.0,
    }


def audit_from_run_config(
    config: Mapping[str, Any], out_dir: str | os.PathLike[str], *, seed: int = 0
) -> AuditObserver | None:
    """The deployment auditor described by run-config keys (see :func:`audit_run_config`).

    Never with ground truth: a deployed server has none. None when ``audit`` is empty;
    ValueError on an unknown attack or a senseless budget.
    """
    attacks = str(config.get("audit", "") or "").strip()
    if not attacks:
        return None

    def number(key: str, kind: type, default: Any) -> Any:
        value = config.get(key)
        return default if value in (None, "", 0, 0.0) else kind(value)

    args = argparse.Namespace(
        audit=validate_attacks(attacks),
        audit_every=number("audit-every", int, 1),
        audit_clients=number("audit-clients", int, 2),
        audit_iterations=number("audit-iterations", int, None),
        audit_time_limit=number("audit-time-limit", float, None),
        audit_device=str(config.get("audit-device") or "cpu"),
        audit_wait=number("audit-wait", float, 600.0),
        audit_memory_gb=number("audit-memory-gb", float, None),
        seed=seed,
        resume=_truthy(config.get("resume", False)),
    )
    return audit_from_args(args, out_dir, ground_truth=False)
