"""Label counts of a batch from the classifier's gradient or a multi-step FedAvg update.

Registered as ``"label-counts"``. It reports how many examples of each class are behind an
update (a multiset), not which example has which label. :func:`count_labels` is what
:func:`.label_recovery.recover_labels` uses for batches when the classifier has a bias.

The identity (cross-entropy averaged over a batch of B, classifier ``z = W h + b``):

    B * db_c = S_c - n_c,      S_c = sum_b softmax(z_b)_c,

so the counts are ``n = S - B * db`` once the batch's probability mass ``S`` is known; it is
the same with or without PRECODE (its KL term does not reach the classifier). As in iLRG
(Ma et al., ICLR 2023), for untrained models the predictions hardly depend on the input,
so ``S ~ B * softmax(z_mean)`` with an error of second order in the spread of the logits.
The mean logit is read off the weight gradient: ``dW_c / db_c`` is an affine combination of
the batch's embeddings that equals their mean when a class's embeddings look like the
batch's, so ``z_mean - b ~ W dW_c / db_c``; it is combined over classes by least squares
weighted with ``db_c^2`` (classes whose count is close to their mass carry no information).
Rounding keeps the counts non-negative, sums them to B and gives every class with
``db_c < 0`` (so ``n_c > S_c > 0``) at least one example.

Multi-step updates (FedAvg with ``local_steps`` SGD steps of ``local_batch_size`` examples,
one epoch, as :func:`precode_flower.training.train`), after RLU's observation that the bias
update sums the per-step identities: ``-delta_b / lr = sum_t db_t``, so

    n = sum_t S_t + (b / lr) * delta_b,

with ``S_t ~ b * softmax(z_mean + b_t)`` along the linearly interpolated bias trajectory
``b_t = b_0 + (t / T) * delta_b`` and ``z_mean - b`` estimated from the pseudo-gradient
``-delta / (lr * T)``. This is exact (after rounding) while the local learning rate times the
number of steps is small: measured on the untrained MLP, 4 steps at lr 0.01 were exact; at
lr 0.1 or over 10 steps the per-step predictions follow each batch's labels and counts are
off by 1-4 per class on the plain MLP (see docs/ATTACKS.md).

Assumptions: cross-entropy with mean reduction, a classifier bias (without one it raises
ValueError), plain SGD for updates. On trained models, confident and input-dependent
predictions make ``S`` uneven and counts degrade.

Options of the ``label-counts`` attack:
    update: False (``gradients`` is a gradient) or True (a weight update ``new - old``).
    local_steps, local_lr, local_batch_size: the client's training (updates only; defaults
        1, 0.01 (``training.train``'s), ``batch_size // local_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..precode import find_classifier
from .base import AttackCase, AttackResult, Gradients, Timer, as_gradient_list, register


def _classifier(
    model: nn.Module, gradients: Gradients, input_shape: Sequence[int] | None
) -> tuple[nn.Linear, Tensor, Tensor]:
    layer = model.get_submodule(find_classifier(model, input_shape))
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise ValueError("label counts need a Linear classifier with a bias")
    grads = as_gradient_list(model, gradients)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return layer, grads[index[id(layer.weight)]].double(), grads[index[id(layer.bias)]].double()


def mean_logit_offset(weight: Tensor, dw: Tensor, db: Tensor) -> Tensor:
    """Estimate of ``W h_mean`` (the batch's mean logit minus the bias) from ``dW``, ``db``."""
    denom = db @ db
    if denom <= 0:
        return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    # Column c of W dW^T is W dW_c ~ db_c * W h_mean; least squares over c.
    return (weight.double() @ dw.flatten(1).T) @ db / denom


def round_counts(raw: Tensor, present: Tensor, total: int) -> Tensor:
    """Non-negative integer counts summing to ``total``, >= 1 where ``present`` (if possible).

    Floors first, then hands out the remainder by largest fractional part.
    """
    raw = raw.double().clamp(min=0)
    counts = raw.floor().long()
    need = present & (counts == 0)
    counts[need] = 1
    while int(counts.sum()) > total:  # more than total: drop from the smallest excess
        floor = present.long() if bool((counts > present.long()).any()) else 0
        excess = torch.where(counts > floor, raw - counts.double(), torch.inf)
        counts[int(torch.argmin(excess))] -= 1
    while int(counts.sum()) < total:
        counts[int(torch.argmax(raw - counts.double()))] += 1
    return counts


def count_labels(
    model: nn.Module,
    gradients: Gradients,
    batch_size: int,
    *,
    input_shape: Sequence[int] | None = None,
    update: bool = False,
    local_steps: int = 1,
    local_lr: float = 0.01,
    local_batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(integer counts per class, unrounded estimates), both (num_classes,), on the CPU.

    ``gradients`` is a gradient, or with ``update=True`` a weight update (new - old) of
    ``local_steps`` SGD steps at ``local_lr`` over ``batch_size`` examples in steps of
    ``local_batch_size`` (default ``batch_size // local_steps``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layer, dw, db = _classifier(model, gradients, input_shape)
    bias = layer.bias.detach().double()
    if not update:
        offset = mean_logit_offset(layer.weight.detach(), dw, db)
        mass = batch_size * torch.softmax(offset + bias, 0)
        raw = mass - batch_size * db
        return round_counts(raw, db < 0, batch_size).cpu(), raw.cpu()
    if local_steps < 1 or local_lr <= 0:
        raise ValueError("label counts: local_steps must be >= 1 and local_lr > 0")
    b = local_batch_size or batch_size // local_steps
    if b * local_steps != batch_size:
        raise ValueError(
            f"label counts: batch_size={batch_size} is not local_steps * local_batch_size "
            f"= {local_steps} * {b}"
        )
    scale = -1.0 / (local_lr * local_steps)
    pseudo_w, pseudo_b = dw * scale, db * scale
    # Mid-trajectory weights: the pseudo-gradient is the trajectory's mean gradient.
    offset = mean_logit_offset(layer.weight.detach().double() + dw / 2, pseudo_w, pseudo_b)
    mass = torch.zeros_like(bias)
    for t in range(local_steps):
        mass = mass + b * torch.softmax(offset + bias + (t / local_steps) * db, 0)
    raw = mass + (b / local_lr) * db
    return round_counts(raw, pseudo_b < 0, batch_size).cpu(), raw.cpu()


def counts_to_labels(counts: Tensor) -> Tensor:
    """The sorted multiset of labels with these per-class counts."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts.long().cpu())


@register("label-counts", outputs=("labels",))
def label_counts(
    case: AttackCase,
    *,
    update: bool = False,
    local_steps: int = 1,
    local_lr: float = 0.01,
    local_batch_size: int | None = None,
) -> AttackResult:
    """Per-class label counts (``info["counts"]``); labels = the sorted multiset, images zeros
    (placeholders: it is declared a labels-only attack, so they are never scored)."""
    with Timer() as timer:
        counts, raw = count_labels(
            case.model,
            case.gradients,
            case.batch_size,
            input_shape=case.input_shape,
            update=update,
            local_steps=local_steps,
            local_lr=local_lr,
            local_batch_size=local_batch_size,
        )
    info: dict[str, Any] = {
        "counts": counts.tolist(),
        "raw_counts": [float(v) for v in raw],
        "update": update,
        "aligned": False,
    }
    if case.labels is not None:
        info["given_labels_ignored"] = True
    return AttackResult(
        attack="label-counts",
        images=torch.zeros(case.batch_size, *case.input_shape),
        labels=counts_to_labels(counts),
        loss=float("nan"),
        seconds=timer.seconds,
        info=info,
    )
