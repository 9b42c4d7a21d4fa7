"""PRECODE: a variational bottleneck inserted into any network to enhance privacy.

Scheliga, Mäder, Seeland, "PRECODE - A Generic Model Extension to Prevent Deep
Gradient Leakage", WACV 2022. The bottleneck encodes its input to the mean and
(softplus) standard deviation of a K-dimensional Gaussian latent, draws a
reparameterised sample, and decodes it back to the input's shape. Its KL
divergence to a standard normal, weighted by ``beta``, is added to the task
loss (see :func:`precode_loss`).

For feature-map inputs, :class:`ConvVariationalBottleneck` does the same with
convolutions (as in the authors' follow-up on convolutional variational
bottlenecks), so that placing it early in a CNN keeps the parameter count small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EvalMode = Literal["sample", "mean"]
_LN2 = math.log(2.0)


def gaussian_kl_bits(mu: Tensor, std: Tensor) -> Tensor:
    """KL(N(mu, std^2) || N(0, 1)) in bits: summed over latent dims, averaged over the batch."""
    var = std.pow(2)
    # The floor keeps the log finite if softplus underflows to 0 in float32.
    kl_nats = 0.5 * (mu.pow(2) + var - 1.0 - torch.log(var.clamp_min(1e-30)))
    return kl_nats.flatten(1).sum(1).mean() / _LN2


class _Bottleneck(nn.Module):
    """Shared sampling, KL bookkeeping and evaluation behaviour of both bottlenecks."""

    def __init__(self, beta: float, eval_mode: EvalMode) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if eval_mode not in ("sample", "mean"):
            raise ValueError(f"eval_mode must be 'sample' or 'mean', got {eval_mode!r}")
        self.beta = float(beta)
        self.eval_mode: EvalMode = eval_mode
        #: KL (bits) of the latest forward pass; read by :func:`precode_loss`.
        self.kl: Tensor | None = None

    encoder: nn.Module
    decoder: nn.Module

    def _check(self, x: Tensor) -> Tensor:
        """The encoder's input for ``x`` (ValueError naming the expected shape if it is wrong)."""
        raise NotImplementedError

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, std) of the latent Gaussian for input ``x``.

        The encoder's output is split in two halves along dim 1, ``mu`` and ``s``, and
        ``std = softplus(s)``: the paper's parameterisation, without an offset. At
        initialisation ``s`` is near 0, so the std is near ln 2 = 0.69 and the latent is
        noisy from the first step on; that noise is what defeats gradient inversion.
        """
        mu, s = self.encoder(self._check(x)).chunk(2, dim=1)
        return mu, F.softplus(s)

    def forward(self, x: Tensor) -> Tensor:
        mu, std = self.posterior(x)
        self.kl = gaussian_kl_bits(mu, std)
        if not self.training and self.eval_mode == "mean":
            z = mu
        else:
            z = mu + std * torch.randn_like(std)  # the reparameterised sample
        return self.decoder(z).view_as(x)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eval_mode={self.eval_mode!r}"


class VariationalBottleneck(_Bottleneck):
    """Fully connected variational bottleneck (the paper's PRECODE module).

    The input is flattened from dim 1 on; the output has the input's exact shape. The
    encoder's output is split into the latent mean ``mu`` and ``s``; the std is ``softplus(s)``
    and the sample ``mu + std * eps`` with ``eps ~ N(0, I)``, as in the paper (no offset).

    Args:
        in_features: number of input features per example (product of the non-batch dims).
        latent_dim: K, the size of the Gaussian latent.
        beta: weight of the KL term in :func:`precode_loss`.
        eval_mode: at evaluation, ``"mean"`` decodes the latent mean (deterministic);
            ``"sample"`` keeps sampling as the paper's code does. Training always samples.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int = 256,
        beta: float = 1e-3,
        eval_mode: EvalMode = "mean",
    ) -> None:
        super().__init__(beta, eval_mode)
        if in_features < 1 or latent_dim < 1:
            raise ValueError(
                f"in_features and latent_dim must be >= 1, got {in_features}, {latent_dim}"
            )
        self.in_features = in_features
        self.latent_dim = latent_dim
        self.encoder = nn.Linear(in_features, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, in_features)

    def _check(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"VariationalBottleneck expects {self.in_features} features per example, "
                f"got input of shape {tuple(x.shape)}"
            )
        return flat


class ConvVariationalBottleneck(_Bottleneck):
    """Convolutional variational bottleneck for feature maps (N, C, H, W).

    A ``kernel_size`` convolution encodes to ``2 * latent_channels`` maps (mean and
    pre-softplus std, as in :class:`VariationalBottleneck`), and another decodes the sample
    back to C maps of the same H, W.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int | None = None,
        beta: float = 1e-3,
        kernel_size: int = 3,
        eval_mode: EvalMode = "mean",
    ) -> None:
        super().__init__(beta, eval_mode)
        latent_channels = latent_channels or in_channels
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the map size, got {kernel_size}")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        pad = kernel_size // 2
        self.encoder = nn.Conv2d(in_channels, 2 * latent_channels, kernel_size, padding=pad)
        self.decoder = nn.Conv2d(latent_channels, in_channels, kernel_size, padding=pad)

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvVariationalBottleneck expects (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return x


BOTTLENECK_TYPES = (VariationalBottleneck, ConvVariationalBottleneck)


class Precoded(nn.Module):
    """``module`` preceded by a PRECODE bottleneck: ``module(precode(x), *rest)``."""

    def __init__(self, precode: nn.Module, module: nn.Module) -> None:
        super().__init__()
        self.precode = precode
        self.module = module

    def forward(self, x: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        return self.module(self.precode(x), *args, **kwargs)


def bottlenecks(model: nn.Module) -> list[tuple[str, _Bottleneck]]:
    """All PRECODE bottlenecks of ``model`` as (qualified name, module), in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BOTTLENECK_TYPES)]


def precode_loss(model: nn.Module) -> Tensor:
    """Sum of ``beta * KL`` over every bottleneck's latest forward pass (0 if there is none)."""
    terms = [m.beta * m.kl for _, m in bottlenecks(model) if m.kl is not None]
    if terms:
        return torch.stack(terms).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) for a dotted submodule name; ValueError if absent."""
    try:
        target = model.get_submodule(name)
    except AttributeError as err:
        known = [n for n, _ in model.named_modules() if n]
        preview = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise ValueError(f"extend(before={name!r}): no such submodule. Known: {preview}") from err
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, target


def _forward_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of leaf modules in the order a forward pass calls them."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        m.register_forward_pre_hook(lambda mod, _args: order.append(names[mod]))
        for m in model.modules()
        if not list(m.children())
    ]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order


def find_classifier(model: nn.Module, input_shape: Sequence[int] | None = None) -> str:
    """Name of the model's final classifier: the last ``nn.Linear`` reached in the forward pass.

    With ``input_shape`` the forward order is traced; without it, registration order is
    used (which is the forward order for MLPs, typical CNNs and torchvision's ResNets).
    """
    if input_shape is not None:
        candidates = _forward_order(model, input_shape)
    else:
        candidates = [n for n, _ in model.named_modules()]
    linears = [n for n in candidates if isinstance(model.get_submodule(n), nn.Linear) and n]
    if not linears:
        raise ValueError(
            f"extend: {type(model).__name__} has no nn.Linear classifier layer to place PRECODE "
            "before; pass before='name.of.module' to choose the placement"
        )
    return linears[-1]


def _features_in(module: nn.Module) -> tuple[str, int] | None:
    """('linear', in_features) or ('conv', in_channels) for the first layer a module applies."""
    for m in [module, *module.modules()]:
        if isinstance(m, nn.Linear):
            return "linear", m.in_features
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.GroupNorm):
            channels = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
            return "conv", channels or m.num_channels
    return None


def extend(
    model: nn.Module,
    *,
    latent_dim: int = 256,
    beta: float = 1e-3,
    before: str | None = None,
    input_shape: Sequence[int] | None = None,
    latent_channels: int | None = None,
    eval_mode: EvalMode = "mean",
) -> nn.Module:
    """Insert a PRECODE bottleneck into ``model`` (in place) and return it.

    Args:
        model: any ``nn.Module``; its source is not edited.
        latent_dim: K of a fully connected bottleneck.
        beta: KL weight (see :func:`precode_loss`).
        before: dotted name of the submodule to precede. ``None`` places the bottleneck
            before the final classifier layer (:func:`find_classifier`). Before a module
            whose input is a feature map (a conv/norm stage), a convolutional bottleneck
            with ``latent_channels`` (default: as many as the input) is used.
        input_shape: (C, H, W) of one example; used to trace the forward order, and needed
            when the input size of ``before`` cannot be read off its first layer.
        eval_mode: see :class:`VariationalBottleneck`.

    Raises:
        ValueError: when the placement cannot be found or its input size is unknown.
    """
    name = before if before is not None else find_classifier(model, input_shape)
    parent, attr, target = _resolve(model, name)
    if isinstance(target, Precoded):
        raise ValueError(f"extend: {name!r} already has a PRECODE bottleneck")
    kind = _features_in(target)
    if kind is None and input_shape is not None:
        seen: list[Tensor] = []
        hook = target.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            _forward_order(model, input_shape)
        finally:
            hook.remove()
        if seen:
            x = seen[0]
            kind = ("conv", x.shape[1]) if x.dim() == 4 else ("linear", x[0].numel())
    if kind is None:
        raise ValueError(
            f"extend: cannot tell the input size of {name!r} ({type(target).__name__}); "
            "pass input_shape=(C, H, W) so it can be traced"
        )
    layer, size = kind
    if layer == "conv":
        precode: nn.Module = ConvVariationalBottleneck(
            size, latent_channels, beta=beta, eval_mode=eval_mode
        )
    else:
        precode = VariationalBottleneck(size, latent_dim, beta=beta, eval_mode=eval_mode)
    param = next(target.parameters(), None)
    if param is not None:
        precode.to(device=param.device, dtype=param.dtype)
    wrapped = Precoded(precode, target)
    if attr == "":  # the model itself is the target
        return wrapped
    setattr(parent, attr, wrapped)
    return model
