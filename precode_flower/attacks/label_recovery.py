"""Label recovery from the classifier's gradient, and the ``labels`` attack.

Registered as ``"labels"``: returns only labels (images are zeros, loss NaN).
:func:`recover_labels` is what every attack calls when it is given ``labels=None``.

Options of the ``labels`` attack (and of :func:`recover_labels`):
    method: ``"auto"`` (default: for B > 1 ``"counts"`` when the classifier has a bias;
        batch 1 ``"bias"``; else ``"weight"``), ``"counts"``, ``"bias"``, ``"weight"`` or
        ``"idlg"``.

* ``counts``, batch B > 1: :func:`.label_counts.count_labels` (the batch's probability mass
  estimated from the mean logit read off the weight gradient); exact on untrained models
  at batch 64 where ``bias``'s absent-class estimate has no absent class to read.

How, and how well (for cross-entropy averaged over the batch, as in
:func:`precode_flower.training.compute_gradients`; the PRECODE KL term does not
reach the classifier, so the defence changes nothing here):

* ``bias``, batch 1: the classifier's bias gradient is ``softmax - onehot``, whose only
  negative entry is the label. Exact (up to float ties), trained or not, with or without
  PRECODE.
* ``bias``, batch B > 1: ``B * db[c] = sum_b p_bc - n_c``. Classes with a negative entry
  are present (each counted at least once); for the counts, the expected probability mass
  of a class is estimated by the mean of ``B * db`` over classes that look absent (their
  entry is exactly that mass), so ``n_c ~ mean_absent - B * db[c]``, then rounded so the
  counts sum to B (largest remainder). This is exact in practice for untrained or barely
  trained models whose predictions are near uniform; on trained models, confident
  predictions make the per-class mass uneven and counts of repeated classes degrade
  (a class predicted with high confidence can even hide, with a non-negative entry).
  Labels of a batch are a multiset: they are returned sorted by class and are *not*
  aligned with batch positions.
* ``weight`` (classifier without bias), batch 1: every row of the weight gradient is
  ``(p_c - y_c) * h`` for the same feature vector h; the label's row is the only one with
  the opposite sign, i.e. a negative inner product with every other row (ties broken by
  the row norm, which is largest for the label). This does not depend on the sign of h.
  For B > 1 it uses the row sums like ``bias`` uses the bias, which assumes non-negative
  features (ReLU outputs) and is a rough estimate.
* ``idlg``: the iDLG trick (Zhao et al., 2020): the row with the most negative sum. It
  assumes the classifier's input is non-negative (after a ReLU). A PRECODE bottleneck
  sits right before the classifier and its decoder output has either sign, so on PRECODE
  models this fails often (CIFAR-10, batch 1, 50 images: 58% right on the MLP and 60% on
  the ConvNet after 200 SGD steps, 4% on the untrained MLP; 100% without PRECODE, and
  ``weight``/``bias`` 100% in every case); kept for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..precode import find_classifier
from .base import AttackCase, AttackResult, Gradients, Timer, as_gradient_list, register
from .memory import label_memory

Method = Literal["auto", "counts", "bias", "weight", "idlg"]
METHODS: tuple[str, ...] = ("auto", "counts", "bias", "weight", "idlg")


def classifier_gradients(
    model: nn.Module, gradients: Gradients, input_shape: Sequence[int] | None = None
) -> tuple[str, Tensor, Tensor | None]:
    """(module name, weight gradient, bias gradient or None) of the final classifier Linear.

    After :func:`precode_flower.precode.extend` the classifier is wrapped in ``Precoded``;
    :func:`find_classifier` then returns the inner ``<name>.module`` Linear.
    """
    name = find_classifier(model, input_shape)
    layer = model.get_submodule(name)
    grads = as_gradient_list(model, gradients)
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    dw = grads[index[id(layer.weight)]]
    db = grads[index[id(layer.bias)]] if layer.bias is not None else None
    return name, dw, db


def _counts_to_labels(raw: Tensor, present: Tensor, batch_size: int) -> Tensor:
    """Round estimated class counts to integers summing to ``batch_size``; sorted labels.

    Every class in ``present`` gets at least one example (the most confident ones first if
    there are more present classes than examples); the rest goes by largest remainder.
    """
    counts = torch.zeros_like(raw, dtype=torch.long)
    order = torch.argsort(raw, descending=True)
    present_sorted = [int(c) for c in order if present[c]]
    for c in present_sorted[:batch_size]:
        counts[c] = 1
    while int(counts.sum()) < batch_size:
        # Largest remaining estimated count; classes never seen as present only as last resort.
        gap = raw - counts.to(raw.dtype)
        gap = torch.where(present, gap, gap - 1e6)
        counts[int(torch.argmax(gap))] += 1
    return torch.repeat_interleave(torch.arange(len(raw), device=raw.device), counts)


def _labels_from_signed(signal: Tensor, batch_size: int, known_scale: bool) -> Tensor:
    """Labels from a per-class signal ``s * (sum_b p_bc - n_c)`` (s = 1 when known_scale)."""
    if batch_size == 1:
        return torch.argmin(signal).reshape(1)
    g = signal.double() * (batch_size if known_scale else 1.0)
    present = g < 0
    absent = g[~present]
    # Expected probability mass of a class over the batch, read off the absent classes.
    mass = absent.mean() if len(absent) else torch.zeros((), dtype=g.dtype, device=g.device)
    raw = (mass - g).clamp(min=0) * present
    if not known_scale:
        # Unknown feature scale: fix it with sum_c n_c = B.
        total = raw.sum()
        raw = raw * (batch_size / total) if total > 0 else raw
    return _counts_to_labels(raw, present, batch_size)


def _labels_from_weight_rows(dw: Tensor) -> Tensor:
    """Batch-1 label from weight rows, without assuming the sign of the features."""
    rows = dw.flatten(1).double()
    gram = rows @ rows.T
    negative = (gram < 0).sum(1).double()
    norms = rows.norm(dim=1)
    # Primary key: number of rows it disagrees with; tie-break: the label row is the largest.
    key = negative + norms / (norms.max() + 1e-30) * 0.5
    return torch.argmax(key).reshape(1)


def recover_labels(
    model: nn.Module,
    gradients: Gradients,
    batch_size: int,
    *,
    input_shape: Sequence[int] | None = None,
    method: Method = "auto",
) -> Tensor:
    """Recover the labels of the batch behind ``gradients`` from the classifier's gradient.

    Args:
        model: the model the update was computed on.
        gradients: per-parameter gradients (``model.parameters()`` order) or a name mapping.
        batch_size: number of examples behind the update.
        input_shape: (C, H, W); if given, the classifier is found by tracing a forward pass.
        method: see the module docstring.

    Returns:
        (batch_size,) int64 labels on the model's device; for B > 1 sorted by class (a
        multiset, not aligned with batch positions).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method not in METHODS:
        raise ValueError(f"unknown label recovery method {method!r}; choose one of {METHODS}")
    _, dw, db = classifier_gradients(model, gradients, input_shape)
    if method == "auto":
        method = "weight" if db is None else "counts" if batch_size > 1 else "bias"
    if method == "counts":
        from .label_counts import count_labels, counts_to_labels  # sibling attack module

        counts, _ = count_labels(model, gradients, batch_size, input_shape=input_shape)
        labels = counts_to_labels(counts)
    elif method == "bias":
        if db is None:
            raise ValueError("label recovery method 'bias' needs a classifier with a bias")
        labels = _labels_from_signed(db, batch_size, known_scale=True)
    elif method == "idlg":
        labels = _labels_from_signed(dw.flatten(1).sum(1), batch_size, known_scale=False)
    elif batch_size == 1:
        labels = _labels_from_weight_rows(dw)
    else:
        labels = _labels_from_signed(dw.flatten(1).sum(1), batch_size, known_scale=False)
    return labels.to(dtype=torch.long, device=dw.device)


def labels_or_recover(case: AttackCase) -> tuple[Tensor, bool]:
    """(labels, recovered?): the case's labels, or :func:`recover_labels` when it has none."""
    if case.labels is not None:
        return case.labels, False
    labels = recover_labels(
        case.model, case.gradients, case.batch_size, input_shape=case.input_shape
    )
    return labels, True


@register("labels", memory=label_memory, outputs=("labels",))
def label_attack(case: AttackCase, *, method: Method = "auto") -> AttackResult:
    """Labels only: zeros for the images (the dataset mean), NaN loss."""
    with Timer() as timer:
        recovered = recover_labels(
            case.model,
            case.gradients,
            case.batch_size,
            input_shape=case.input_shape,
            method=method,
        )
    info: dict[str, Any] = {"method": method, "aligned": case.batch_size == 1}
    if case.labels is not None:
        info["given_labels_ignored"] = True
    return AttackResult(
        attack="labels",
        images=torch.zeros(case.batch_size, *case.input_shape),
        labels=recovered.cpu(),
        loss=float("nan"),
        seconds=timer.seconds,
        info=info,
    )
