"""``fedavg``: inverting a FedAvg weight update by unrolling the client's local training.

The server knows the global weights (the ``model`` passed in), the client's returned weights,
and the local training hyperparameters. ``gradients`` must be the weight *difference*
``new - old`` per parameter (in ``model.parameters()`` order or by name), not a gradient.

The attack optimises a dummy dataset so that ``local_steps`` differentiable SGD steps from the
global weights (:func:`torch.func.functional_call`, ``create_graph=True``) reproduce the update:

    min_x  cost(w_T(x) - w_0, update) + tv * TV(x)

Assumptions, matching :func:`precode_flower.training.train` with one epoch: plain SGD (no
momentum, no weight decay), loss = cross-entropy + PRECODE loss in train mode, and a client
dataset of exactly ``batch_size = local_steps * local_batch_size`` examples split into
``local_steps`` consecutive batches of ``local_batch_size`` (the client's shuffling does not
matter: the dummy examples are free variables, and step t simply uses dummy rows
``t*b .. (t+1)*b``). The PRECODE/dropout noise is fixed by seeding (the server cannot know
the client's draws); each evaluation replays the same sequence of draws.

Labels: given (aligned with the dummy rows), or recovered with
:func:`label_recovery.recover_labels` from the pseudo-gradient
``-update / (local_lr * local_steps)`` (exact for one step; for several steps it is the mean
gradient along the trajectory, which is a good proxy while the weights move little).

Options (those shared with ``ig`` mean the same; defaults differ where noted):

==================  ========  ==========================================================
option              default   meaning
==================  ========  ==========================================================
local_steps         1         local SGD steps the client took
local_lr            0.01      the client's learning rate (``training.train``'s default)
local_batch_size    None      examples per step; None: ``batch_size // local_steps``
cost                "cosine"  "cosine" or "l2" distance between simulated and real update
tv                  1e-6      total-variation weight
lr                  0.01      attack step size
optimizer           "adam"    "adam" or "sgd"
signed              True      step on the sign of the image gradient
schedule            "step"    lr x0.1 at 3/8, 5/8, 7/8 of ``iterations``; None: constant
boxed               True      clamp pixels to [0, 1] (normalised space) after every step
iterations          500       steps per restart (CPU-friendly; unrolling costs
                              ``local_steps`` double backward passes per iteration)
restarts            1         the restart with the lowest final loss is returned
init                "randn"   "randn", "rand", "zeros" or a (B, C, H, W) tensor
layers              None      which parameters' updates to match (``select_parameters``)
noise_seed          seed      seed of the fixed PRECODE/dropout noise
target_loss         None      stop a restart once its objective is <= this value
stop_when           None      callable(iteration, images) -> bool
check_every         100       iterations between stop checks
progress            False     tqdm progress bar
==================  ========  ==========================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..precode import precode_loss
from .base import AttackResult, Timer, register, select_parameters
from .gradient_matching import COSTS, Cost, attack_session, distance
from .ig import IGOptions, optimise_restarts, pixel_box, resolve_labels, restart_info
from .memory import unrolled_memory


@dataclass
class FedAvgOptions(IGOptions):
    """Options of :func:`fedavg` (see the module docstring)."""

    #: ``fast`` is an IG objective switch with no meaning here.
    EXCLUDED: ClassVar[frozenset[str]] = frozenset({"fast"})

    iterations: int = 500
    local_steps: int = 1
    local_lr: float = 0.01
    local_batch_size: int | None = None

    def validate(self, attack: str = "fedavg") -> None:
        super().validate(attack)
        if not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"{attack}: local_steps must be an integer >= 1")
        if not (isinstance(self.local_lr, int | float) and self.local_lr > 0):
            raise ValueError(f"{attack}: local_lr must be a number > 0, got {self.local_lr!r}")
        if self.local_batch_size is not None and (
            not isinstance(self.local_batch_size, int) or self.local_batch_size < 1
        ):
            raise ValueError(f"{attack}: local_batch_size must be an integer >= 1 or None")

    def steps_and_batch(self, batch_size: int, attack: str = "fedavg") -> tuple[int, int]:
        """(local_steps, local_batch_size), checked against the number of examples."""
        b = self.local_batch_size
        if b is None:
            if batch_size % self.local_steps:
                raise ValueError(
                    f"{attack}: batch_size={batch_size} examples cannot be split into "
                    f"local_steps={self.local_steps} equal batches; set local_batch_size"
                )
            b = batch_size // self.local_steps
        if self.local_steps * b != batch_size:
            raise ValueError(
                f"{attack}: the client's examples must number local_steps * local_batch_size = "
                f"{self.local_steps} * {b} = {self.local_steps * b} (one epoch), but "
                f"batch_size={batch_size}; pass batch_size={self.local_steps * b} "
                "(or that many labels)"
            )
        return self.local_steps, b


class UpdateMatcher:
    """Distance between the update unrolled from a candidate dataset and the client's update.

    Same calling convention as :class:`.gradient_matching.GradientMatcher` (a context
    manager; ``matcher(x, labels)``), so ``ig``'s optimisation loop drives it.
    """

    def __init__(
        self,
        model: nn.Module,
        update: Sequence[Tensor],
        mask: Sequence[bool],
        *,
        cost: Cost,
        local_steps: int,
        local_lr: float,
        local_batch_size: int,
        noise_seed: int,
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        named = list(model.named_parameters())
        self.model = model
        self.cost: Cost = cost
        self.local_steps = local_steps
        self.local_lr = float(local_lr)
        self.local_batch_size = local_batch_size
        self.noise_seed = int(noise_seed)
        self.all_names = [n for n, _ in named]
        self.names = [n for (n, _), m in zip(named, mask, strict=True) if m]
        self._targets = [u.detach() for u, m in zip(update, mask, strict=True) if m]
        self.target_sq = torch.stack([t.pow(2).sum() for t in self._targets]).sum()
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> UpdateMatcher:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(attack_session(self.model))
        # functional_call swaps in our own weight tensors; the module's stay constants.
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._start = {n: p.detach() for n, p in self.model.named_parameters()}
        self._buffers = dict(self.model.named_buffers())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def prepare(self, x: Tensor, labels: Tensor) -> list[str]:
        """Nothing to check (kept for the shared optimisation loop)."""
        return []

    def simulated_update(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> list:
        """``w_T - w_0`` of the selected parameters after unrolled local SGD on ``(x, labels)``."""
        torch.manual_seed(self.noise_seed)
        start = {n: w.clone().requires_grad_(True) for n, w in self._start.items()}
        weights = dict(start)
        b = self.local_batch_size
        for t in range(self.local_steps):
            xb, yb = x[t * b : (t + 1) * b], labels[t * b : (t + 1) * b]
            logits = functional_call(self.model, {**weights, **self._buffers}, (xb,))
            # The client's loss (training.loss_fn); the bottlenecks cached this pass's KL.
            loss = F.cross_entropy(logits, yb) + precode_loss(self.model)
            grads = torch.autograd.grad(
                loss, list(weights.values()), create_graph=create_graph, allow_unused=True
            )
            weights = {
                n: w if g is None else w - self.local_lr * g
                for (n, w), g in zip(weights.items(), grads, strict=True)
            }
        return [weights[n] - start[n] for n in self.names]

    def __call__(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> Tensor:
        update = self.simulated_update(x, labels, create_graph=create_graph)
        dot = torch.stack([(u * t).sum() for u, t in zip(update, self._targets, strict=True)])
        sq = torch.stack([u.pow(2).sum() for u in update])
        return distance(dot.sum(), sq.sum(), self.target_sq, self.cost)


@register("fedavg", memory=unrolled_memory, inputs="weights")
def fedavg(
    model: nn.Module,
    gradients: list[Tensor],
    *,
    labels: Tensor | None,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    seed: int,
    **options: Any,
) -> AttackResult:
    """Invert a FedAvg update; ``gradients`` = new weights - global weights (see module doc)."""
    opts = FedAvgOptions.from_options(options, "fedavg")
    steps, local_b = opts.steps_and_batch(batch_size)
    with Timer() as timer:
        update = list(gradients)
        if labels is None:
            # -update / (lr * steps) is the client's mean gradient along its trajectory.
            scale = -1.0 / (opts.local_lr * steps)
            pseudo = [u * scale for u in update]
            labels, recovered = resolve_labels(model, pseudo, None, batch_size)
        else:
            labels, recovered = resolve_labels(model, update, labels, batch_size)
        matcher = UpdateMatcher(
            model,
            update,
            select_parameters(model, opts.layers),
            cost=opts.cost,
            local_steps=steps,
            local_lr=opts.local_lr,
            local_batch_size=local_b,
            noise_seed=seed if opts.noise_seed is None else opts.noise_seed,
        )
        param = next(model.parameters())
        box = pixel_box(mean, std, param.device, param.dtype)
        runs, best, _ = optimise_restarts(
            matcher, labels, (batch_size, *input_shape), box, seed, opts
        )
    loss, images, _, _ = runs[best]
    return AttackResult(
        attack="fedavg",
        images=images.cpu(),
        labels=labels.cpu(),
        loss=loss,
        seconds=timer.seconds,
        info={
            **restart_info(runs, best, opts),
            "labels_recovered": recovered,
            "local_steps": steps,
            "local_batch_size": local_b,
            "local_lr": opts.local_lr,
            "matched_parameters": list(matcher.names),
        },
    )
