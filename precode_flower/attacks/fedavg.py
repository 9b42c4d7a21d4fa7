"""``fedavg``: inverting a FedAvg weight update by unrolling the client's local training.

The server knows the global weights (the ``model`` passed in), the client's returned weights,
and what it knows of the client's local training (:class:`~precode_flower.local_training.
LocalTraining`). ``gradients`` must be the weight *difference* ``new - old`` per parameter (in
``model.parameters()`` order or by name), not a gradient.

The attack optimises a dummy dataset of ``batch_size`` examples so that the local training
replayed on it (:func:`~precode_flower.local_training.unrolled_update`: every epoch, the last
batch ragged, SGD with momentum / Nesterov / weight decay or Adam / AdamW, loss =
cross-entropy + PRECODE loss in train mode, ``create_graph=True``) reproduces the update:

    min_x  cost(w_T(x) - w_0, update) + tv * TV(x)

The client's shuffling does not matter in the first epoch (the dummy examples are free
variables: step t simply uses the dummy rows of its batch); later epochs revisit the rows in
the same order here, an approximation for clients that reshuffle (pass ``order`` when the
real per-step rows are known). The PRECODE/dropout noise is fixed by seeding (the server
cannot know the client's draws); each evaluation replays the same sequence of draws.

What the training was is stated, never silently assumed: the result's ``info["training"]``
describes what was unrolled and ``info["assumed"]`` lists the fields that nobody stated and
that were guessed (:meth:`LocalTraining.resolve`: one full-batch plain-SGD step at lr 0.01).

Labels: given (aligned with the dummy rows), or recovered with
:func:`label_recovery.recover_labels` from the pseudo-gradient ``-update / (lr * s)``, ``s``
the effective step count of the training (:meth:`LocalTraining.effective_steps`; exact for
one step; for several steps it is the mean gradient along the trajectory).

Options (those shared with ``ig`` mean the same; defaults differ where noted):

==================  ========  ==========================================================
option              default   meaning
==================  ========  ==========================================================
training            None      a :class:`LocalTraining` (or a dict of its fields)
local_steps         None      overrides ``training.steps``
local_lr            None      overrides ``training.lr``
local_batch_size    None      overrides ``training.batch_size``; with ``local_steps`` only:
                              ``ceil(batch_size / local_steps)`` (one epoch)
order               None      rows of every step (list of index lists), e.g. the client's
                              real batches; None: :meth:`LocalTraining.batches`
cost                "cosine"  "cosine" or "l2" distance between simulated and real update
tv                  1e-6      total-variation weight
lr                  0.01      attack step size
optimizer           "adam"    the attack's optimizer, "adam" or "sgd"
signed              True      step on the sign of the image gradient
schedule            "step"    lr x0.1 at 3/8, 5/8, 7/8 of ``iterations``; None: constant
boxed               True      clamp pixels to [0, 1] (normalised space) after every step
iterations          500       steps per restart (CPU-friendly; unrolling costs one double
                              backward pass per local step per iteration)
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
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..local_training import LocalTraining, unrolled_update
from .base import AttackCase, AttackResult, Timer, register, select_parameters
from .gradient_matching import COSTS, Cost, attack_session, distance
from .ig import IGOptions, optimise_restarts, resolve_labels, restart_info
from .memory import unrolled_memory


@dataclass
class FedAvgOptions(IGOptions):
    """Options of :func:`fedavg` (see the module docstring)."""

    #: ``fast`` is an IG objective switch with no meaning here; the BatchNorm prior is
    #: wired into ``ig``'s GradientMatcher only.
    EXCLUDED: ClassVar[frozenset[str]] = frozenset({"fast", "bn_prior", "bn_stats"})

    iterations: int = 500
    training: LocalTraining | Mapping[str, Any] | None = None
    local_steps: int | None = None
    local_lr: float | None = None
    local_batch_size: int | None = None
    order: Sequence[Sequence[int]] | None = None

    def validate(self, attack: str = "fedavg") -> None:
        super().validate(attack)
        if self.local_steps is not None and (
            not isinstance(self.local_steps, int) or self.local_steps < 1
        ):
            raise ValueError(f"{attack}: local_steps must be an integer >= 1")
        if self.local_lr is not None and not (
            isinstance(self.local_lr, int | float) and self.local_lr > 0
        ):
            raise ValueError(f"{attack}: local_lr must be a number > 0, got {self.local_lr!r}")
        if self.local_batch_size is not None and (
            not isinstance(self.local_batch_size, int) or self.local_batch_size < 1
        ):
            raise ValueError(f"{attack}: local_batch_size must be an integer >= 1 or None")
        if self.training is not None and not isinstance(self.training, LocalTraining | Mapping):
            raise ValueError(f"{attack}: training must be a LocalTraining or a dict of its fields")

    def local_training(self, examples: int, attack: str = "fedavg") -> tuple[LocalTraining, list]:
        """(the fully specified training to unroll over ``examples`` examples, fields guessed)."""
        base = self.training
        if isinstance(base, Mapping):
            base = LocalTraining(**base)
        base = base or LocalTraining()
        updates: dict[str, Any] = {}
        if self.local_steps is not None:
            updates.update(steps=self.local_steps, epochs=None)
            if self.local_batch_size is None and base.batch_size is None:
                updates["batch_size"] = -(-examples // self.local_steps)
        if self.local_lr is not None:
            updates["lr"] = float(self.local_lr)
        if self.local_batch_size is not None:
            updates["batch_size"] = self.local_batch_size
        training, guessed = dataclasses.replace(base, **updates).resolve(examples)
        used = training.used_examples(examples)
        if used < examples:
            raise ValueError(
                f"{attack}: {training.total_steps(examples)} local step(s) of batch "
                f"{training.batch_size} visit {used} of batch_size={examples} examples; pass "
                f"batch_size={used} (or that many labels), or more steps"
            )
        return training, guessed


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
        training: LocalTraining,
        noise_seed: int,
        order: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        named = list(model.named_parameters())
        self.model = model
        self.cost: Cost = cost
        self.training = training
        self.order = order
        self.noise_seed = int(noise_seed)
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
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def prepare(self, x: Tensor, labels: Tensor) -> list[str]:
        """Nothing to check (kept for the shared optimisation loop)."""
        return []

    def simulated_update(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> list:
        """``w_T - w_0`` of the selected parameters after the local training on ``(x, labels)``."""
        torch.manual_seed(self.noise_seed)
        update = unrolled_update(
            self.model,
            x,
            labels,
            self.training,
            order=self.order,
            names=self.names,
            create_graph=create_graph,
        )
        return [update[n] for n in self.names]

    def __call__(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> Tensor:
        update = self.simulated_update(x, labels, create_graph=create_graph)
        dot = torch.stack([(u * t).sum() for u, t in zip(update, self._targets, strict=True)])
        sq = torch.stack([u.pow(2).sum() for u in update])
        return distance(dot.sum(), sq.sum(), self.target_sq, self.cost)


@register("fedavg", memory=unrolled_memory, inputs="weights")
def fedavg(case: AttackCase, **options: Any) -> AttackResult:
    """Invert a FedAvg update: ``case.gradients`` = new - global weights (see module doc)."""
    opts = FedAvgOptions.from_options(options, "fedavg")
    model, batch_size, seed = case.model, case.batch_size, case.seed
    training, guessed = opts.local_training(batch_size)
    with Timer() as timer:
        update = list(case.gradients)
        if case.labels is None:
            # -update / (lr * s) estimates the client's mean gradient along its trajectory.
            scale = -1.0 / (float(training.lr) * training.effective_steps(batch_size))
            pseudo = [u * scale for u in update]
            labels, recovered = resolve_labels(dataclasses.replace(case, gradients=pseudo))
        else:
            labels, recovered = resolve_labels(case)
        matcher = UpdateMatcher(
            model,
            update,
            select_parameters(model, opts.layers),
            cost=opts.cost,
            training=training,
            noise_seed=seed if opts.noise_seed is None else opts.noise_seed,
            order=opts.order,
        )
        runs, best, _ = optimise_restarts(
            matcher, labels, (batch_size, *case.input_shape), case.pixel_box(), seed, opts
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
            "training": training.describe(batch_size, guessed),
            "assumed": guessed,
            "local_steps": training.total_steps(batch_size),
            "local_batch_size": training.batch_size,
            "local_lr": training.lr,
            "matched_parameters": list(matcher.names),
        },
    )
