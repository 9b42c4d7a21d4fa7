"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019), registered as ``"dlg"``.

Optimises dummy inputs (and optionally soft labels) with L-BFGS so that their gradient
matches the client's in squared L2 distance, summed over the selected parameters.

The dummy gradient is computed exactly as :func:`precode_flower.training.compute_gradients`
computes the client's: train mode, loss = cross-entropy + PRECODE KL. A PRECODE bottleneck
samples noise in every forward pass; the attack re-seeds the generator (``seed``) before
each evaluation so the objective is deterministic for L-BFGS. The server cannot know the
client's noise draw, so even a perfect dummy input cannot reproduce the client's gradient
exactly; that mismatch is part of why PRECODE resists this attack.

Options:
    iterations: L-BFGS iterations (300), with a budget of 1.25x as many objective
        evaluations (line search included). When L-BFGS stops early (converged or stalled
        line search) it is restarted from the best point while that still lowers the loss.
    lr: L-BFGS (initial) step size (1.0).
    optimize_labels: jointly optimise soft labels (logits, softmax-ed) as in the DLG paper;
        returned labels are their argmax. Default False: use the given labels or recover
        them from the classifier gradient (iDLG-style), which is exact for batch 1.
    layers: which gradients to match (:func:`~.base.select_parameters`: None = all).
    line_search: use L-BFGS' strong-Wolfe line search (True); the original DLG has none
        and tends to diverge on CPU budgets.
    history_size: L-BFGS memory (100).

The model's parameters, buffers (BatchNorm running statistics), ``.grad`` fields and
train/eval mode are left as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precode import precode_loss
from .base import AttackCase, AttackResult, Timer, register, select_parameters
from .label_recovery import labels_or_recover
from .memory import lbfgs_memory


@contextlib.contextmanager
def _fixed_noise(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the RNG seeded to ``seed``, restoring the global state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def gradient_distance(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    true_grads: Sequence[Tensor],
    mask: Sequence[bool],
    *,
    create_graph: bool = True,
) -> Tensor:
    """Sum over selected parameters of ``||grad(x, targets) - true||^2``.

    ``targets`` are class indices (B,) or class probabilities (B, classes); the loss is
    cross-entropy plus :func:`precode_loss`, as the client computes it. The model must be
    in train mode.
    """
    params = [p for p, keep in zip(model.parameters(), mask, strict=True) if keep]
    wanted = [g for g, keep in zip(true_grads, mask, strict=True) if keep]
    loss = F.cross_entropy(model(x), targets) + precode_loss(model)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    total = x.new_zeros(())
    for g, t in zip(grads, wanted, strict=True):
        diff = t if g is None else g - t
        total = total + diff.pow(2).sum()
    return total


@register("dlg", memory=lbfgs_memory)
def dlg(
    case: AttackCase,
    *,
    iterations: int = 300,
    lr: float = 1.0,
    optimize_labels: bool = False,
    layers: Iterable[str] | Callable[[str], bool] | None = None,
    line_search: bool = True,
    history_size: int = 100,
) -> AttackResult:
    """Deep Leakage from Gradients; see the module docstring for the options."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    model, gradients, labels = case.model, case.gradients, case.labels
    input_shape, batch_size, seed = case.input_shape, case.batch_size, case.seed
    mask = select_parameters(model, layers)
    device = case.device
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    info: dict[str, Any] = {"optimize_labels": optimize_labels, "matched_tensors": sum(mask)}
    with Timer() as timer:
        gen = torch.Generator().manual_seed(seed)
        dummy = torch.randn(batch_size, *input_shape, generator=gen).to(device)
        dummy.requires_grad_(True)
        variables = [dummy]
        if optimize_labels:
            num_classes = _num_classes(model, input_shape, device)
            soft = torch.randn(batch_size, num_classes, generator=gen).to(device)
            soft.requires_grad_(True)
            variables.append(soft)
            info["labels_recovered"] = True
        else:
            labels, recovered = labels_or_recover(case)
            info["labels_recovered"] = recovered
        best: dict[str, Any] = {
            "loss": math.inf,
            "point": [v.detach().clone() for v in variables],
        }

        def closure() -> Tensor:
            targets = soft.softmax(1) if optimize_labels else labels
            with _fixed_noise(seed, device):
                dist = gradient_distance(model, dummy, targets, gradients, mask)
            grads = torch.autograd.grad(dist, variables)
            # Set the dummies' grads by hand: dist.backward() would also fill model .grad.
            for v, g in zip(variables, grads, strict=True):
                v.grad = g.detach()
            value = float(dist.detach())
            if not math.isfinite(value):
                info["diverged"] = True
            # Keep the best point evaluated (line searches included): L-BFGS can overshoot.
            if value < best["loss"]:
                best.update(loss=value, point=[v.detach().clone() for v in variables])
            return dist.detach()

        model.train()
        done, evaluations, rounds = 0, 1, 0
        try:
            initial = float(closure())
            while done < iterations:
                if rounds:
                    # L-BFGS stopped early (converged or its line search stalled): restart
                    # it from the best point with a fresh memory.
                    with torch.no_grad():
                        for v, b in zip(variables, best["point"], strict=True):
                            v.copy_(b)
                rounds += 1
                # One step() call runs many iterations: re-entering step() with max_iter=1
                # breaks its strong-Wolfe line search (it stalls with an unchanged loss).
                opt = torch.optim.LBFGS(
                    variables,
                    lr=lr,
                    max_iter=iterations - done,
                    history_size=history_size,
                    tolerance_grad=1e-10,
                    tolerance_change=1e-12,
                    line_search_fn="strong_wolfe" if line_search else None,
                )
                before = best["loss"]
                opt.step(closure)
                state = opt.state[dummy]
                done += max(int(state.get("n_iter", 0)), 1)
                evaluations += int(state.get("func_evals", 0))
                # Restart only while that still helps.
                if info.get("diverged") or not best["loss"] < before * (1 - 1e-3):
                    break
        finally:
            model.train(was_training)
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
    images = best["point"][0]
    if optimize_labels:
        labels = best["point"][1].argmax(1)
    info.update(iterations=done, evaluations=evaluations, restarts=rounds - 1, initial_loss=initial)
    return AttackResult(
        attack="dlg",
        images=images.cpu(),
        labels=labels.detach().cpu(),
        loss=best["loss"],
        seconds=timer.seconds,
        info=info,
    )


def _num_classes(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> int:
    """Output width of the model (dry run in eval mode, buffers untouched)."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return int(model(torch.zeros(1, *input_shape, device=device)).shape[1])
    finally:
        model.train(was_training)
