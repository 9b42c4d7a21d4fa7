"""``spear``: exact batch recovery from a fully connected ReLU layer (SPEAR-style).

After Dimitrov et al., "SPEAR: Exact Gradient Inversion of Batches in Federated Learning"
(NeurIPS 2024). With ``dW = D^T X = L Q X`` (see :mod:`.fc_batch`), an example's delta
``L q`` vanishes on the ~m/2 neurons inactive for it; if B - 1 rows of L are all such
neurons, q is the null vector of those rows. The attack draws random (B - 1)-row subsets,
solves for their null vectors in batches, and keeps directions whose delta has many exact
zeros (a true example's delta is zero on about half the neurons; a direction from a subset
that mixes examples is zero only on the chosen rows, and one from rows inactive for two
examples only on about a quarter). Distinct zero patterns are distinct examples; once B of
them are found (or the sample budget is spent), the batch is assembled with the bias
gradient and every image is verified on its own (:func:`.fc_batch.verify`): nothing that
fails verification is claimed, and with fewer than B directions no image can be separated
and none is claimed. The chance that one subset isolates a given example is about
``2^-(B-1)``, so the cost grows exponentially with B (the paper reaches B ~ 25 on a GPU);
``max_samples`` bounds it.

Applies to: a model whose first Linear layer sees the flattened image, has a bias and
feeds an ``nn.ReLU`` (the paper's MLP, with or without PRECODE before the classifier).
Labels: per image from the recovered deltas (:func:`.fc_batch.labels_from_deltas`), else
the given ones are returned unchanged.

Options:
    layer: Linear layer to attack (default: the first that sees the image).
    max_samples: random subsets to try at most (2_000_000).
    chunk: subsets solved per batch (4096).
    zero_tol: an entry counts as zero at ``<= zero_tol * max |delta|`` (1e-6; float32
        gradients give ~1e-7 on true zeros).
    min_zero_fraction: fewest zeros a direction needs, as a fraction of m (0.4; true deltas
        have ~0.5, mixtures of two examples ~0.25-0.35).
    agreement: fraction of neurons where the image's ReLU mask and delta's zeros must agree
        (0.99; inactive neurons with nonzero delta are never allowed).
    box_slack: allowed excursion outside [0, 1] in pixel units (1e-3).
    residual_tol: relative residual of the factorisation for a claim (1e-3).
    seed: of the subset draws (the attack's ``seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import AttackCase, AttackResult, Timer, register
from .fc_batch import (
    FcLayer,
    assemble,
    complete_missing,
    directions,
    factorise,
    fc_applies,
    fc_layer,
    labels_from_deltas,
    refine,
    verify,
    zero_mask,
)


def sample_directions(
    lmat: Tensor,
    batch_size: int,
    *,
    max_samples: int,
    chunk: int,
    zero_tol: float,
    min_zeros: int,
    generator: torch.Generator,
    complete: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[list[Tensor], int, bool]:
    """Distinct unit deltas found from random subsets, subsets tried, last ones completed?

    ``complete`` is tried once when B - 2 and once when B - 1 directions are known (it
    saves the rarest draws).
    """
    m, b = lmat.shape
    found: list[Tensor] = []
    patterns: list[Tensor] = []
    pending = {1, 2}
    tried = 0
    if b == 1:
        one = torch.ones(1, 1, dtype=lmat.dtype, device=lmat.device)
        return [directions(lmat, one)[:, 0]], 0, False
    while tried < max_samples and len(found) < batch_size:
        missing = batch_size - len(found)
        if complete is not None and missing in pending:
            pending.discard(missing)  # once per count: if it fails, keep sampling
            for d in complete(found):
                if int(zero_mask(d[:, None], zero_tol).sum()) >= min_zeros:
                    found.append(d)
                    patterns.append(zero_mask(d[:, None], zero_tol)[:, 0])
            if len(found) == batch_size:
                return found, tried, True
        n = min(chunk, max_samples - tried)
        tried += n
        # (n, B-1) distinct rows per subset: the B-1 largest of m uniform scores.
        rows = torch.rand(n, m, generator=generator).topk(b - 1, dim=1).indices.to(lmat.device)
        sub = lmat[rows]  # (n, B-1, B)
        # Null vector with last coordinate 1: solve sub[:, :, :-1] q' = -sub[:, :, -1].
        lhs, rhs = sub[:, :, :-1], -sub[:, :, -1:]
        sol, info = torch.linalg.solve_ex(lhs, rhs)
        q = torch.cat([sol[:, :, 0], torch.ones(n, 1, dtype=lmat.dtype, device=lmat.device)], 1)
        good = (info == 0) & torch.isfinite(q).all(1)
        q = q[good].T  # (B, n')
        if q.shape[1] == 0:
            continue
        d = directions(lmat, q)
        nz = zero_mask(d, zero_tol).sum(0)
        keep = torch.nonzero(nz >= min_zeros).flatten()
        for j in keep.tolist():
            qj = refine(lmat, q[:, j : j + 1], zero_tol)
            dj = directions(lmat, qj)[:, 0]
            pattern = zero_mask(dj[:, None], zero_tol)[:, 0]
            if int(pattern.sum()) < min_zeros:
                continue
            # The same example found again has (nearly) the same zero pattern.
            if any((pattern ^ p).double().mean() < 0.01 for p in patterns):
                continue
            patterns.append(pattern)
            found.append(dj)
            if len(found) >= batch_size:
                break
    return found, tried, False


def finish(
    attack: str,
    case: AttackCase,
    fc: FcLayer,
    dirs: list[Tensor],
    *,
    keep_unverified: bool,
    checks: dict[str, float],
    info: dict[str, Any],
) -> AttackResult:
    """Assemble, verify, label and package (shared with ``cocktail``).

    Verified images fill the first slots. With ``keep_unverified`` the other slots hold the
    assembled (unverified) estimates, else zeros; ``recovered`` counts verified images only.
    """
    model, labels = case.model, case.labels
    input_shape, batch_size = case.input_shape, case.batch_size
    images = torch.zeros(batch_size, *input_shape)
    verified: list[bool] = []
    agreement: list[float] = []
    out_labels = labels.cpu() if labels is not None else None
    label_residuals: list[float] = []
    rw = rb = float("nan")
    if len(dirs) == batch_size:
        found = assemble(fc, torch.stack(dirs, 1))
        rw, rb = found.residual_w, found.residual_b
        verified, agreement = verify(
            fc, found, input_shape=input_shape, mean=case.mean, std=case.std, **checks
        )
        order = sorted(range(batch_size), key=lambda j: not verified[j])
        verified = [verified[j] for j in order]
        agreement = [agreement[j] for j in order]
        if fc.is_image:
            inputs = found.inputs[order].view(batch_size, *input_shape).float().cpu()
            keep = torch.tensor(verified) | keep_unverified
            images = torch.where(keep.view(-1, 1, 1, 1), inputs, images)
            if labels is None and all(verified):
                got, label_residuals = labels_from_deltas(
                    model, fc, inputs, found.deltas[:, order], batch_size, case.seed
                )
                out_labels = got.cpu()
    recovered = sum(verified) if fc.is_image else 0
    if out_labels is None:
        from .label_recovery import recover_labels

        out_labels = recover_labels(
            model, case.gradients, batch_size, input_shape=input_shape
        ).cpu()
    info.update(
        {
            "layer": fc.name,
            "directions_found": len(dirs),
            "verified": verified,
            "mask_agreement": agreement,
            "residual_w": rw,
            "residual_b": rb,
            "label_residuals": label_residuals,
            # Per-image labels from the deltas when every image is verified; else the
            # label multiset (sorted, not aligned with the slots).
            "aligned_labels": bool(label_residuals) or labels is not None,
        }
    )
    return AttackResult(
        attack=attack,
        images=images,
        labels=out_labels,
        loss=float("nan"),
        seconds=0.0,  # set by the caller
        recovered=recovered,
        info=info,
    )


@register("spear", applies=fc_applies)
def spear(
    case: AttackCase,
    *,
    layer: str | None = None,
    max_samples: int = 2_000_000,
    chunk: int = 4096,
    zero_tol: float = 1e-6,
    min_zero_fraction: float = 0.4,
    agreement: float = 0.99,
    box_slack: float = 1e-3,
    residual_tol: float = 1e-3,
) -> AttackResult:
    """Exact recovery of a batch from a Linear+ReLU layer; see the module docstring."""
    if max_samples < 1 or chunk < 1:
        raise ValueError("spear: max_samples and chunk must be >= 1")
    if not 0 < min_zero_fraction < 1:
        raise ValueError("spear: min_zero_fraction must be in (0, 1)")
    batch_size = case.batch_size
    with Timer() as timer:
        fc = fc_layer(case.model, case.gradients, case.input_shape, layer)
        m = fc.dw.shape[0]
        if batch_size > min(fc.dw.shape):
            raise ValueError(f"spear: batch_size={batch_size} exceeds the layer's rank bound")
        lmat, _, sv = factorise(fc.dw, batch_size)
        gen = torch.Generator().manual_seed(case.seed)
        dirs, tried, completed = sample_directions(
            lmat,
            batch_size,
            max_samples=max_samples,
            chunk=chunk,
            zero_tol=zero_tol,
            min_zeros=max(batch_size, int(min_zero_fraction * m)),
            generator=gen,
            complete=lambda found: complete_missing(fc, lmat, found, zero_tol),
        )
        info: dict[str, Any] = {
            "completed_last": completed,
            "subsets_tried": tried,
            "rank_gap": float(sv[batch_size - 1] / sv[batch_size])
            if len(sv) > batch_size
            else None,
        }
        checks = {
            "zero_tol": zero_tol,
            "agreement": agreement,
            "box_slack": box_slack,
            "residual_tol": residual_tol,
        }
        result = finish("spear", case, fc, dirs, keep_unverified=False, checks=checks, info=info)
    result.seconds = timer.seconds
    return result
