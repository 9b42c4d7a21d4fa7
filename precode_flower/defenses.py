"""Client-side defenses against gradient inversion, in one registry.

A run names its defenses as a comma list (``"precode,noise"``); :func:`parse_defenses`
checks the names against :data:`DEFENSES`. A defense acts at one or both of two points:

- **model**: it changes the network every party builds (``precode`` inserts the PRECODE
  variational bottleneck before the classifier with :func:`precode_flower.extend`). Server
  and clients apply it identically, so the exchanged arrays have the same names and shapes.
- **update**: it transforms what a client sends, after local computation. For FedSGD the
  update is the gradient; for FedAvg it is the weight *difference* ``w_local - w_global`` of
  the trainable parameters (buffers such as BatchNorm statistics are sent unchanged), and
  the client sends ``w_global + defended difference``.

Update defenses always run in registry order, whatever order the run lists them in:
``noise`` (clip the whole update to L2 norm ``clip``, then add N(0, (sigma * clip)^2) to each
entry) before ``prune`` (zero the ``prune_rate`` fraction of entries with the smallest
magnitude, as gradient compression). Pruning after noising is post-processing, so it keeps
the noise's guarantee and the update stays sparse (noise added after pruning would refill
the zeros).

Why not Flower's ``LocalDpMod`` / ``fixedclipping_mod``: those mods clip the *difference
between the returned and the received ArrayRecord*, which is the right quantity for FedAvg
weights but meaningless for FedSGD, where the reply is a gradient with the parameters'
names but not the received state dict's (the received record also holds buffers, so the
mods' key check fails). ``fixedclipping_mod`` additionally needs Flower's server-side DP
wrapper to send the norm, and ``LocalDpMod`` derives the noise std from (epsilon, delta)
rather than a multiplier. Doing clipping and noise here, on tensors, gives one behaviour
for both modes, keeps the core free of Flower, and makes the noise seeded (reproducible
runs). The mechanism is the same Gaussian mechanism those mods implement.

A third point, **federation**, is Flower's: ``dp-server`` and ``dp-client`` are central
differential privacy through Flower's own strategy wrappers and client mods
(``precode_flower.strategies.privacy``; parameters in :class:`DpParams`), and ``secagg`` is
Flower's SecAgg+ protocol (``precode_flower.strategies.secagg``). The core only names them;
what they do and guarantee is documented there and in docs/PRIVACY.md.

Presets (:data:`PRESETS`) are names for combinations (``dp-precode-early`` is
``precode-early`` + ``dp-client``); :func:`parse_defenses` expands them.

Adding a defense (e.g. a ``precode-early`` preset) means adding one :class:`Defense` to
:data:`DEFENSES` in this module; nothing else needs to change. Adding a parameter means
adding one field to :class:`DefenseParams` (or :class:`DpParams`), declared with
:func:`precode_flower.settings.setting`, and naming it in the :attr:`Defense.params` of the
defenses that read it: :class:`precode_flower.task.RunConfig` inherits the field, so its
run-config key, ``simulate.py`` / ``server.py`` flag, check and ``pyproject.toml`` line
(regenerate that with :func:`precode_flower.settings.toml_lines`) follow from it, and the
attack CLI gets a flag for the parameters of model defenses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import settings
from .models import ConvNet
from .precode import extend
from .settings import setting

__all__ = [
    "DEFENSES",
    "DP_CLIPPING",
    "DP_DEFENSES",
    "PRESETS",
    "Defense",
    "DefenseParams",
    "DpParams",
    "apply_model_defenses",
    "apply_update_defenses",
    "check_federation_defenses",
    "clip_and_noise",
    "dp_defense",
    "has_update_defense",
    "parse_defenses",
    "prune_smallest",
]


@dataclass(frozen=True)
class DefenseParams:
    """Parameters of the model and update defenses; each defense reads only the fields it
    names in :attr:`Defense.params`.

    Declared once, here: :class:`precode_flower.task.RunConfig` inherits these fields, so each
    is also a run-config key, a flag and a ``pyproject.toml`` line (and, for a model
    defense, a flag of ``python -m precode_flower.attack``). Values are checked on
    construction (:func:`precode_flower.settings.validate`; ValueError naming the key).
    """

    latent_dim: int = setting(256, "PRECODE latent size K", low=1)
    beta: float = setting(1e-3, "PRECODE KL weight", low=0)
    #: ``noise``: L2 bound C of the whole update; the Gaussian std is ``sigma * clip``.
    clip: float = setting(1.0, "noise defense: L2 clipping bound C", low=0, low_open=True)
    sigma: float = setting(0.01, "noise defense: std = sigma * C", low=0)
    prune_rate: float = setting(
        0.9, "prune defense: fraction zeroed", low=0, high=1, high_open=True
    )

    def __post_init__(self) -> None:
        settings.validate(self)


#: How ``dp-server`` / ``dp-client`` clip: one fixed norm, or Andrew et al.'s adaptive norm.
DP_CLIPPING: tuple[str, ...] = ("fixed", "adaptive")


@dataclass(frozen=True)
class DpParams:
    """Parameters of ``dp-server`` / ``dp-client`` (Flower's central DP wrappers).

    Declared once, like :class:`DefenseParams` (RunConfig inherits them; the field name is
    the run-config key). ``dp_noise`` is z: the aggregate gets N(0, (z * C / n)^2) per
    entry, for n sampled clients and clipping norm C = ``dp_clip``; ``dp_quantile``,
    ``dp_clip_lr`` and ``dp_count_stddev`` are the adaptive clipping's
    ``target_clipped_quantile``, ``clip_norm_lr`` and ``clipped_count_stddev`` in Flower
    (see docs/PRIVACY.md).
    """

    dp_noise: float = setting(1.0, "DP noise multiplier z (0: clipping only)", low=0)
    dp_clip: float = setting(1.0, "DP clipping norm C (adaptive: initial)", low=0, low_open=True)
    dp_clipping: str = setting("fixed", "DP clipping of each client update", choices=DP_CLIPPING)
    dp_delta: float = setting(
        1e-5, "delta at which epsilon is reported", low=0, low_open=True, high=1, high_open=True
    )
    dp_quantile: float = setting(0.5, "adaptive clipping: target quantile", low=0, high=1)
    dp_clip_lr: float = setting(0.2, "adaptive clipping: bound learning rate", low=0, low_open=True)
    dp_count_stddev: float = setting(
        0.0, "adaptive clipping: noise std on the clipped count", low=0, zero="sampled clients / 20"
    )

    def __post_init__(self) -> None:
        settings.validate(self)


ModelTransform = Callable[[nn.Module, DefenseParams, Sequence[int]], nn.Module]
UpdateTransform = Callable[[dict[str, Tensor], DefenseParams, torch.Generator], dict[str, Tensor]]


@dataclass(frozen=True)
class Defense:
    """One registered defense: a model transform, an update transform, or both.

    ``params``: the :class:`DefenseParams` fields its transforms read (the DP defenses read
    all of :class:`DpParams`).
    """

    name: str
    description: str
    model: ModelTransform | None = None
    update: UpdateTransform | None = None
    federation: bool = False  # acts in the Flower federation (strategies/privacy, secagg)
    params: tuple[str, ...] = ()


def clip_and_noise(
    update: Mapping[str, Tensor], clip: float, sigma: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Scale the whole update to L2 norm <= ``clip``, then add N(0, (sigma*clip)^2) noise."""
    norm = torch.sqrt(sum((t.double().pow(2).sum() for t in update.values()), torch.zeros(())))
    scale = min(1.0, clip / float(norm)) if float(norm) > 0 else 1.0
    std = sigma * clip
    out = {}
    for name, t in update.items():
        clipped = t * scale
        if std > 0:
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)
            clipped = clipped + std * noise
        out[name] = clipped
    return out


def prune_smallest(update: Mapping[str, Tensor], rate: float) -> dict[str, Tensor]:
    """Zero the ``rate`` fraction of entries with the smallest magnitude, over the whole update.

    Exactly ``round(rate * n)`` entries are zeroed (ties broken by position).
    """
    flat = torch.cat([t.reshape(-1) for t in update.values()]) if update else torch.zeros(0)
    k = int(round(rate * flat.numel()))
    if k == 0:
        return {n: t.clone() for n, t in update.items()}
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, largest=False, sorted=False).indices] = False
    out, start = {}, 0
    for name, t in update.items():
        mask = keep[start : start + t.numel()].view_as(t)
        out[name] = t * mask
        start += t.numel()
    return out


def _precode(model: nn.Module, p: DefenseParams, input_shape: Sequence[int]) -> nn.Module:
    return extend(model, latent_dim=p.latent_dim, beta=p.beta, input_shape=tuple(input_shape))


#: ``precode-early``: a convolutional variational bottleneck right after the first convolution
#: block, so that only that block's gradient precedes it (the adaptive ``ignore-bottleneck``
#: attack then has too few equations, and no Linear layer sees the raw image). Placement per
#: architecture: before the ConvNet's second convolution (after conv1 + ReLU), before the
#: ResNet's first residual stage (after the stem: inside a block the skip path would bypass it).
EARLY_PLACEMENT: dict[str, str] = {"ConvNet": "features.2", "ResNet": "layer1"}
EARLY_LATENT_CHANNELS = 8
#: The KL sums over every latent entry (8 x 32 x 32 = 8,192 for CIFAR-10, not PRECODE's 256),
#: so PRECODE's beta of 1e-3 makes it dominate the loss and collapse the latent (chance
#: accuracy, measured); 1e-5 keeps it comparable to the cross-entropy.
EARLY_BETA = 1e-5
#: The posterior std is PRECODE's softplus(s), about 0.69 at initialisation, so the noise hides
#: the input from the first round on (an earlier, shifted std of 0.007 let ``ig`` partly
#: reconstruct CIFAR-10 images; at 0.13 MNIST digits stayed recognisable). beta 1e-4 collapsed
#: the latent (chance accuracy).


def _early_placement(model: nn.Module) -> str | None:
    """Where ``precode-early`` goes in ``model`` (None: not a ConvNet or torchvision ResNet)."""
    if isinstance(model, ConvNet):
        return EARLY_PLACEMENT["ConvNet"]
    # By class name, so that torchvision (a heavy import) is only loaded by ResNet users.
    for cls in type(model).__mro__:
        if cls.__name__ == "ResNet" and cls.__module__.startswith("torchvision."):
            return EARLY_PLACEMENT["ResNet"]
    return None


def _precode_early(model: nn.Module, p: DefenseParams, input_shape: Sequence[int]) -> nn.Module:
    before = _early_placement(model)
    if before is None:
        raise ValueError(
            "precode-early places its bottleneck after the first convolution block of the "
            f"convnet or resnet18 models, not of a {type(model).__name__}; use 'precode'"
        )
    return extend(
        model,
        before=before,
        latent_channels=EARLY_LATENT_CHANNELS,
        beta=EARLY_BETA,
        input_shape=tuple(input_shape),
    )


def _noise(u: dict[str, Tensor], p: DefenseParams, g: torch.Generator) -> dict[str, Tensor]:
    return clip_and_noise(u, p.clip, p.sigma, g)


def _prune(u: dict[str, Tensor], p: DefenseParams, g: torch.Generator) -> dict[str, Tensor]:
    return prune_smallest(u, p.prune_rate)


#: The registry. Order matters: model and update transforms are applied in this order.
DEFENSES: dict[str, Defense] = {
    d.name: d
    for d in (
        Defense("none", "no defense"),
        Defense(
            "precode",
            "PRECODE variational bottleneck before the classifier (latent-dim, beta; "
            "std = softplus, as in the paper)",
            model=_precode,
            params=("latent_dim", "beta"),
        ),
        Defense(
            "noise",
            "clip the update to L2 norm `clip`, add Gaussian noise of std sigma*clip",
            update=_noise,
            params=("clip", "sigma"),
        ),
        Defense(
            "prune",
            "zero the `prune-rate` fraction of smallest-magnitude update entries",
            update=_prune,
            params=("prune_rate",),
        ),
        Defense(
            "precode-early",
            "preset: convolutional variational bottleneck after the first convolution block "
            "(convnet, resnet18; 8 latent channels, beta 1e-5, initial std 0.69)",
            model=_precode_early,
        ),
        Defense(
            "dp-server",
            "central DP, Flower's server-side clipping wrapper: the server clips each update "
            "to dp-clip and noises the aggregate (z = dp-noise); epsilon per round",
            federation=True,
        ),
        Defense(
            "dp-client",
            "central DP, Flower's client-side clipping wrapper + clipping mod: each client "
            "clips its update, the server noises the aggregate; epsilon per round",
            federation=True,
        ),
        Defense(
            "secagg",
            "Flower's SecAgg+ secure aggregation: the server only ever sees the sum",
            federation=True,
        ),
    )
}

#: The central DP defenses (at most one per run).
DP_DEFENSES: tuple[str, ...] = ("dp-server", "dp-client")

#: Named combinations. DP beside secure aggregation must clip on the clients (the server
#: never sees an individual update to clip), and the DP + ``precode-early`` preset clips
#: there too, so that both DP presets run the same mechanism.
PRESETS: dict[str, tuple[str, ...]] = {
    "dp-precode-early": ("precode-early", "dp-client"),
    "dp-secagg": ("dp-client", "secagg"),
    "precode-early-secagg": ("precode-early", "secagg"),
}


def parse_defenses(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Canonical defense names from a comma list or a sequence of (comma lists of) names.

    Names are case-insensitive; presets (:data:`PRESETS`) expand to their parts; duplicates
    are dropped; the result is in registry order. ``"none"`` (or an empty spec) means no
    defense and cannot be combined with others.

    Raises:
        ValueError: for an unknown name, naming the valid choices, or both DP defenses.
    """
    if spec is None:
        return ()
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = {n.strip().lower() for p in parts for n in str(p).split(",") if n.strip()}
    unknown = sorted(names - DEFENSES.keys() - PRESETS.keys())
    if unknown:
        raise ValueError(
            f"unknown defense {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join([*DEFENSES, *PRESETS])} (comma-separated to combine)"
        )
    if "none" in names and len(names) > 1:
        raise ValueError("defense 'none' cannot be combined with other defenses")
    names = {m for n in names for m in PRESETS.get(n, (n,))}
    if all(d in names for d in DP_DEFENSES):
        raise ValueError("choose one of dp-server and dp-client, not both")
    return tuple(n for n in DEFENSES if n in names and n != "none")


def check_federation_defenses(defenses: Sequence[str], mode: str, model: str) -> None:
    """Raise ValueError (one line, naming the problem) for federation defenses that cannot
    work in this run: Flower's DP wrappers and mods clip the difference between a reply and
    the global model it answers, so they need FedAvg weight replies (a FedSGD reply is a
    gradient: use ``noise``), and they clip and noise every array of the record, so the
    model must have no integer buffers (resnet18's BatchNorm counters); a server that
    only sees the SecAgg+ sum cannot clip individual updates (``dp-server``)."""
    names = parse_defenses(defenses)
    dp = next((n for n in names if n in DP_DEFENSES), None)
    if dp and mode != "fedavg":
        raise ValueError(
            f"{dp} needs mode fedavg: Flower's DP wrappers clip reply - global model, and a "
            "FedSGD reply is a gradient (use the 'noise' defense for FedSGD)"
        )
    if dp and model == "resnet18":
        raise ValueError(
            f"{dp} needs a model without BatchNorm buffers (mlp, convnet): Flower's DP "
            "wrappers clip and noise every array, integer counters included"
        )
    if dp == "dp-server" and "secagg" in names:
        raise ValueError(
            "dp-server cannot run with secagg: the server never sees an update to clip; "
            "use dp-client (preset dp-secagg)"
        )


def dp_defense(defenses: Sequence[str]) -> str | None:
    """``"dp-server"``, ``"dp-client"`` or None: the central DP defense among ``defenses``."""
    return next((n for n in parse_defenses(defenses) if n in DP_DEFENSES), None)


def apply_model_defenses(
    model: nn.Module,
    defenses: Sequence[str],
    params: DefenseParams,
    input_shape: Sequence[int],
) -> nn.Module:
    """Apply the model transforms of ``defenses`` (canonical names) and return the model."""
    for name in parse_defenses(defenses):
        transform = DEFENSES[name].model
        if transform is not None:
            model = transform(model, params, input_shape)
    return model


def has_update_defense(defenses: Sequence[str]) -> bool:
    """Whether any of ``defenses`` transforms the update (not only the model)."""
    return any(DEFENSES[n].update is not None for n in parse_defenses(defenses))


def apply_update_defenses(
    update: Mapping[str, Tensor],
    defenses: Sequence[str],
    params: DefenseParams,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Apply the update transforms of ``defenses`` to a {name: tensor} update, in registry order.

    Only floating-point tensors are transformed; others pass through unchanged.
    """
    floats = {n: t for n, t in update.items() if t.is_floating_point()}
    for name in parse_defenses(defenses):
        transform = DEFENSES[name].update
        if transform is not None:
            floats = transform(floats, params, generator)
    return {n: floats.get(n, t) for n, t in update.items()}
