"""What one audit job is: a client update as the server holds it, checked and snapshotted."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import ATTACKS
from ..local_training import LocalTraining
from ..model_source import copy_module as copy_model

UpdateKind = Literal["gradients", "weights"]


@dataclass(frozen=True)
class AuditJob:
    """One client update to audit, with exactly what an honest-but-curious server holds.

    Attributes:
        round: federated round the update answers.
        client: the client's id (node or partition id); only used for bookkeeping.
        model: the architecture, as a module or a zero-argument picklable factory (e.g. a
            ``functools.partial`` of a module-level function). A module is copied on submission.
        update: per-parameter tensors named like ``model.named_parameters()``: the gradients
            (``kind="gradients"``, FedSGD) or the weight difference reply - global
            (``kind="weights"``, FedAvg). Extra entries (buffers) are ignored.
        kind: ``"gradients"`` or ``"weights"``.
        input_shape, mean, std: (C, H, W) of one example and the input normalisation.
        batch_size: examples behind the update (FedSGD: the batch; FedAvg: all local examples).
        local_steps, lr, local_batch_size: the local training config the server sent (FedAvg).
        global_state: the global model's state dict the update answers, loaded into ``model``
            (None when ``model`` already holds it).
        ground_truth: the client's (x, y) behind the update, only from an explicit evaluation
            channel; None in deployment (then nothing can be scored).
        defense: the configured defense, for the verdict (``"none"``, ``"precode"``, ...).
        aggregate_only: the update is a secure-aggregation sum of several clients' updates
            (the server never saw theirs), attacked as one large batch; rows say so.
        training: the local training the attacks assume (``kind="weights"``), fully
            specified (:meth:`LocalTraining.resolve`); None: plain SGD from ``local_steps``,
            ``lr`` and ``local_batch_size``.
        assumed: the fields of ``training`` that nobody stated and that were guessed.
        truth_kind: ``"batch"`` (``ground_truth`` is the examples behind the update, in order)
            or ``"partition"`` (the client's whole partition: each reconstruction is scored
            against its best match there).
        unscored_reason: why there is no ground truth, for the summary.
    """

    round: int
    client: int | str
    model: nn.Module | Callable[[], nn.Module]
    update: Mapping[str, Tensor | np.ndarray]
    kind: UpdateKind
    input_shape: Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int
    local_steps: int = 1
    lr: float | None = None
    local_batch_size: int | None = None
    global_state: Mapping[str, Tensor | np.ndarray] | None = None
    ground_truth: tuple[Tensor, Tensor] | None = None
    defense: str = "none"
    aggregate_only: bool = False
    training: LocalTraining | None = None
    assumed: tuple[str, ...] = ()
    truth_kind: Literal["batch", "partition"] = "batch"
    unscored_reason: str | None = None


def task_seed(seed: int, round: int, client: int | str, attack: str) -> int:
    """Deterministic seed of one (round, client, attack)."""
    return zlib.crc32(f"{seed}:{round}:{client}:{attack}".encode()) & 0x7FFFFFFF


def validate_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
    """Attack names checked against the registry; ValueError naming the valid ones."""
    names = [a.strip() for a in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    names = [a for a in names if a]
    if not names:
        raise ValueError(f"no attack given; choose from: {', '.join(sorted(ATTACKS))}")
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ValueError(
            f"unknown attack {unknown[0]!r}; choose from: {', '.join(sorted(ATTACKS))}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"attack listed twice: {names}")
    return tuple(names)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _snapshot(job: AuditJob) -> dict[str, Any]:
    """Copy everything the job references: the caller may reuse its buffers right away."""
    if job.kind not in ("gradients", "weights"):
        raise ValueError(f"kind must be 'gradients' or 'weights', got {job.kind!r}")
    _check_int("batch_size", job.batch_size, 1)
    _check_int("local_steps", job.local_steps, 1)
    if job.truth_kind not in ("batch", "partition"):
        raise ValueError(f"truth_kind must be 'batch' or 'partition', got {job.truth_kind!r}")
    training = job.training
    if training is None and job.kind == "weights":
        # The older description: plain SGD, local_steps steps of local_batch_size.
        training = LocalTraining(
            batch_size=job.local_batch_size or -(-job.batch_size // job.local_steps),
            steps=job.local_steps,
            lr=job.lr,
        ).with_defaults()
    model = job.model
    if isinstance(model, nn.Module):
        model = copy_model(model).cpu()
    elif not callable(model):
        raise TypeError("model must be an nn.Module or a zero-argument factory")

    def tensors(m: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            k: v.detach().cpu().clone() if isinstance(v, Tensor) else torch.tensor(np.asarray(v))
            for k, v in m.items()
        }

    truth = None
    if job.ground_truth is not None:
        x, y = job.ground_truth
        truth = (x.detach().cpu().clone().float(), torch.as_tensor(y).cpu().clone().long())
    return {
        "model": model,
        "global_state": None if job.global_state is None else tensors(job.global_state),
        "update": tensors(job.update),
        "kind": job.kind,
        "input_shape": tuple(int(d) for d in job.input_shape),
        "mean": tuple(float(v) for v in job.mean),
        "std": tuple(float(v) for v in job.std),
        "batch_size": int(job.batch_size),
        "local_steps": int(job.local_steps),
        "lr": None if job.lr is None else float(job.lr),
        "local_batch_size": job.local_batch_size,
        "ground_truth": truth,
        "truth_kind": job.truth_kind,
        "training": training,
    }


def _client_key(client: Any) -> tuple[int, Any]:
    """Sort clients numerically where they are numbers."""
    try:
        return (0, int(client))
    except (TypeError, ValueError):
        return (1, str(client))
