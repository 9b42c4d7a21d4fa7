"""``cocktail``: larger batches from a fully connected layer by blind source separation.

After Kariyappa et al., "Cocktail Party Attack: Breaking Aggregation-Based Privacy in
Federated Learning using Independent Component Analysis" (ICML 2023): the weight gradient
of a Linear layer, ``dW = D^T X``, is a linear mixture of the batch's B inputs, so
independent component analysis (ICA) of its rank-B whitened factor separates them up to
scale and sign. Implemented here (own FastICA: symmetric, log-cosh contrast):

* ``sources="deltas"`` (default): ICA on the neuron side, where the sources are the
  examples' output gradients; behind a ReLU they are exactly zero on about half the
  neurons, a strongly non-Gaussian signal. Each component is then *refined* to an exact
  direction (:func:`exact_from_estimate`: SPEAR's null-vector step on rows drawn from the
  component's smallest entries), which turns a good ICA estimate into the exact example.
  This ICA-seeded SPEAR step is our addition to the paper.
* ``sources="inputs"``: the paper's formulation, ICA on the pixel side (sources = images),
  then the same refinement from the implied deltas.

The scales come from the bias gradient, as in ``spear``. Every image that passes
:func:`.fc_batch.verify` is exact and counted in ``recovered``; the other slots hold the
assembled ICA estimates (``info["verified"]`` says which are which), which may be
recognisable but are not claimed. Same applicability as ``spear`` (a Linear layer seeing
the image, with a bias, feeding an ``nn.ReLU``), and B must not exceed the layer's width.

Options:
    layer: Linear layer to attack (default: the first that sees the image).
    sources: ``"deltas"`` or ``"inputs"`` (see above).
    contrast: FastICA contrast, ``"logcosh"`` or ``"exp"`` (see :func:`fastica`).
    iterations: FastICA iterations at most (400); tol: its convergence tolerance (1e-7).
    restarts: FastICA runs from different random rotations per round (2); components from
        all runs are pooled, refined and de-duplicated.
    rounds: rounds of ICA + refinement (4); each round after the first runs ICA (on the
        neuron side) only in the whitened subspace orthogonal to the examples already found
        exactly (deflation), so the remaining examples separate better; stops early when a
        round finds nothing new.
    random_starts: then, for examples still missing, up to this many L1 descents
        (:func:`sparsest_near`) from random points of the unexplained whitened subspace
        (default ``4 * batch_size``).
    refine: refine components to exact directions (True): null vectors of random
        (B - 1)-row subsets drawn from the component's ``pool_fraction`` (0.25) smallest
        entries, ``refine_samples`` (1024) per pool and component; the one with the most exact zeros
        (at least ``min_zero_fraction`` (0.4) of the neurons) replaces the component.
    zero_tol, agreement, box_slack, residual_tol: verification thresholds as in ``spear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import AttackCase, AttackResult, Timer, register
from .fc_batch import (
    complete_missing,
    directions,
    factorise,
    fc_applies,
    fc_layer,
    zero_mask,
)
from .fc_batch import refine as refine_direction
from .spear import finish

SOURCES: tuple[str, ...] = ("deltas", "inputs")
CONTRASTS: tuple[str, ...] = ("logcosh", "exp")


def fastica(
    z: Tensor, iterations: int, tol: float, generator: torch.Generator, contrast: str = "logcosh"
) -> Tensor:
    """Symmetric FastICA of whitened rows ``z`` (k x N): the orthogonal unmixing (k x k).

    ``contrast``: ``"logcosh"`` (g = tanh) or ``"exp"`` (g = y exp(-y^2/2), more robust for
    strongly super-Gaussian sources such as ReLU-sparse deltas).
    """
    k, n = z.shape
    w = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))[0]
    w = w.to(z)
    for _ in range(iterations):
        y = w @ z
        if contrast == "exp":
            e = torch.exp(-y.pow(2) / 2)
            g, dg = y * e, (1 - y.pow(2)) * e
        else:
            g = torch.tanh(y)
            dg = 1 - g.pow(2)
        new = g @ z.T / n - dg.mean(1, keepdim=True) * w
        # Symmetric decorrelation: (W W^T)^(-1/2) W.
        evals, evecs = torch.linalg.eigh(new @ new.T)
        new = evecs @ torch.diag(evals.clamp_min(1e-300).rsqrt()) @ evecs.T @ new
        done = float((torch.diag(new @ w.T).abs() - 1).abs().max()) < tol
        w = new
        if done:
            break
    return w


def null_vectors(lmat: Tensor, rows: Tensor) -> Tensor:
    """Null vectors (B x n) of ``L[rows_i]`` for each (B-1)-row index set in ``rows`` (n x B-1)."""
    sub = lmat[rows]
    sol, info = torch.linalg.solve_ex(sub[:, :, :-1], -sub[:, :, -1:])
    ones = torch.ones(len(rows), 1, dtype=lmat.dtype, device=lmat.device)
    q = torch.cat([sol[:, :, 0], ones], 1)
    q[(info != 0) | ~torch.isfinite(q).all(1)] = 0
    return q.T


def sparsest_near(lmat: Tensor, q: Tensor, iterations: int = 40) -> Tensor:
    """Locally minimise ||delta||_1 over unit deltas ``L q``, from ``q`` (IRLS).

    Iteratively reweighted least squares: with weights 1 / |delta_i| from the current
    delta, the next is the unit delta minimising the weighted squared norm (the smallest
    eigenvector). Converges to the sparse delta nearest a good estimate, where most of the
    neurons it treats as zero are truly inactive.
    """
    s = lmat.norm(dim=0)
    u = lmat / s
    w = s * q
    w = w / w.norm().clamp_min(1e-300)
    for _ in range(iterations):
        r = (u @ w).abs()
        c = 1.0 / r.clamp_min(1e-9 * float(r.max()))
        evals, evecs = torch.linalg.eigh(u.T @ (c[:, None] * u))
        new = evecs[:, 0]
        new = new * torch.sign(new @ w)
        done = float((new - w).norm()) < 1e-12
        w = new
        if done:
            break
    return w / s


def exact_from_estimate(
    lmat: Tensor,
    q: Tensor,
    *,
    zero_tol: float,
    min_zeros: int,
    pool_fraction: float,
    samples: int,
    generator: torch.Generator,
) -> Tensor | None:
    """An exact direction near the estimate ``q`` (B,), or None.

    The estimate's smallest entries are mostly neurons inactive for its example; null
    vectors of random (B - 1)-row subsets of that pool (SPEAR's step, with a far better
    chance of an all-inactive subset than uniform rows) are exact when the subset is pure.
    The candidate with the most zeros wins if it has at least ``min_zeros``.
    """
    m, b = lmat.shape
    if b == 1:
        return q
    polished = sparsest_near(lmat, q)
    if int(zero_mask(lmat @ polished[:, None], zero_tol).sum()) >= min_zeros:
        return refine_direction(lmat, polished[:, None], zero_tol)[:, 0]
    d = (lmat @ q).abs()
    cands = [q[:, None], polished[:, None]]
    # Smaller pools are purer, larger ones cover examples the estimate got less right.
    for fraction in (pool_fraction / 2, pool_fraction):
        pool = d.topk(max(b - 1, int(fraction * m)), largest=False).indices
        pick = torch.rand(samples, len(pool), generator=generator).topk(b - 1, dim=1).indices
        cands.append(null_vectors(lmat, pool[pick.to(pool.device)]))
    cand = torch.cat(cands, 1)
    counts = zero_mask(lmat @ cand, zero_tol).sum(0)
    best = int(torch.argmax(counts))
    if int(counts[best]) < min_zeros:
        return None
    return refine_direction(lmat, cand[:, best : best + 1], zero_tol)[:, 0]


def _complement(u: Tensor, exact: list[Tensor]) -> Tensor:
    """Orthonormal basis (B x r) of whitened coordinates orthogonal to the found examples."""
    b = u.shape[1]
    eye = torch.eye(b, dtype=u.dtype, device=u.device)
    if not exact:
        return eye
    found = u.T @ torch.stack(exact, 1)  # whitened coordinates of the found deltas
    qmat = torch.linalg.qr(found, mode="complete")[0]
    return qmat[:, len(exact) :]


def _ica_round(
    fc: Any,
    lmat: Tensor,
    u: Tensor,
    s: Tensor,
    vh: Tensor,
    basis: Tensor,
    sources: str,
    restarts: int,
    gen: torch.Generator,
    *,
    iterations: int,
    tol: float,
    contrast: str,
) -> Tensor:
    """ICA components in the whitened subspace ``basis``, as coordinates q in L (B x k)."""
    m, n = u.shape[0], vh.shape[1]
    pool = []
    for _ in range(restarts):
        if sources == "deltas":
            z = basis.T @ u.T * m**0.5  # (r, m): whitened neuron-side data in the subspace
            w = fastica(z, iterations, tol, gen, contrast) @ basis.T  # rows: whitened coordinates
            # Component j has delta = U w_j = L diag(1/s) w_j.
            pool.append((w / s[None, :]).T)
        else:
            w = fastica(vh * n**0.5, iterations, tol, gen, contrast)
            x_est = w @ vh  # (B, n) images up to scale
            # dW = D^T X: the implied deltas, then their coordinates in L.
            d_est = fc.dw @ torch.linalg.pinv(x_est)
            pool.append(torch.linalg.lstsq(lmat, d_est).solution)
    return torch.cat(pool, 1)


def _add_distinct(found: list[Tensor], d: Tensor, limit: int) -> None:
    """Append unit vector d unless it (or its negative) is already there or found is full."""
    if len(found) < limit and not any(float((d @ c).abs()) > 0.999 for c in found):
        found.append(d)


@register("cocktail", applies=fc_applies)
def cocktail(
    case: AttackCase,
    *,
    layer: str | None = None,
    sources: str = "deltas",
    contrast: str = "exp",
    iterations: int = 400,
    tol: float = 1e-7,
    restarts: int = 2,
    rounds: int = 4,
    random_starts: int | None = None,
    refine: bool = True,
    pool_fraction: float = 0.25,
    refine_samples: int = 1024,
    min_zero_fraction: float = 0.4,
    zero_tol: float = 1e-6,
    agreement: float = 0.99,
    box_slack: float = 1e-3,
    residual_tol: float = 1e-3,
) -> AttackResult:
    """ICA separation of a Linear layer's gradient; see the module docstring."""
    if sources not in SOURCES:
        raise ValueError(f"cocktail: sources must be one of {SOURCES}, got {sources!r}")
    if contrast not in CONTRASTS:
        raise ValueError(f"cocktail: contrast must be one of {CONTRASTS}, got {contrast!r}")
    if iterations < 1 or restarts < 1:
        raise ValueError("cocktail: iterations and restarts must be >= 1")
    batch_size = case.batch_size
    random_starts = 4 * batch_size if random_starts is None else random_starts
    with Timer() as timer:
        fc = fc_layer(case.model, case.gradients, case.input_shape, layer)
        m, n = fc.dw.shape
        if batch_size > min(m, n):
            raise ValueError(f"cocktail: batch_size={batch_size} exceeds the layer's rank bound")
        lmat, vh, _ = factorise(fc.dw, batch_size)
        # lmat = U_B S_B; the whitened neuron-side factor is U_B (orthonormal columns).
        s = lmat.norm(dim=0)
        u = lmat / s
        gen = torch.Generator().manual_seed(case.seed)
        min_zeros = max(batch_size, int(min_zero_fraction * m))
        exact: list[Tensor] = []  # unit deltas of examples found exactly
        estimates: list[Tensor] = []  # ICA components of the latest round (unit deltas)
        done_rounds = 0
        for r in range(rounds):
            # Whitened coordinates not yet explained by exact directions (deflation).
            basis = _complement(u, exact)
            if basis.shape[1] == 0:
                break
            done_rounds = r + 1
            qs = _ica_round(
                fc,
                lmat,
                u,
                s,
                vh,
                basis,
                sources if r == 0 else "deltas",
                restarts,
                gen,
                iterations=iterations,
                tol=tol,
                contrast=contrast,
            )
            estimates = list(directions(lmat, qs).T)
            before = len(exact)
            if refine:
                for j in range(qs.shape[1]):
                    q = exact_from_estimate(
                        lmat,
                        qs[:, j],
                        zero_tol=zero_tol,
                        min_zeros=min_zeros,
                        pool_fraction=pool_fraction,
                        samples=refine_samples,
                        generator=gen,
                    )
                    if q is not None:
                        _add_distinct(exact, directions(lmat, q[:, None])[:, 0], batch_size)
            if len(exact) == before or len(exact) == batch_size:
                break
        completions: set[int] = set()

        def complete() -> None:
            # The last one or two examples follow from the others (fc_batch.complete_missing).
            missing = batch_size - len(exact)
            if refine and 1 <= missing <= 2 and missing not in completions:
                completions.add(missing)
                for d in complete_missing(fc, lmat, exact, zero_tol):
                    if int(zero_mask(d[:, None], zero_tol).sum()) >= min_zeros:
                        _add_distinct(exact, d, batch_size)

        complete()
        # Examples ICA missed: L1 descent (IRLS) from random starts in the unexplained
        # subspace converges to sparse deltas too.
        tries = 0
        while refine and len(exact) < batch_size and tries < random_starts:
            basis = _complement(u, exact)
            w0 = basis @ torch.randn(basis.shape[1], 1, generator=gen, dtype=u.dtype).to(u)
            tries += 1
            q = sparsest_near(lmat, (w0[:, 0] / s))
            if int(zero_mask(lmat @ q[:, None], zero_tol).sum()) >= min_zeros:
                q = refine_direction(lmat, q[:, None], zero_tol)[:, 0]
                _add_distinct(exact, directions(lmat, q[:, None])[:, 0], batch_size)
            complete()
        # The exact directions, then the ICA estimates the rest (most distinct first).
        chosen = list(exact)
        for d in estimates:
            _add_distinct(chosen, d, batch_size)
        chosen = chosen[:batch_size]
        info: dict[str, Any] = {
            "sources": sources,
            "restarts": restarts,
            "refined": refine,
            "rounds": done_rounds,
            "exact_directions": len(exact),
            "random_starts_used": tries,
        }
        checks = {
            "zero_tol": zero_tol,
            "agreement": agreement,
            "box_slack": box_slack,
            "residual_tol": residual_tol,
        }
        result = finish(
            "cocktail", case, fc, chosen, keep_unverified=True, checks=checks, info=info
        )
    result.seconds = timer.seconds
    return result
