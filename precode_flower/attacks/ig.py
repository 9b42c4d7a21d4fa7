"""``ig``: Inverting Gradients (Geiping et al., NeurIPS 2020), configured as in the PRECODE paper.

Optimises a dummy batch so that its training gradient matches the client's, under a total
variation prior:  min_x  cost(grad(x, y), G) + tv * TV(x).

Options (``reconstruct("ig", ..., **options)``), defaults = the PRECODE paper's configuration:

==============  ==========  ===========================================================
option          default     meaning
==============  ==========  ===========================================================
cost            "cosine"    "cosine" (1 - cosine similarity over all selected layers
                            jointly) or "l2" (squared distance)
tv              1e-6        weight of the total-variation prior
lr              0.01        step size
optimizer       "adam"      "adam" or "sgd"
signed          True        step on the sign of the image gradient
schedule        "step"      "step": lr x0.1 at 3/8, 5/8, 7/8 of ``iterations``; None: constant
boxed           True        clamp pixels to [0, 1] (in normalised space) after every step
iterations      7000        steps per restart
restarts        1           independent runs; the one with the lowest final loss is returned
init            "randn"     "randn" (N(0, 1) in normalised space), "rand" (uniform over the
                            valid pixel box), "zeros" (the mean image), or a (B, C, H, W)
                            tensor in normalised space
layers          None        which gradients to match: None (all), names / module prefixes,
                            or a predicate on the parameter name (``select_parameters``)
fast            True        Gram-route objective (see ``gradient_matching``); False: the
                            straightforward double-backpropagation objective (slow)
noise_seed      seed        seed of the fixed PRECODE/dropout noise in the candidate's pass
bn_prior        0.0         weight of GradInversion's BatchNorm prior (Yin et al., CVPR 2021):
                            sum over BatchNorm layers of ||mean - mean*||_2 +
                            ||var - var*||_2 between the candidate's batch statistics and
                            the client's (``bn_stats``); 0: off
bn_stats        None        {BatchNorm module name: (mean, unbiased var)} of the client's
                            batch; from a FedAvg state dict with
                            ``gradient_matching.bn_stats_from_buffers``
target_loss     None        stop a restart once its objective is <= this value
stop_when       None        callable(iteration, images) -> bool, stops a restart when True
check_every     100         iterations between ``target_loss``/``stop_when`` checks
progress        False       tqdm progress bar
==============  ==========  ===========================================================

Labels: the given ``labels``, else :func:`label_recovery.recover_labels`. The candidate's
gradient is computed as the client's FedSGD update is (train mode, cross-entropy + PRECODE
loss); the PRECODE sample is drawn with a fixed seed because the server cannot know the
client's draw. The model's parameters, modes and buffers are left as they were; the attack
runs on the model's device and is deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, Self

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import AttackCase, AttackResult, Timer, register, select_parameters
from .gradient_matching import COSTS, BNStats, GradientMatcher, total_variation
from .memory import gradient_matching_memory

Layers = Iterable[str] | Callable[[str], bool] | None
StopWhen = Callable[[int, Tensor], bool]

INITS: tuple[str, ...] = ("randn", "rand", "zeros")
SCHEDULES: tuple[str | None, ...] = ("step", None)
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


@dataclass
class IGOptions:
    """Options of :func:`ig` (see the module docstring)."""

    cost: Literal["cosine", "l2"] = "cosine"
    tv: float = 1e-6
    lr: float = 0.01
    optimizer: Literal["adam", "sgd"] = "adam"
    signed: bool = True
    schedule: Literal["step"] | None = "step"
    boxed: bool = True
    iterations: int = 7000
    restarts: int = 1
    init: str | Tensor = "randn"
    layers: Layers = None
    fast: bool = True
    noise_seed: int | None = None
    bn_prior: float = 0.0
    bn_stats: BNStats | None = None
    target_loss: float | None = None
    stop_when: StopWhen | None = None
    check_every: int = 100
    progress: bool = False

    #: Fields a subclass does not accept as options.
    EXCLUDED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_options(cls, options: dict[str, Any], attack: str = "ig") -> Self:
        """Validated options; unknown names and bad values raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)} - cls.EXCLUDED
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{attack}: unknown option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(known))}"
            )
        opts = cls(**options)
        opts.validate(attack)
        return opts

    def validate(self, attack: str = "ig") -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"{attack}: {msg}")

        if self.cost not in COSTS:
            raise bad(f"cost must be one of {COSTS}, got {self.cost!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule must be 'step' or None, got {self.schedule!r}")
        if not (isinstance(self.tv, int | float) and self.tv >= 0):
            raise bad(f"tv must be a number >= 0, got {self.tv!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise bad(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("iterations", "restarts", "check_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.init, Tensor) and self.init not in INITS:
            raise bad(f"init must be one of {INITS} or a tensor, got {self.init!r}")
        if self.stop_when is not None and not callable(self.stop_when):
            raise bad("stop_when must be a callable(iteration, images) -> bool")
        if not (isinstance(self.bn_prior, int | float) and self.bn_prior >= 0):
            raise bad(f"bn_prior must be a number >= 0, got {self.bn_prior!r}")
        if self.bn_prior and not self.bn_stats:
            raise bad(
                "bn_prior needs bn_stats (the client's BatchNorm batch statistics, e.g. "
                "gradient_matching.bn_stats_from_buffers of its FedAvg state dict)"
            )


def initial_images(
    init: str | Tensor,
    shape: tuple[int, ...],
    box: tuple[Tensor, Tensor],
    generator: torch.Generator,
) -> Tensor:
    """A starting batch in normalised space on the box's device (drawn on the CPU, seeded)."""
    low, high = box
    if isinstance(init, Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(f"init tensor must have shape {shape}, got {tuple(init.shape)}")
        return init.detach().to(device=low.device, dtype=low.dtype).clone()
    if init == "zeros":
        return torch.zeros(shape, device=low.device, dtype=low.dtype)
    if init == "rand":
        u = torch.rand(shape, generator=generator).to(device=low.device, dtype=low.dtype)
        return low + u * (high - low)
    return torch.randn(shape, generator=generator).to(device=low.device, dtype=low.dtype)


def resolve_labels(case: AttackCase) -> tuple[Tensor, bool]:
    """(the case's labels on the model's device, whether they were recovered)."""
    model, labels, batch_size = case.model, case.labels, case.batch_size
    device = case.device
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).flatten()
        if len(labels) != batch_size:
            raise ValueError(f"batch_size={batch_size} but {len(labels)} labels were given")
        return labels, False
    from .label_recovery import recover_labels  # imported late: a sibling attack module

    recovered = torch.as_tensor(recover_labels(model, list(case.gradients), batch_size))
    return recovered.to(device=device, dtype=torch.long).flatten(), True


def _milestones(iterations: int) -> list[int]:
    return sorted({max(1, math.ceil(iterations * k / 8)) for k in (3, 5, 7)})


def run_ig(attack: str, case: AttackCase, opts: IGOptions) -> AttackResult:
    """Inverting Gradients on ``case`` with validated options; ``attack`` names the result."""
    batch_size, seed = case.batch_size, case.seed
    if batch_size < 1:
        raise ValueError(f"{attack}: batch_size must be >= 1, got {batch_size}")
    with Timer() as timer:
        labels, recovered = resolve_labels(case)
        mask = select_parameters(case.model, opts.layers)
        matcher = GradientMatcher(
            case.model,
            case.gradients,
            mask,
            cost=opts.cost,
            fast=opts.fast,
            noise_seed=seed if opts.noise_seed is None else opts.noise_seed,
            bn_prior=opts.bn_prior,
            bn_stats=opts.bn_stats,
        )
        runs, best, rerouted = optimise_restarts(
            matcher, labels, (batch_size, *case.input_shape), case.pixel_box(), seed, opts
        )
    loss, images, iterations, stopped = runs[best]
    return AttackResult(
        attack=attack,
        images=images.cpu(),
        labels=labels.cpu(),
        loss=loss,
        seconds=timer.seconds,
        info={
            **restart_info(runs, best, opts),
            "labels_recovered": recovered,
            "matched_parameters": list(matcher.names),
            "fast_layers": matcher.fast_layers,
            "rerouted_layers": rerouted,
        },
    )


class Matcher(Protocol):
    """What :func:`optimise_restarts` needs of an objective (a context manager)."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def __call__(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> Tensor: ...

    def prepare(self, x: Tensor, labels: Tensor) -> list[str]: ...


Run = tuple[float, Tensor, int, bool]


def optimise_restarts(
    matcher: Matcher,
    labels: Tensor,
    shape: tuple[int, ...],
    box: tuple[Tensor, Tensor],
    seed: int,
    opts: IGOptions,
) -> tuple[list[Run], int, list[str]]:
    """All restarts of the image optimisation: (runs, index of the best, rerouted layers).

    Each run is (final objective, images, iterations run, stopped early). Runs on the
    device and in the dtype of ``box`` (:meth:`~.base.AttackCase.pixel_box`); restart ``r``
    draws its start from a generator seeded with ``(seed, r)``.
    """
    runs: list[Run] = []
    rerouted: list[str] = []
    with matcher:
        for restart in range(opts.restarts):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + restart)
            x0 = initial_images(opts.init, shape, box, gen)
            if restart == 0:
                rerouted = matcher.prepare(x0, labels)
            runs.append(_optimise(matcher, x0, labels, box, opts, restart))
    best = min(range(len(runs)), key=lambda i: _nan_last(runs[i][0]))
    return runs, best, rerouted


def restart_info(runs: list[Run], best: int, opts: IGOptions) -> dict[str, Any]:
    """The ``info`` entries every image-optimisation attack reports."""
    return {
        "iterations": runs[best][2],
        "restarts": opts.restarts,
        "best_restart": best,
        "restart_losses": [r[0] for r in runs],
        "stopped_early": runs[best][3],
        "cost": opts.cost,
    }


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _optimise(
    matcher: Matcher,
    x0: Tensor,
    labels: Tensor,
    box: tuple[Tensor, Tensor],
    opts: IGOptions,
    restart: int,
) -> tuple[float, Tensor, int, bool]:
    """One restart: (final objective, images, iterations run, stopped early)."""
    low, high = box
    x = x0.clone().requires_grad_(True)
    if opts.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam([x], lr=opts.lr)
    else:
        optimizer = torch.optim.SGD([x], lr=opts.lr, momentum=0.0)
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimizer, _milestones(opts.iterations), gamma=0.1)
        if opts.schedule == "step"
        else None
    )
    stopped = False
    done = 0
    bar = tqdm(
        range(opts.iterations), desc=f"restart {restart}", disable=not opts.progress, leave=False
    )
    for i in bar:
        objective = matcher(x, labels)
        if opts.tv:
            objective = objective + opts.tv * total_variation(x)
        (grad,) = torch.autograd.grad(objective, x)
        x.grad = grad.sign() if opts.signed else grad
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if opts.boxed:
            with torch.no_grad():
                torch.maximum(torch.minimum(x, high), low, out=x)
        done = i + 1
        if done % opts.check_every == 0 and done < opts.iterations:
            value = float(objective.detach())
            bar.set_postfix(loss=f"{value:.4g}")
            if opts.target_loss is not None and value <= opts.target_loss:
                stopped = True
            elif opts.stop_when is not None and opts.stop_when(done, x.detach().clone()):
                stopped = True
            if stopped:
                break
    bar.close()
    # The loss that ranks restarts: the objective at the returned images.
    final = matcher(x.detach(), labels, create_graph=False)
    if opts.tv:
        final = final + opts.tv * total_variation(x.detach())
    return float(final.detach()), x.detach(), done, stopped


@register("ig", memory=gradient_matching_memory)
def ig(case: AttackCase, **options: Any) -> AttackResult:
    """Inverting Gradients on a FedSGD update (options: see the module docstring)."""
    return run_ig("ig", case, IGOptions.from_options(options, "ig"))
