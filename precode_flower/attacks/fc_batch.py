"""Batch recovery from a fully connected ReLU layer: factorisation, assembly and verification.

Shared by ``spear`` and ``cocktail``. For a Linear layer ``z = W x + c`` followed by a ReLU and
a batch of B examples (mean loss),

    dW = D^T X,   dc = D^T 1,

with X (B x n) the layer's inputs and D (B x m) the loss gradients at its outputs. Because of
the ReLU, column b of D^T (example b's ``delta``) is exactly zero on every neuron inactive for
x_b, about half of them. dW has rank B: with the SVD ``dW = U S V^T``, ``L = U_B S_B`` spans
D^T's columns, so ``D^T = L Q`` for an invertible B x B Q, and each delta is ``L q`` for
some q. The attacks differ in how they find the q's (random sub-matrices for SPEAR, ICA for
the Cocktail Party route); the rest is here:

* :func:`refine`: a direction whose zero set Z (|Z| >= B - 1) is right is recomputed as the
  null vector of ``L[Z]`` (least squares over all of Z), which is exact.
* :func:`assemble`: with B directions ``a_b`` (unit norm), ``D^T = A diag(lam)``; the bias
  gradient gives ``lam = A^+ dc`` (scale and sign), and ``X = diag(1/lam) A^+ dW``.
* :func:`verify`: an image is claimed only if its own forward pass explains its delta: the
  neurons its pre-activation switches off are exactly the zeros of its delta (a blend of
  images or a wrong direction has another activation pattern), its pixels lie in the valid
  box, and the factorisation reproduces dW and dc.

PRECODE does not change any of this when the bottleneck sits after the layer (the paper's
placement before the classifier): the layer's input is the image and its ReLU mask is the
client's. The noise only changes the deltas' values, which the attack never needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .analytic import choose_layer
from .gradient_matching import attack_session


@dataclass
class FcLayer:
    """The attacked layer and its gradients (float64, on the gradients' device)."""

    name: str
    module: nn.Linear
    dw: Tensor
    db: Tensor
    is_image: bool


def fc_layer(
    model: nn.Module, gradients: Sequence[Tensor], input_shape: Sequence[int], layer: str | None
) -> FcLayer:
    """The Linear layer to attack (default: the first that sees the image), checked for ReLU."""
    name, module, is_image = _checked_layer(model, input_shape, layer)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    dw = gradients[index[id(module.weight)]].detach().double().flatten(1)
    db = gradients[index[id(module.bias)]].detach().double()
    return FcLayer(name, module, dw, db, is_image)


def _checked_layer(
    model: nn.Module, input_shape: Sequence[int], layer: str | None
) -> tuple[str, nn.Linear, bool]:
    """(name, module, whether it sees the image) of the layer; ValueError if it cannot serve."""
    name, is_image = choose_layer(model, input_shape, layer)
    module = model.get_submodule(name)
    if module.bias is None:
        raise ValueError(f"{name!r} has no bias; the attack needs its gradient for the scales")
    if not _feeds_relu(model, module, input_shape):
        raise ValueError(
            f"the attack does not apply: the output of {name!r} does not go through an nn.ReLU "
            "(the zeros of the ReLU's derivative are what identifies each example)"
        )
    return name, module, is_image


def fc_applies(model: nn.Module, input_shape: Sequence[int]) -> str | None:
    """None if the default layer (the first Linear that sees the image) has a bias and feeds
    an ``nn.ReLU``, as ``spear`` and ``cocktail`` need; else why not (one line)."""
    try:
        _checked_layer(model, input_shape, None)
    except ValueError as err:
        return str(err)
    return None


def _feeds_relu(model: nn.Module, module: nn.Module, input_shape: Sequence[int]) -> bool:
    seen: dict[str, Any] = {"out": None, "relu": False}

    def out_hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
        seen["out"] = out

    def relu_hook(_m: nn.Module, args: tuple) -> None:
        if seen["out"] is not None and args[0] is seen["out"]:
            seen["relu"] = True

    hooks = [module.register_forward_hook(out_hook)]
    hooks += [m.register_forward_pre_hook(relu_hook) for m in model.modules() if type(m) is nn.ReLU]
    device = next(model.parameters()).device
    try:
        with attack_session(model), torch.no_grad():
            model.eval()
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    return bool(seen["relu"])


def factorise(dw: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(L = U_B S_B (m x B), V_B^T (B x n), leading singular values) of the rank-B gradient.

    A randomised range finder (``torch.svd_lowrank``, B + 8 columns, 2 power iterations)
    is exact to float64 round-off on a rank-B matrix and 20-50x faster than a full SVD of
    the first layer's 1024 x 3072 gradient; the 8 extra values show the rank gap.
    """
    q = min(rank + 8, *dw.shape)
    u, s, v = torch.svd_lowrank(dw, q=q, niter=2)
    return u[:, :rank] * s[:rank], v[:, :rank].T, s


def zero_mask(d: Tensor, tol: float) -> Tensor:
    """Entries of each column of ``d`` that are zero up to ``tol`` times the column's max."""
    return d.abs() <= tol * d.abs().amax(0, keepdim=True).clamp_min(1e-300)


def refine(lmat: Tensor, q: Tensor, tol: float, rounds: int = 3) -> Tensor:
    """Directions ``q`` (B x k) re-solved as null vectors of ``L`` on their zero sets."""
    out = q.clone()
    for j in range(q.shape[1]):
        qj = q[:, j]
        for _ in range(rounds):
            zeros = zero_mask((lmat @ qj)[:, None], tol)[:, 0]
            if int(zeros.sum()) < lmat.shape[1] - 1:
                break
            qj = torch.linalg.svd(lmat[zeros], full_matrices=False)[2][-1]
        out[:, j] = qj
    return out


def directions(lmat: Tensor, q: Tensor) -> Tensor:
    """Unit-norm deltas ``L q`` (m x k), sign fixed so the largest entry is positive."""
    d = lmat @ q
    d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-300)
    peak = d.gather(0, d.abs().argmax(0, keepdim=True))
    return d * torch.sign(peak)


def complete_missing(
    fc: FcLayer, lmat: Tensor, found: list[Tensor], zero_tol: float, *, max_missing: int = 2
) -> list[Tensor]:
    """Unit deltas of the last 1 or 2 examples when the others are known exactly.

    Complete the k known-missing directions with a basis V of L's column space outside the
    known deltas' span and decompose ``dW`` and ``dc`` in that basis: V's coefficient rows
    are ``Y = M diag(lam) X_missing`` and its bias coefficients ``c = M lam`` for an unknown
    k x k M (the known examples' rows absorb the rest). So each missing input is
    ``x(g) = g^T Y / g^T c`` for some direction g: for k = 1 it is exact outright; for k = 2
    g is an angle, and only at the right ones does x(g)'s ReLU mask leave L a null vector
    on its zero set (the mask changes only where g crosses a neuron's hyperplane, so every
    arc between breakpoints is tried once). The null vector there is the delta.
    Returns the deltas found (possibly fewer than k).
    """
    b = lmat.shape[1]
    k = b - len(found)
    if not 1 <= k <= max_missing:
        return []
    known = torch.stack(found, 1) if found else lmat[:, :0]
    basis = torch.linalg.qr(lmat)[0]  # orthonormal column space of L
    resid = basis - known @ torch.linalg.lstsq(known, basis).solution if found else basis
    comp = torch.linalg.svd(resid, full_matrices=False)[0][:, :k]  # the missing directions
    pinv = torch.linalg.pinv(torch.cat([known, comp], 1))
    rows_y = pinv[-k:] @ fc.dw  # (k, n)
    coef_c = pinv[-k:] @ fc.db  # (k,)
    w = fc.module.weight.detach().double().to(rows_y.device)
    c = fc.module.bias.detach().double().to(rows_y.device)
    # Pre-activation of x(g) times g^T c:  g^T P_i with P = Y W^T + c c1^T  (k x m).
    pmat = rows_y @ w.T + coef_c[:, None] * c[None, :]
    if k == 1:
        gs = torch.ones(1, 1, dtype=pmat.dtype, device=pmat.device)
    else:
        # Breakpoints: angles where g is orthogonal to some P_i; one g per arc (midpoints).
        cross = torch.atan2(-pmat[0], pmat[1]) % torch.pi
        edges = torch.sort(torch.cat([cross, cross + torch.pi]))[0]
        following = torch.cat([edges[1:], edges[:1] + 2 * torch.pi])
        mids = (edges + following) / 2
        gs = torch.stack([torch.cos(mids), torch.sin(mids)], 0)
    out: list[Tensor] = []
    scale = float(lmat.norm())
    for j in range(gs.shape[1]):
        g = gs[:, j]
        denom = float(g @ coef_c)
        if denom == 0:
            continue
        zeros = (g @ pmat) / denom <= 0
        if int(zeros.sum()) < b - 1:
            continue
        _, sv, vh = torch.linalg.svd(lmat[zeros], full_matrices=False)
        if float(sv[-1]) > 1e-6 * scale:  # no exact null vector: a wrong mask
            continue
        d = directions(lmat, refine(lmat, vh[-1][:, None], zero_tol))[:, 0]
        if not any(float((d @ e).abs()) > 0.999 for e in [*found, *out]):
            out.append(d)
        if len(out) == k:
            break
    return out


@dataclass
class Assembled:
    inputs: Tensor  # (k, n) recovered layer inputs
    deltas: Tensor  # (m, k) the examples' output gradients, scaled
    residual_w: float
    residual_b: float


def assemble(fc: FcLayer, dirs: Tensor) -> Assembled:
    """Inputs and scaled deltas from (m x k) directions, with the factorisation residuals."""
    pinv = torch.linalg.pinv(dirs)
    lam = pinv @ fc.db
    mixed = pinv @ fc.dw
    inputs = mixed / torch.where(lam.abs() > 1e-300, lam, torch.full_like(lam, 1e-300))[:, None]
    deltas = dirs * lam
    rw = float((deltas @ inputs - fc.dw).norm() / fc.dw.norm().clamp_min(1e-300))
    rb = float((deltas.sum(1) - fc.db).norm() / fc.db.norm().clamp_min(1e-300))
    return Assembled(inputs, deltas, rw, rb)


def verify(
    fc: FcLayer,
    found: Assembled,
    *,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    zero_tol: float,
    agreement: float,
    box_slack: float,
    residual_tol: float,
) -> tuple[list[bool], list[float]]:
    """Per recovered input: verified?, and the agreement of its ReLU mask with its delta.

    Agreement is the fraction of neurons where "pre-activation <= 0" and "delta == 0" agree.
    """
    w = fc.module.weight.detach().double().to(found.inputs.device)
    c = fc.module.bias.detach().double().to(found.inputs.device)
    pre = found.inputs @ w.T + c  # (k, m)
    off = pre <= 0
    zeros = zero_mask(found.deltas, zero_tol).T  # (k, m)
    agree = (off == zeros).double().mean(1)
    # An inactive neuron can never carry gradient: that part must hold without exception.
    leaks = (off & ~zeros).any(1)
    ok = (agree >= agreement) & ~leaks
    if fc.is_image:
        m = torch.tensor(mean, dtype=torch.float64, device=pre.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64, device=pre.device).view(1, -1, 1, 1)
        pixels = found.inputs.view(-1, *input_shape) * s + m
        ok &= (pixels.flatten(1).amin(1) >= -box_slack) & (
            pixels.flatten(1).amax(1) <= 1 + box_slack
        )
    complete = found.residual_w <= residual_tol and found.residual_b <= residual_tol
    return [bool(v) and complete for v in ok], [float(a) for a in agree]


def labels_from_deltas(
    model: nn.Module,
    fc: FcLayer,
    images: Tensor,
    deltas: Tensor,
    batch_size: int,
    noise_seed: int,
) -> tuple[Tensor, list[float]]:
    """Per-image labels: the class whose training gradient at the layer best explains delta.

    For each candidate class the per-example loss (cross-entropy + PRECODE KL, mean over
    the client's batch of ``batch_size``) is backpropagated to the layer's output with the
    model in train mode and fixed noise; returns labels and each one's relative residual.
    """
    from ..precode import precode_loss

    k = images.shape[0]
    param = next(model.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    target = deltas.T.to(param.device)  # (k, m)
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _a: tuple, out: Tensor) -> Tensor:
        out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    num_classes = None
    residuals = []
    with attack_session(model):
        handle = fc.module.register_forward_hook(hook)
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            best = torch.full((k,), torch.inf, dtype=torch.float64, device=param.device)
            labels = torch.zeros(k, dtype=torch.long, device=param.device)
            c = 0
            while num_classes is None or c < num_classes:
                captured.clear()
                torch.manual_seed(noise_seed)
                logits = model(x)
                num_classes = logits.shape[1]
                y = torch.full((k,), c, dtype=torch.long, device=param.device)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                loss = loss + k * precode_loss(model)
                (g,) = torch.autograd.grad(loss, captured[0])
                g = g.double() / batch_size
                r = (g - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-300)
                better = r < best
                labels[better] = c
                best = torch.where(better, r, best)
                c += 1
        finally:
            handle.remove()
    residuals = [float(v) for v in best]
    return labels, residuals
