"""What every attack shares: its input case, its result type, the registry, input checking."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from ..precode import BOTTLENECK_TYPES
from .memory import MemoryEstimator, generic_memory

Gradients = Sequence[Tensor] | Mapping[str, Tensor]


@dataclass
class AttackResult:
    """What an attack reconstructed from one client update.

    Attributes:
        attack: registry name of the attack.
        images: (B, C, H, W) reconstructions in the model's input normalisation, on the CPU.
        labels: (B,) labels the attack used (given) or recovered; None if it has none.
        loss: final attack objective (e.g. gradient distance); NaN where it has none.
        seconds: wall time of the attack.
        recovered: how many of the B images the attack claims to have recovered exactly
            (analytic attacks on batches); None when the attack makes no such claim.
        info: attack-specific extras (JSON-serialisable scalars and lists only).
    """

    attack: str
    images: Tensor
    labels: Tensor | None
    loss: float
    seconds: float
    recovered: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class AttackCase:
    """One client update to attack, checked and normalised by :func:`~.reconstruct`.

    Built once per run and handed to the attack; an attack that runs another one (or a
    helper of one) on a variant passes ``dataclasses.replace(case, ...)``. Not compared or
    hashed by value (``eq=False``): it holds a model and tensors.

    Unlike :class:`~.memory.MemoryCase` (sizes only, known before a run, in the process that
    plans it), this holds the model and the update themselves.

    Attributes:
        model: the model the client computed its update on; attacks leave it as it was.
        gradients: per-parameter tensors in ``model.parameters()`` order, shapes checked, on
            the model's device and in its dtype (a weight update for ``inputs="weights"``).
        labels: (B,) int64 labels on the model's device if known, else None.
        input_shape: (C, H, W) of one example.
        mean, std: the input normalisation, one value per channel.
        batch_size: examples behind the update (``len(labels)`` when labels are given).
        seed: seeds every random choice of the attack.
    """

    model: nn.Module
    gradients: list[Tensor]
    labels: Tensor | None
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    seed: int

    @property
    def device(self) -> torch.device:
        """The device of the model (where the attack runs)."""
        return next(self.model.parameters()).device

    def pixel_box(self) -> tuple[Tensor, Tensor]:
        """(low, high): pixel values 0 and 1 in normalised space, shaped (1, C, 1, 1), on
        the model's device and in its dtype."""
        param = next(self.model.parameters())
        m = torch.tensor(self.mean, device=param.device, dtype=param.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=param.device, dtype=param.dtype).view(1, -1, 1, 1)
        return -m / s, (1 - m) / s


class Attack(Protocol):
    """An attack: the case it runs on, plus its own keyword options (documented in its
    module); unknown options raise."""

    def __call__(self, case: AttackCase, /, **options: Any) -> AttackResult: ...


InputKind = Literal["gradients", "weights"]
#: What an attack can return: reconstructed images, labels.
OUTPUTS: tuple[str, ...] = ("images", "labels")
#: ``applies(model, input_shape)``: None if the attack applies to the model, else why not.
Applicability = Callable[[nn.Module, Sequence[int]], str | None]


@dataclass(frozen=True)
class AttackSpec:
    """What the registry knows of an attack besides its function; callers (the auditor,
    plotting, benchmarks) read these declarations instead of comparing attack names.

    Attributes:
        name: registry name.
        fn: the attack.
        memory: its peak-memory estimator (:mod:`.memory`); an attack registered without
            one gets :func:`~.memory.generic_memory`, a deliberately safe default.
        inputs: ``"gradients"`` (a FedSGD gradient; a weight update is turned into a
            pseudo-gradient for it) or ``"weights"`` (the weight update itself, with the
            client's local training as the options ``local_steps``, ``local_lr`` and
            ``local_batch_size``).
        outputs: which of :data:`OUTPUTS` it returns (images are scored, labels counted).
        applies: its applicability test, or None (applies to every model).
    """

    name: str
    fn: Attack
    memory: MemoryEstimator = generic_memory
    inputs: InputKind = "gradients"
    outputs: frozenset[str] = frozenset(OUTPUTS)
    applies: Applicability | None = None

    def why_not(self, model: nn.Module, input_shape: Sequence[int]) -> str | None:
        """None if the attack applies to ``model``, else the reason (one line)."""
        return None if self.applies is None else self.applies(model, input_shape)


ATTACKS: dict[str, Attack] = {}
#: name -> :class:`AttackSpec`, kept in step with :data:`ATTACKS` by :func:`register`.
SPECS: dict[str, AttackSpec] = {}


def register(
    name: str,
    *,
    memory: MemoryEstimator | None = None,
    inputs: InputKind = "gradients",
    outputs: Iterable[str] = OUTPUTS,
    applies: Applicability | None = None,
) -> Callable[[Attack], Attack]:
    """Decorator adding an attack to :data:`ATTACKS` under ``name``, with its declarations
    (see :class:`AttackSpec`).

    The attack is a function ``fn(case: AttackCase, **options) -> AttackResult``; whatever
    its kind (``inputs``), adding one is its module plus this registration (and the import
    line in the package's ``__init__``)."""
    outs = frozenset(outputs)
    if inputs not in ("gradients", "weights"):
        raise ValueError(f"attack {name!r}: inputs must be 'gradients' or 'weights'")
    if not outs or not outs <= set(OUTPUTS):
        raise ValueError(f"attack {name!r}: outputs must be a non-empty subset of {OUTPUTS}")

    def deco(fn: Attack) -> Attack:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = fn
        SPECS[name] = AttackSpec(name, fn, memory or generic_memory, inputs, outs, applies)
        return fn

    return deco


def spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of ``name`` (one is made for an attack put in
    :data:`ATTACKS` by hand, with the defaults)."""
    if name not in SPECS or SPECS[name].fn is not ATTACKS[name]:
        SPECS[name] = AttackSpec(name, ATTACKS[name])
    return SPECS[name]


def reconstructs_images(name: str) -> bool:
    """Whether attack ``name`` returns images to score (True for a name not registered here,
    e.g. in rows of an earlier run)."""
    return name not in ATTACKS or "images" in spec(name).outputs


def as_gradient_list(model: nn.Module, gradients: Gradients) -> list[Tensor]:
    """Gradients as a list aligned with ``model.named_parameters()``, shapes checked.

    Accepts a sequence in parameter order or a mapping from parameter name to tensor.
    Raises ValueError naming the first missing or mismatching parameter.
    """
    named = list(model.named_parameters())
    if isinstance(gradients, Mapping):
        missing = [n for n, _ in named if n not in gradients]
        if missing:
            raise ValueError(f"gradients: no entry for parameter {missing[0]!r}")
        grads = [gradients[n] for n, _ in named]
    else:
        grads = list(gradients)
        if len(grads) != len(named):
            raise ValueError(
                f"gradients: got {len(grads)} tensors for {len(named)} parameters of the model"
            )
    out = []
    for (name, param), g in zip(named, grads, strict=True):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(param.shape):
            raise ValueError(
                f"gradients: parameter {name!r} expects shape {tuple(param.shape)}, "
                f"got {tuple(g.shape)}"
            )
        out.append(g.detach().to(device=param.device, dtype=param.dtype))
    return out


def parameters_before_bottleneck(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the parameters used in the forward pass before the first PRECODE bottleneck.

    Traced with a dry forward pass, so it is right whatever the registration order.
    Raises ValueError if the model has no bottleneck.
    """
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _a: order.append(mod)) for m in model.modules()
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    first = next((i for i, m in enumerate(order) if isinstance(m, BOTTLENECK_TYPES)), None)
    if first is None:
        raise ValueError("the model has no PRECODE bottleneck")
    before = {id(p) for m in order[:first] for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) in before]


def select_parameters(
    model: nn.Module, layers: Iterable[str] | Callable[[str], bool] | None
) -> list[bool]:
    """Mask over ``model.named_parameters()``: which gradients an attack should match.

    ``layers`` is None (all), a predicate on the parameter name, or names / module
    prefixes (``"0"`` selects ``0.weight`` and ``0.bias``). Unknown names raise ValueError.
    """
    names = [n for n, _ in model.named_parameters()]
    if layers is None:
        return [True] * len(names)
    if callable(layers):
        return [bool(layers(n)) for n in names]
    wanted = list(layers)
    mask = [any(n == w or n.startswith(w + ".") for w in wanted) for n in names]
    for w in wanted:
        if not any(n == w or n.startswith(w + ".") for n in names):
            raise ValueError(f"layers: {w!r} matches no parameter of the model")
    if not any(mask):
        raise ValueError("layers: the selection is empty")
    return mask


class Timer:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
