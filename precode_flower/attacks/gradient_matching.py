"""Gradient matching objective shared by the optimisation attacks (``ig``, ``ignore-bottleneck``).

:class:`GradientMatcher` evaluates how far the training gradient of a candidate batch is from
a client's gradient, as ``cosine`` (1 - cosine similarity over all selected parameters jointly)
or ``l2`` (squared Euclidean distance). Both only need three scalars: <g, G>, ||g||^2 and the
constant ||G||^2, where g is the candidate's gradient and G the target.

Why it is fast: for a fully connected layer z = a W^T + b the weight gradient is the outer
product sum D^T A (A the layer inputs, D the loss gradients w.r.t. its outputs, one row per
example). A straightforward attack materialises it, differentiates through it and pays several
full weight-sized tensors per iteration. Instead we use

    <D^T A, G> = sum(D * (A @ G^T))          ||D^T A||^2 = sum((D @ D^T) * (A @ A^T))

which need one product with the (fixed) target per layer and tiny N x N Gram matrices. The
inputs A are captured by forward hooks, the output gradients D with one
``autograd.grad(loss, outputs, create_graph=True)``, and a single backward pass then takes the
objective to the image. Other parameters (convolutions, norms, ...) take the plain route: their
gradient comes from the same ``autograd.grad`` call. When the Gram route would cost more than
materialising (N > in*out / (in+out) rows), a layer's gradient is materialised instead.

The candidate's gradient is computed exactly as the client computes its update
(:func:`precode_flower.training.loss_fn` in train mode: cross-entropy + PRECODE loss). Random
layers (the PRECODE bottleneck's sample, dropout) draw the same noise in every evaluation: the
global RNG is reseeded with ``noise_seed`` before each forward pass, inside a forked RNG so that
the caller's random state is untouched. While attached the matcher puts the model in train mode
and sets ``requires_grad`` as it needs; on exit it restores modes, ``requires_grad`` flags,
buffers (e.g. BatchNorm running statistics) and bottleneck KL caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..precode import bottlenecks
from ..training import loss_fn

Cost = Literal["cosine", "l2"]
COSTS: tuple[str, ...] = ("cosine", "l2")


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV as in Inverting Gradients: mean |horizontal| + mean |vertical| differences."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def distance(dot: Tensor, sq: Tensor, target_sq: Tensor, cost: Cost) -> Tensor:
    """Cost from <g, G>, ||g||^2 and ||G||^2."""
    if cost == "cosine":
        # clamp: a candidate whose gradient vanishes (e.g. dead ReLUs) gives cost 1, not NaN.
        return 1.0 - dot / (sq.clamp_min(1e-30).sqrt() * target_sq.clamp_min(1e-30).sqrt())
    return sq - 2.0 * dot + target_sq


BNStats = Mapping[str, tuple[Tensor, Tensor]]


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm modules by qualified name."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def bn_stats_from_buffers(
    model: nn.Module, new_buffers: Mapping[str, Tensor], *, steps: int = 1
) -> dict[str, tuple[Tensor, Tensor]]:
    """The client's BatchNorm batch statistics from its running buffers before and after.

    ``model`` holds the running buffers the client started from; ``new_buffers`` maps
    ``"<module>.running_mean"`` / ``"<module>.running_var"`` to the client's (a FedAvg
    state dict carries them). With momentum m, one training pass sets
    ``new = (1 - m) old + m s``, so ``s = (new - (1 - m) old) / m`` exactly: the batch mean,
    and the *unbiased* batch variance (what PyTorch folds into ``running_var``). After
    ``steps`` passes the inverse gives the statistics' momentum-weighted average over the
    steps (the per-step ones are not separable). Returns name -> (mean, unbiased var).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = {}
    for name, module in batchnorm_modules(model).items():
        if not module.track_running_stats or module.running_mean is None:
            continue
        if module.momentum is None:
            raise ValueError(
                f"{name}: cumulative BatchNorm averaging (momentum=None) is not supported"
            )
        keys = (f"{name}.running_mean", f"{name}.running_var")
        missing = [k for k in keys if k not in new_buffers]
        if missing:
            raise ValueError(f"new_buffers: no entry {missing[0]!r}")
        keep = (1.0 - float(module.momentum)) ** steps
        old_mean = module.running_mean.detach().double()
        old_var = module.running_var.detach().double()
        new_mean = torch.as_tensor(new_buffers[keys[0]]).to(old_mean)
        new_var = torch.as_tensor(new_buffers[keys[1]]).to(old_var)
        if new_mean.shape != old_mean.shape or new_var.shape != old_var.shape:
            raise ValueError(f"new_buffers: {name} statistics have the wrong shape")
        mean = (new_mean - keep * old_mean) / (1.0 - keep)
        var = (new_var - keep * old_var) / (1.0 - keep)
        out[name] = (mean.to(module.running_mean.dtype), var.to(module.running_var.dtype))
    return out


def check_bn_stats(model: nn.Module, stats: BNStats) -> dict[str, tuple[Tensor, Tensor]]:
    """``stats`` validated against the model's BatchNorm modules, on their devices."""
    modules = batchnorm_modules(model)
    if not stats:
        raise ValueError("bn_stats: empty; the model has BatchNorm modules " + ", ".join(modules))
    out = {}
    for name, pair in stats.items():
        if name not in modules:
            raise ValueError(f"bn_stats: {name!r} is not a BatchNorm module of the model")
        module = modules[name]
        mean, var = (torch.as_tensor(t) for t in pair)
        if mean.shape != (module.num_features,) or var.shape != (module.num_features,):
            raise ValueError(f"bn_stats: {name!r} needs two tensors of {module.num_features}")
        ref = module.weight if module.weight is not None else module.running_mean
        out[name] = (mean.to(ref).detach(), var.to(ref).detach())
    return out


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of a BatchNorm input (N, C, ...)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=True)


@contextlib.contextmanager
def attack_session(model: nn.Module) -> Iterator[None]:
    """Train mode and a forked RNG for the duration; everything the attack touches restored.

    Restores every module's mode, every parameter's ``requires_grad``, all buffers (e.g.
    BatchNorm running statistics, updated by train-mode passes), the bottlenecks' KL caches
    and the global RNG state (the attack reseeds it for fixed noise).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    kls = [(m, m.kl) for _, m in bottlenecks(model)]
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, kl in kls:
            m.kl = kl


@dataclass
class _FastLinear:
    """A Linear layer whose weight/bias gradients enter the objective through the Gram route."""

    name: str
    module: nn.Linear
    weight_target: Tensor | None
    bias_target: Tensor | None
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    active: bool = True

    def gram_is_cheaper(self, rows: int) -> bool:
        return rows * (self.module.in_features + self.module.out_features) <= (
            self.module.in_features * self.module.out_features
        )


class GradientMatcher:
    """Gradient distance between a candidate batch and a target update; a context manager.

    Args:
        model: the attacked model (not modified; see the module docstring).
        target: per-parameter target gradients in ``model.parameters()`` order.
        mask: which parameters to match (``base.select_parameters``).
        cost: ``"cosine"`` or ``"l2"``.
        fast: use the Gram route for Linear layers (False: materialise every gradient, the
            straightforward double-backpropagation implementation; for checks and comparisons).
        noise_seed: seed of the fixed noise of random layers.

    Use inside ``with matcher:``; call :meth:`prepare` once with a representative candidate
    (it checks the fast route against plain autograd layer by layer and routes any layer where
    they disagree, e.g. a weight also used outside its module, through plain autograd).
    """

    def __init__(
        self,
        model: nn.Module,
        target: Sequence[Tensor],
        mask: Sequence[bool],
        *,
        cost: Cost = "cosine",
        fast: bool = True,
        noise_seed: int = 0,
        bn_prior: float = 0.0,
        bn_stats: BNStats | None = None,
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        named = list(model.named_parameters())
        if len(target) != len(named) or len(mask) != len(named):
            raise ValueError("target and mask need one entry per model parameter")
        if not any(mask):
            raise ValueError("no parameter selected for gradient matching")
        self.model = model
        self.cost: Cost = cost
        self.fast = fast
        self.noise_seed = int(noise_seed)
        self.names = [n for (n, _), m in zip(named, mask, strict=True) if m]
        self._params = {n: p for n, p in named}
        self._targets = {
            n: t.detach() for (n, _), t, m in zip(named, target, mask, strict=True) if m
        }
        self.target_sq = torch.stack([t.pow(2).sum() for t in self._targets.values()]).sum()
        self._fast: list[_FastLinear] = []
        self._plain: list[str] = list(self.names)
        if fast:
            self._route_linears()
        self._stack: contextlib.ExitStack | None = None
        self.bn_prior = float(bn_prior)
        self._bn_targets = check_bn_stats(model, bn_stats) if self.bn_prior else {}
        self._bn_seen: dict[str, tuple[Tensor, Tensor]] = {}

    # -- routing -------------------------------------------------------------------------

    def _route_linears(self) -> None:
        param_owner: dict[int, int] = {}
        for _, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                param_owner[id(p)] = param_owner.get(id(p), 0) + 1
        by_id = {id(p): n for n, p in self._params.items()}
        for name, module in self.model.named_modules():
            if type(module) is not nn.Linear:  # subclasses may change forward
                continue
            own = [module.weight] + ([module.bias] if module.bias is not None else [])
            if any(param_owner[id(p)] > 1 for p in own):  # tied weights: plain route
                continue
            w_name = by_id[id(module.weight)]
            b_name = by_id[id(module.bias)] if module.bias is not None else None
            w_t = self._targets.get(w_name)
            b_t = self._targets.get(b_name) if b_name is not None else None
            if w_t is None and b_t is None:
                continue
            self._fast.append(_FastLinear(name, module, w_t, b_t))
        fast_names = {n for f in self._fast for n in self._fast_param_names(f)}
        self._plain = [n for n in self.names if n not in fast_names]

    def _fast_param_names(self, f: _FastLinear) -> list[str]:
        by_id = {id(p): n for n, p in self._params.items()}
        out = []
        if f.weight_target is not None:
            out.append(by_id[id(f.module.weight)])
        if f.bias_target is not None:
            out.append(by_id[id(f.module.bias)])
        return out

    @property
    def fast_layers(self) -> list[str]:
        """Names of the Linear modules matched through the Gram route."""
        return [f.name for f in self._fast]

    # -- context -------------------------------------------------------------------------

    def __enter__(self) -> GradientMatcher:
        stack = contextlib.ExitStack()
        stack.enter_context(attack_session(self.model))
        stack.callback(lambda: [f.calls.clear() for f in self._fast])
        for f in self._fast:
            stack.callback(f.module.register_forward_hook(self._hook(f)).remove)
        modules = batchnorm_modules(self.model)
        for name in self._bn_targets:
            stack.callback(modules[name].register_forward_pre_hook(self._bn_hook(name)).remove)
        self._set_requires_grad()
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def _set_requires_grad(self) -> None:
        # Only plain-route parameters need autograd; everything else is a constant, which
        # keeps the graphs small.
        plain = {id(self._params[n]) for n in self._plain}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in plain)

    @staticmethod
    def _hook(f: _FastLinear):  # noqa: ANN205
        def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if not f.active:
                return None
            # clone: an in-place op after the layer (ReLU(inplace=True)) must not rewrite the
            # autograd history of the captured output.
            out = out.clone()
            f.calls.append((args[0], out))
            return out

        return hook

    def _bn_hook(self, name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self._bn_seen[name] = _channel_stats(args[0])

        return hook

    # -- evaluation ----------------------------------------------------------------------

    def bn_prior_term(self) -> Tensor | None:
        """GradInversion's BatchNorm prior of the latest forward pass (None when off).

        ``sum_l ||mean_l(x) - mean_l*||_2 + ||var_l(x) - var_l*||_2`` over the BatchNorm
        layers with target statistics.
        """
        if not self._bn_targets:
            return None
        terms = []
        for name, (mean_t, var_t) in self._bn_targets.items():
            if name in self._bn_seen:
                mean, var = self._bn_seen[name]
                terms.append((mean - mean_t).norm() + (var - var_t).norm())
        return torch.stack(terms).sum() if terms else None

    def _forward(self, x: Tensor, labels: Tensor) -> Tensor:
        self._bn_seen.clear()
        for f in self._fast:
            f.calls.clear()
        torch.manual_seed(self.noise_seed)
        loss, _ = loss_fn(self.model, x, labels)
        return loss

    def _fast_grads(
        self, x: Tensor, labels: Tensor, create_graph: bool
    ) -> tuple[list[tuple[_FastLinear, Tensor, Tensor]], dict[str, Tensor]]:
        """Per fast layer (layer, A, D) and the plain-route parameter gradients."""
        if not x.requires_grad:  # layer outputs must be in the graph to take D
            x = x.detach().requires_grad_(True)
        loss = self._forward(x, labels)
        outs = [z for f in self._fast for _, z in f.calls]
        plain = [self._params[n] for n in self._plain]
        wrt = [z for z in outs if z.requires_grad] + plain
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
        it = iter(grads)
        layers = []
        for f in self._fast:
            if not f.calls:
                continue
            rows_a, rows_d = [], []
            for a, z in f.calls:
                d = next(it) if z.requires_grad else None
                rows_a.append(a.reshape(-1, f.module.in_features))
                rows_d.append((torch.zeros_like(z) if d is None else d).reshape(-1, z.shape[-1]))
            layers.append((f, torch.cat(rows_a), torch.cat(rows_d)))
        plain_grads = {}
        for n in self._plain:
            g = next(it)
            plain_grads[n] = torch.zeros_like(self._params[n]) if g is None else g
        return layers, plain_grads

    def terms(
        self, x: Tensor, labels: Tensor, *, create_graph: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(<g, G>, ||g||^2) over the selected parameters for candidate ``x`` with ``labels``."""
        zero = x.new_zeros(())
        dot, sq = zero, zero
        if not self.fast:
            loss = self._forward(x, labels)
            params = [self._params[n] for n in self.names]
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
            for n, g in zip(self.names, grads, strict=True):
                if g is not None:
                    dot = dot + (g * self._targets[n]).sum()
                    sq = sq + g.pow(2).sum()
            return dot, sq
        layers, plain = self._fast_grads(x, labels, create_graph)
        for f, a, d in layers:
            if f.weight_target is not None:
                if f.gram_is_cheaper(a.shape[0]):
                    dot = dot + (d * (a @ f.weight_target.T)).sum()
                    sq = sq + ((d @ d.T) * (a @ a.T)).sum()
                else:
                    gw = d.T @ a
                    dot = dot + (gw * f.weight_target).sum()
                    sq = sq + gw.pow(2).sum()
            if f.bias_target is not None:
                gb = d.sum(0)
                dot = dot + gb @ f.bias_target
                sq = sq + gb @ gb
        for n, g in plain.items():
            dot = dot + (g * self._targets[n]).sum()
            sq = sq + g.pow(2).sum()
        return dot, sq

    def __call__(self, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> Tensor:
        """The gradient distance plus ``bn_prior`` times the BatchNorm prior, if on.

        Differentiable w.r.t. ``x`` when ``create_graph``.
        """
        dot, sq = self.terms(x, labels, create_graph=create_graph)
        value = distance(dot, sq, self.target_sq, self.cost)
        prior = self.bn_prior_term()
        if prior is not None:
            value = value + self.bn_prior * prior
        return value if create_graph else value.detach()

    def candidate_gradients(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Materialised gradients of the selected parameters as the fast route sees them."""
        out: dict[str, Tensor] = {}
        if not self.fast:
            loss = self._forward(x, labels)
            params = [self._params[n] for n in self.names]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for n, p, g in zip(self.names, params, grads, strict=True):
                out[n] = torch.zeros_like(p) if g is None else g
            return out
        layers, plain = self._fast_grads(x, labels, create_graph=False)
        by_id = {id(p): n for n, p in self._params.items()}
        for f, a, d in layers:
            if f.weight_target is not None:
                out[by_id[id(f.module.weight)]] = d.T @ a
            if f.bias_target is not None:
                out[by_id[id(f.module.bias)]] = d.sum(0)
        out.update(plain)
        for n in self.names:  # layers not reached in the forward pass have zero gradient
            out.setdefault(n, torch.zeros_like(self._params[n]))
        return out

    def prepare(self, x: Tensor, labels: Tensor, rtol: float = 1e-4) -> list[str]:
        """Check the fast route against plain autograd on ``x``; reroute disagreeing layers.

        Returns the names of the layers moved to the plain route.
        """
        if not self.fast or not self._fast:
            return []
        fast = self.candidate_gradients(x, labels)
        for p in self.model.parameters():
            p.requires_grad_(any(p is self._params[n] for n in self.names))
        loss = self._forward(x, labels)
        params = [self._params[n] for n in self.names]
        naive = torch.autograd.grad(loss, params, allow_unused=True)
        bad = set()
        for n, p, g in zip(self.names, params, naive, strict=True):
            g = torch.zeros_like(p) if g is None else g
            if (fast[n] - g).norm() > rtol * g.norm() + 1e-12:
                bad.add(n)
        moved = [f for f in self._fast if bad & set(self._fast_param_names(f))]
        for f in moved:
            self._fast.remove(f)
            self._plain.extend(self._fast_param_names(f))
        order = {n: i for i, n in enumerate(self.names)}
        self._plain.sort(key=order.__getitem__)
        for f in moved:
            f.active = False  # its hook stays registered but captures nothing
            f.calls.clear()
        self._set_requires_grad()
        return [f.name for f in moved]
