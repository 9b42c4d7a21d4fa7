"""Gradient inversion attacks an honest-but-curious server can run on one client update.

One entry point, :func:`reconstruct`; each attack lives in its own module and
registers itself by name in :data:`ATTACKS` (adding an attack touches one module
plus the import line below). :func:`reconstruct` checks its inputs once and hands every
attack one :class:`~.base.AttackCase`: an attack is ``fn(case, **options) -> AttackResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# Importing the attack modules registers them (keep this list in sync with the modules).
from . import (  # noqa: F401
    analytic,
    cocktail,
    dlg,
    fedavg,
    ig,
    ignore_bottleneck,
    label_counts,
    label_recovery,
    spear,
)
from .base import ATTACKS, AttackCase, AttackResult, Gradients, as_gradient_list, register


def reconstruct(
    name: str,
    model: nn.Module,
    gradients: Gradients,
    *,
    labels: Tensor | Sequence[int] | None = None,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackResult:
    """Run attack ``name`` on one client update and return what it reconstructed.

    Args:
        name: one of :data:`ATTACKS` (``analytic``, ``labels``, ``ig``, ``dlg``,
            ``ignore-bottleneck``, ``fedavg``).
        model: the model the client computed its update on (the server's global model);
            the attack runs on its device and does not modify it.
        gradients: per-parameter gradients in ``model.parameters()`` order, or a
            name-to-tensor mapping (for ``fedavg``: the weight update, see that module).
        labels: the batch's labels if known; None lets the attack recover them.
        input_shape: (C, H, W) of one example.
        mean, std: the input normalisation, so attacks can box pixels to [0, 1].
        batch_size: examples behind the update; defaults to ``len(labels)`` or 1.
        seed: seeds every random choice of the attack.
        options: attack-specific options, documented in each attack's module.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(ATTACKS))}")
    grads = as_gradient_list(model, gradients)
    device = next(model.parameters()).device
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).flatten()
        if batch_size is not None and batch_size != len(labels):
            raise ValueError(f"batch_size={batch_size} but {len(labels)} labels were given")
        batch_size = len(labels)
    batch_size = batch_size or 1
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise ValueError("mean and std need one value per input channel")
    case = AttackCase(
        model=model,
        gradients=grads,
        labels=labels,
        input_shape=tuple(input_shape),
        mean=tuple(mean),
        std=tuple(std),
        batch_size=batch_size,
        seed=seed,
    )
    torch.manual_seed(seed)
    return ATTACKS[name](case, **options)


__all__ = [
    "ATTACKS",
    "AttackCase",
    "AttackResult",
    "as_gradient_list",
    "reconstruct",
    "register",
]
