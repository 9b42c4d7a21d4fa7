"""Analytic input recovery from a fully connected layer with a bias (registered ``"analytic"``).

For a Linear layer ``z = W x + b`` and any loss, ``dW = sum_b delta_b x_b^T`` and
``db = sum_b delta_b`` with ``delta_b = dL/dz_b``. So row k gives
``dW[k] / db[k] = sum_b w_bk x_b`` with weights ``w_bk = delta_bk / db[k]`` summing to one:

* batch 1: every row with ``db[k] != 0`` is the input itself, exactly (Phong et al., 2017;
  Geiping et al., 2020). PRECODE does not protect layers before its bottleneck: on the
  paper's MLP the first layer gives the image back to float precision.
* batch B > 1: a row in which only one example is active (ReLU sparsity zeroes the others'
  delta) is that example exactly; other rows are mixtures. Candidates ``dW[k] / db[k]`` are
  grouped: rows that agree to within ``tol`` (RMS difference, normalised units) are the
  same isolated example, since mixtures of several examples have row-specific weights and
  do not repeat. A group counts as recovered when it has at least ``min_rows`` rows and
  its image lies in the valid pixel box (after de-normalisation, up to ``box_slack``).
  Recovered images fill the first slots; the rest are zeros (the dataset mean) and are
  listed in ``info["filled_slots"]``. A group can also agree on a blend of examples that
  are active in the same rows with proportional error signals (same label); every claim
  that is a convex combination of other claims is rejected as such a blend
  (:func:`verify_claims`). ``recovered`` is the number of distinct images that pass;
  ``info`` reports ``claimed``, ``verified``, ``rejected_mixtures`` and ``not_recovered``
  separately. A blend whose parents are not both claimed cannot be told from an image by
  this check (without ground truth it then counts as verified).
  The slot order is not the batch order (see :func:`precode_flower.metrics.match`).

Options:
    layer: module name of the Linear layer to invert. Default: the first ``nn.Linear`` whose
        input is the flattened image (found by tracing a forward pass). If no Linear sees the
        raw image (e.g. a CNN, whose first Linear follows convolutions), the attack does not
        apply and raises ValueError. With an explicit ``layer`` whose input is not the image,
        the recovered input features are returned in ``info["features"]`` (lists) and the
        images are zeros.
    threshold: rows with ``|db[k]| <= threshold * max|db|`` are ignored (1e-4): dividing by
        a near-zero bias gradient only amplifies float error.
    tol: grouping tolerance, RMS difference in normalised units (1e-5). Rows of one isolated
        example agree to float32 round-off (~1e-7); at 1e-3 and 1e-4, pairs of mixture rows
        with nearly equal weights occasionally agreed too and were claimed as images.
    min_rows: rows a group needs before it is trusted, for B > 1 (2).
    box_slack: allowed excursion outside [0, 1] in pixel units, for B > 1 (1e-3).
    blend_tol: RMS distance (normalised units) below which a claim counts as a mixture of
        other claims (1e-4; exact blends are ~1e-8 off, distinct images ~0.3).

Labels: the given ones, else :func:`~.label_recovery.recover_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import AttackCase, AttackResult, Timer, register
from .label_recovery import labels_or_recover
from .memory import MemoryCase


def _linear_inputs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, bool]]:
    """(name, sees the flattened image?) for every Linear, in forward order (dry run)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)
    probe = torch.randn(2, *input_shape, generator=gen).to(device)
    flat = probe.flatten(1)
    found: list[tuple[str, bool]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0]
                found.append((name, x.shape == flat.shape and bool(torch.equal(x, flat))))

            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def choose_layer(
    model: nn.Module, input_shape: Sequence[int], layer: str | None
) -> tuple[str, bool]:
    """(name of the Linear to invert, whether its input is the flattened image)."""
    linears = _linear_inputs(model, input_shape)
    if layer is None:
        for name, is_image in linears:
            if is_image:
                return name, True
        first = f" (the first, {linears[0][0]!r}, sees features)" if linears else ""
        raise ValueError(
            "analytic attack does not apply: no nn.Linear takes the flattened image as input"
            f"{first}; pass layer='name' to recover a Linear layer's input features instead"
        )
    try:
        module = model.get_submodule(layer)
    except AttributeError as err:
        names = ", ".join(n for n, _ in linears)
        raise ValueError(f"analytic: no module {layer!r}; Linear layers: {names}") from err
    if not isinstance(module, nn.Linear):
        raise ValueError(f"analytic: {layer!r} is a {type(module).__name__}, not nn.Linear")
    if module.bias is None:
        raise ValueError(f"analytic: {layer!r} has no bias; the attack needs db")
    return layer, any(n == layer and img for n, img in linears)


def invert_linear(
    dw: Tensor,
    db: Tensor,
    batch_size: int,
    *,
    threshold: float = 1e-4,
    tol: float = 1e-5,
    min_rows: int = 2,
    valid: Any = None,
) -> tuple[Tensor, list[int]]:
    """Inputs of a Linear layer from its weight and bias gradients.

    Args:
        dw: (out, in) weight gradient; db: (out,) bias gradient.
        batch_size: examples behind the gradient.
        valid: optional predicate on an (in,) candidate (e.g. the pixel box), for B > 1.

    Returns:
        (k, in) recovered inputs (k <= batch_size, the distinct ones it is sure of) and the
        number of rows behind each.
    """
    dw = dw.detach().double().flatten(1)
    db = db.detach().double()
    scale = db.abs().max()
    if scale == 0:
        return dw.new_zeros(0, dw.shape[1]), []
    rows = torch.nonzero(db.abs() > threshold * scale).flatten()
    if batch_size == 1:
        # Least squares over all usable rows of dW[k] = db[k] * x (exact for one example).
        d = db[rows]
        x = (d @ dw[rows]) / (d @ d)
        return x.unsqueeze(0), [len(rows)]
    # Most reliable rows (largest |db|) seed the groups.
    rows = rows[torch.argsort(db[rows].abs(), descending=True)]
    cand = dw[rows] / db[rows, None]
    dim = cand.shape[1]
    dist = torch.cdist(cand, cand) / dim**0.5
    unassigned = torch.ones(len(rows), dtype=torch.bool, device=dw.device)
    images: list[Tensor] = []
    sizes: list[int] = []
    for i in range(len(rows)):
        if not unassigned[i]:
            continue
        members = torch.nonzero(unassigned & (dist[i] < tol)).flatten()
        unassigned[members] = False
        if len(members) < min_rows:
            continue
        d = db[rows[members]]
        x = (d @ dw[rows[members]]) / (d @ d)
        if valid is not None and not valid(x):
            continue
        images.append(x)
        sizes.append(len(members))
    if not images:
        return dw.new_zeros(0, dw.shape[1]), []
    # Keep the best-supported groups if (unexpectedly) more than B agree internally.
    order = sorted(range(len(images)), key=lambda j: -sizes[j])[:batch_size]
    return torch.stack([images[j] for j in order]), [sizes[j] for j in order]


def analytic_memory(case: MemoryCase) -> int:
    """Peak bytes: float64 copies of the inverted layer's weight gradient (the candidates
    ``dW[k] / db[k]`` among them) and the rows' pairwise distances; nothing grows with the
    batch but the images (counted by the caller)."""
    linears = case.footprint.linears
    out, inp = next(((o, i) for o, i, img in linears if img), linears[0][:2] if linears else (0, 0))
    return 8 * (4 * out * inp + 4 * out * out)


def _combination(
    gram: Tensor, i: int, others: list[int], x: Tensor, *, convex: bool
) -> tuple[Tensor, float]:
    """Weights of the best combination (summing to one; non-negative if ``convex``) of rows
    ``others`` of ``x`` approximating row ``i``, and its RMS residual.

    Solved in the small Gram space (``gram = x @ x.T``): the sum-to-one constraint is a
    heavily weighted extra row, so nothing of size k x features is built per claim.
    """
    from scipy.optimize import nnls

    lam2 = float(x.shape[1])  # the constraint row's weight, squared: a pixel-sum's scale
    o = torch.as_tensor(others)
    ata = gram[o][:, o] + lam2
    atb = gram[o, i] + lam2
    ata = ata + torch.eye(len(o), dtype=ata.dtype) * 1e-12 * float(ata.diagonal().max())
    r = torch.linalg.cholesky(ata).T  # r.T @ r = ata
    q = torch.linalg.solve_triangular(r.T, atb.unsqueeze(1), upper=False).squeeze(1)
    if convex:
        w = torch.from_numpy(nnls(r.numpy(), q.numpy())[0])
    else:
        w = torch.linalg.solve_triangular(r, q.unsqueeze(1), upper=True).squeeze(1)
    residual = x[i] - w @ x[o]
    return w, float(residual.pow(2).mean().sqrt())


def verify_claims(found: Tensor, *, blend_tol: float = 1e-4) -> tuple[list[int], list[int]]:
    """Split claimed recoveries into verified ones and rejected blends.

    A group of rows can agree on a mixture: when two examples are active in the same rows
    with proportional error signals (same label, similar activations), every such row gives
    the same convex blend, which passes the grouping and the pixel box. A blend is a convex
    combination of the claims it mixes, so a claim within ``blend_tol`` (RMS, normalised
    units; exact blends are ~1e-8 off, distinct images ~0.3) of a convex combination of the
    other claims is rejected, weakest-supported first (``found`` is sorted by support). A
    claim that is still an affine combination of the remaining ones (an extrapolated mixture
    whose parents cannot be told from it) is not verified either.

    Returns (indices of verified claims, indices of rejected claims).
    """
    k = len(found)
    if k < 2:
        return list(range(k)), []
    x = found.detach().double().flatten(1).cpu()
    gram = x @ x.T
    kept = list(range(k))
    rejected: list[int] = []
    changed = True
    while changed and len(kept) > 2:
        changed = False
        for i in reversed(kept):  # weakest support first
            others = [j for j in kept if j != i]
            if _combination(gram, i, others, x, convex=True)[1] < blend_tol:
                kept.remove(i)
                rejected.append(i)
                changed = True
                break
    verified = []
    for i in kept:
        others = [j for j in kept if j != i]
        if len(others) >= 2 and _combination(gram, i, others, x, convex=False)[1] < blend_tol:
            rejected.append(i)
        else:
            verified.append(i)
    return verified, sorted(rejected)


def analytic_applies(model: nn.Module, input_shape: Sequence[int]) -> str | None:
    """None if some ``nn.Linear`` takes the flattened image, else why the attack cannot apply."""
    try:
        choose_layer(model, input_shape, None)
    except ValueError as err:
        return str(err)
    return None


@register("analytic", memory=analytic_memory, applies=analytic_applies)
def analytic(
    case: AttackCase,
    *,
    layer: str | None = None,
    threshold: float = 1e-4,
    tol: float = 1e-5,
    min_rows: int = 2,
    box_slack: float = 1e-3,
    blend_tol: float = 1e-4,
) -> AttackResult:
    """Exact recovery of a Linear layer's input; see the module docstring."""
    model, gradients = case.model, case.gradients
    input_shape, batch_size = case.input_shape, case.batch_size
    with Timer() as timer:
        name, is_image = choose_layer(model, input_shape, layer)
        module = model.get_submodule(name)
        index = {id(p): i for i, p in enumerate(model.parameters())}
        dw = gradients[index[id(module.weight)]]
        db = gradients[index[id(module.bias)]]
        m = torch.tensor(case.mean, dtype=torch.float64, device=dw.device).view(-1, 1, 1)
        s = torch.tensor(case.std, dtype=torch.float64, device=dw.device).view(-1, 1, 1)

        def in_box(x: Tensor) -> bool:
            pixels = x.view(*input_shape) * s + m
            return bool(pixels.min() >= -box_slack and pixels.max() <= 1 + box_slack)

        found, sizes = invert_linear(
            dw,
            db,
            batch_size,
            threshold=threshold,
            tol=tol,
            min_rows=min_rows,
            valid=in_box if is_image else None,
        )
        claimed = len(found)
        verified, rejected = verify_claims(found, blend_tol=blend_tol)
        found, sizes = found[verified], [sizes[i] for i in verified]
        labels, labels_recovered = labels_or_recover(case)
    k = len(found)
    info: dict[str, Any] = {
        "layer": name,
        "rows_per_image": sizes,
        "filled_slots": list(range(k, batch_size)),
        "labels_recovered": labels_recovered,
        # What it could and could not recover: groups of agreeing rows found (claimed),
        # those that passed the mixture check (verified, = recovered), the rest.
        "claimed": claimed,
        "verified": k,
        "rejected_mixtures": len(rejected),
        "not_recovered": batch_size - k,
    }
    images = torch.zeros(batch_size, *input_shape)
    if is_image:
        if k:
            images[:k] = found.view(k, *input_shape).float().cpu()
    else:
        info["features"] = found.float().cpu().tolist()
    return AttackResult(
        attack="analytic",
        images=images,
        labels=labels.cpu(),
        loss=float("nan"),
        seconds=timer.seconds,
        recovered=k if is_image else 0,
        info=info,
    )
