"""The honest-but-curious server auditor as Flower glue: attach it to any Message-API strategy.

    from flwr.serverapp.strategy import FedAvg
    from precode_flower.strategies.auditor import Auditor

    strategy = Auditor(FedAvg(), attacks=["analytic", "ig"], clients=2, iterations=2000,
                       time_limit=120, out_dir="runs/demo")
    ...                     # strategy.start(...) as usual; then
    strategy.close()        # waits for pending attacks (with a limit), writes the summary

:class:`Auditor` is an :class:`~strategies.observed.Observed` strategy with an
:class:`AuditObserver`: every round it sees each valid reply exactly as the server received
it, together with the global arrays and the train config that the server sent, and queues
attacks on them in :class:`precode_flower.audit.LeakageAuditor`'s worker processes. It never
sends anything to clients and never touches the replies that the wrapped strategy
aggregates, so ``Auditor(FedAvg())`` aggregates exactly like ``FedAvg()``.

What the auditor attacks is what an honest-but-curious server holds: the model rebuilt from
the round's train config plus the global arrays, and per reply the update: FedSGD gradients
(named like ``model.named_parameters()``), or for weight replies the difference
reply - global with the local training config the server sent (batch size, steps, lr).

Ground truth only through the explicit evaluation channel: when the auditor is created
with ``ground_truth=True`` and the run's train config has ``audit-ground-truth`` on, clients
report ``batch-indices`` (train-split indices) in their metrics; the auditor then loads
those examples itself from the dataset and the client's partition (the clients' own
partitioning, :func:`precode_flower.task.client_data`) to score the reconstructions. The
strategy and the attacks never see them. Without it (deployment) nothing is scored and the
summary says so.

Entry points: :func:`add_audit_args` and :func:`audit_from_args` give simulate.py and
server.py their ``--audit*`` flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
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

from .observed import ClientReply, Observed, Observer, RoundContext

log = logging.getLogger(__name__)

__all__ = [
    "AuditObserver",
    "Auditor",
    "DataSpec",
    "add_audit_args",
    "audit_from_args",
    "audit_from_run_config",
    "audit_run_config",
    "simulation_ground_truth",
]

#: Train-config key of the explicit evaluation channel (clients report ``batch-indices``).
GROUND_TRUTH_KEY = "audit-ground-truth"
INDICES_KEY = "batch-indices"


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


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class AuditObserver(Observer):
    """Observer that turns each audited round's replies into :class:`AuditJob` s.

    Args:
        auditor: the :class:`LeakageAuditor` that runs the attacks.
        ground_truth: score against the clients' true examples when the run's evaluation
            channel (train config ``audit-ground-truth``) provides their indices.
        model_fn: builds the (untrained) model from the round's train config, for models not
            described by :class:`precode_flower.task.RunConfig`; must be picklable
            (module-level). Default: :func:`precode_flower.task.build_model`.
        data_spec: input shape and normalisation when ``model_fn`` is given (else read from
            the dataset named in the train config).
        kind: ``"gradients"`` or ``"weights"``; default from the config's ``mode``
            (``fedsgd`` -> gradients), else weights (Flower's FedAvg, FedProx, ...).
        defense: the defense named in verdicts; default the config's ``defenses``.
        close_timeout: seconds :meth:`close` waits for pending attacks (None: no limit).
    """

    def __init__(
        self,
        auditor: LeakageAuditor,
        *,
        ground_truth: bool = False,
        model_fn: Callable[[dict[str, Any]], nn.Module] | None = None,
        data_spec: DataSpec | None = None,
        kind: UpdateKind | None = None,
        defense: str | None = None,
        close_timeout: float | None = 600.0,
    ) -> None:
        if model_fn is not None and data_spec is None:
            raise ValueError("model_fn needs data_spec (input shape, mean, std)")
        if kind not in (None, "gradients", "weights"):
            raise ValueError(f"kind must be 'gradients' or 'weights', got {kind!r}")
        self.auditor = auditor
        self.ground_truth = ground_truth
        self.model_fn = model_fn
        self.data_spec = data_spec
        self.kind = kind
        self.defense = defense
        self.close_timeout = close_timeout
        self.summary: str | None = None
        self._audited: list[int] = []  # rounds submitted, in order
        self._reported: set[int] = set()
        self._warned_channel = False

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
        except Exception as err:  # e.g. a train config this auditor cannot rebuild a model from
            for client in chosen:
                self.auditor.report_error(server_round, client, f"cannot rebuild the model: {err}")
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

    def close(self) -> None:
        """Wait for pending attacks (up to ``close_timeout``), write and print the summary."""
        if self.summary is None:
            self.summary = self.auditor.close(self.close_timeout)

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
        if self.model_fn is not None:
            assert self.data_spec is not None
            model = functools.partial(self.model_fn, config)
            spec_data, cfg = self.data_spec, None
        else:
            cfg = task.RunConfig.from_mapping(config)
            bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
            model = functools.partial(
                task.build_model, cfg, bundle.num_classes, tuple(bundle.input_shape)
            )
            spec_data = DataSpec(tuple(bundle.input_shape), bundle.mean, bundle.std)
        kind: UpdateKind = self.kind or (
            "gradients" if str(config.get("mode", "")).lower() == "fedsgd" else "weights"
        )
        defense = self.defense or str(config.get("defenses") or "none")
        return _RoundSpec(model, spec_data, kind, defense, cfg)

    def _job(
        self, context: RoundContext, reply: ClientReply, client: int, spec: _RoundSpec
    ) -> AuditJob:
        config = context.train_config
        batch = int(config.get("batch-size", 0) or 0)
        lr = config.get("lr")
        steps = 1
        if spec.kind == "gradients":
            update = dict(reply.arrays)
            examples = reply.num_examples or batch or 1
        else:
            # The weight update as the server sees it: reply - the global model it answers.
            glob = context.global_arrays
            update = {
                k: v.astype(np.float64) - glob[k].astype(np.float64)
                for k, v in reply.arrays.items()
                if k in glob and np.issubdtype(v.dtype, np.floating)
            }
            update = {k: v.astype(reply.arrays[k].dtype) for k, v in update.items()}
            n = reply.num_examples or batch or 1
            batch = batch or n
            if int(config.get("local-steps", 0) or 0) > 0:
                steps = int(config["local-steps"])
            else:
                epochs = float(config.get("local-epochs", 1.0) or 1.0)
                steps = max(1, round(epochs * math.ceil(n / batch)))
            examples = min(n, steps * batch)
        truth = self._ground_truth(context, reply, spec, examples)
        return AuditJob(
            round=context.server_round,
            client=client,
            model=spec.model,
            update=update,
            kind=spec.kind,
            input_shape=spec.data.input_shape,
            mean=spec.data.mean,
            std=spec.data.std,
            batch_size=len(truth[1]) if truth is not None else examples,
            local_steps=steps,
            lr=float(lr) if lr is not None else None,
            local_batch_size=batch or None,
            global_state=context.global_arrays,
            ground_truth=truth,
            defense=spec.defense,
        )

    def _ground_truth(
        self, context: RoundContext, reply: ClientReply, spec: _RoundSpec, examples: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The client's examples behind the update, from the evaluation channel only."""
        if not self.ground_truth:
            return None
        if not _truthy(context.train_config.get(GROUND_TRUTH_KEY)):
            if not self._warned_channel:
                log.warning(
                    "audit: ground truth requested but the run's evaluation channel "
                    "(%s) is off: scores unavailable",
                    GROUND_TRUTH_KEY,
                )
                self._warned_channel = True
            return None
        indices = reply.metrics.get(INDICES_KEY)
        if indices is None or spec.cfg is None or reply.partition_id is None:
            return None
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
        return part.x_train[where], part.y_train[where]


def _client_id(reply: ClientReply) -> int:
    """The partition id where the client reports it (stable across rounds), else the node id."""
    return reply.partition_id if reply.partition_id is not None else reply.node_id


class Auditor(Observed):
    """Wraps any Message-API strategy with the leakage auditor; aggregation is unchanged.

    Args:
        strategy: the strategy to wrap (ours, or Flower's FedAvg, FedProx, ...).
        attacks: attack names (see :data:`precode_flower.attacks.ATTACKS`).
        every, clients, iterations, time_limit, device, seed, success_ssim, max_pending,
            workers: the audit budget; see :class:`precode_flower.audit.LeakageAuditor`
            (``clients`` is its ``clients_per_round``; None audits every client).
        out_dir: where the audit's outputs go.
        ground_truth, model_fn, data_spec, kind, defense, close_timeout: see
            :class:`AuditObserver`.
        observers, validator, sort_replies: passed to :class:`Observed`.
        attack_options: per-attack options, e.g. ``{"ig": {"tv": 1e-4}}``.

    Raises:
        ValueError: an unknown attack or a senseless budget, before the run starts.
    """

    def __init__(
        self,
        strategy: Strategy,
        attacks: Sequence[str] | str = ("analytic",),
        *,
        every: int = 1,
        clients: int | None = 2,
        iterations: int | None = None,
        time_limit: float | None = None,
        device: str = "cpu",
        out_dir: str | os.PathLike[str] = "audit",
        ground_truth: bool = False,
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
    ) -> None:
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
        )
        self.audit = AuditObserver(
            leakage,
            ground_truth=ground_truth,
            model_fn=model_fn,
            data_spec=data_spec,
            kind=kind,
            defense=defense,
            close_timeout=close_timeout,
        )
        super().__init__(strategy, [*observers, self.audit], validator, sort_replies=sort_replies)


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
    args: argparse.Namespace, out_dir: str | os.PathLike[str], *, ground_truth: bool
) -> AuditObserver | None:
    """The observer the flags ask for (None without ``--audit``); ValueError on bad budgets.

    With ``args.resume`` set the audit continues the run directory's ``leakage.jsonl``.
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
