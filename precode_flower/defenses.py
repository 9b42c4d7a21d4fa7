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

Adding a defense (e.g. a ``precode-early`` preset) means adding one :class:`Defense` to
:data:`DEFENSES` in this module; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import ConvNet
from .precode import extend

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseParams",
    "apply_model_defenses",
    "apply_update_defenses",
    "clip_and_noise",
    "has_update_defense",
    "parse_defenses",
    "prune_smallest",
]


@dataclass(frozen=True)
class DefenseParams:
    """Parameters shared by the defenses (each reads only its own).

    Attributes:
        latent_dim: PRECODE latent size K.
        beta: PRECODE KL weight.
        clip: L2 bound C of the whole update for ``noise``.
        sigma: noise multiplier: the Gaussian std is ``sigma * clip``.
        prune_rate: fraction in [0, 1) of update entries zeroed by ``prune``.
    """

    latent_dim: int = 256
    beta: float = 1e-3
    clip: float = 1.0
    sigma: float = 0.01
    prune_rate: float = 0.9

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent-dim must be >= 1, got {self.latent_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.prune_rate < 1.0:
            raise ValueError(f"prune-rate must be a fraction in [0, 1), got {self.prune_rate}")


ModelTransform = Callable[[nn.Module, DefenseParams, Sequence[int]], nn.Module]
UpdateTransform = Callable[[dict[str, Tensor], DefenseParams, torch.Generator], dict[str, Tensor]]


@dataclass(frozen=True)
class Defense:
    """One registered defense: a model transform, an update transform, or both."""

    name: str
    description: str
    model: ModelTransform | None = None
    update: UpdateTransform | None = None


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
        ),
        Defense(
            "noise",
            "clip the update to L2 norm `clip`, add Gaussian noise of std sigma*clip",
            update=_noise,
        ),
        Defense(
            "prune",
            "zero the `prune-rate` fraction of smallest-magnitude update entries",
            update=_prune,
        ),
        Defense(
            "precode-early",
            "preset: convolutional variational bottleneck after the first convolution block "
            "(convnet, resnet18; 8 latent channels, beta 1e-5, initial std 0.69)",
            model=_precode_early,
        ),
    )
}


def parse_defenses(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Canonical defense names from a comma list or a sequence of (comma lists of) names.

    Names are case-insensitive; duplicates are dropped; the result is in registry order.
    ``"none"`` (or an empty spec) means no defense and cannot be combined with others.

    Raises:
        ValueError: for an unknown name, naming the valid choices.
    """
    if spec is None:
        return ()
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = {n.strip().lower() for p in parts for n in str(p).split(",") if n.strip()}
    unknown = sorted(names - DEFENSES.keys())
    if unknown:
        raise ValueError(
            f"unknown defense {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(DEFENSES)} (comma-separated to combine)"
        )
    if "none" in names and len(names) > 1:
        raise ValueError("defense 'none' cannot be combined with other defenses")
    return tuple(n for n in DEFENSES if n in names and n != "none")


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
