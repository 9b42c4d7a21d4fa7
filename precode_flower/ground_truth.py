"""Score reconstructions against a client's whole partition, with no batch indices.

A user-provided hook (``partition_fn(partition_id) -> (images, labels)``, e.g. the simulated
app's own ``load_data``) gives the auditor the examples a client *may* have trained on, not
which ones or in what order. :func:`score_against_partition` therefore pairs every
reconstruction with its best match in the partition: the optimal one-to-one assignment
(:func:`precode_flower.metrics.match`, by SSIM) when the partition has exactly as many
examples as reconstructions and is small, else each reconstruction's nearest neighbour in
pixel space (MSE; several reconstructions may share a match). PSNR and SSIM are then those of
the matched pairs, as :func:`precode_flower.metrics.score` reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .attacks.base import AttackResult
from .metrics import label_accuracy, psnr, score, ssim, to_pixels

#: Largest partition matched optimally (the assignment's cost matrix is n x n SSIMs).
OPTIMAL_MAX = 64


def nearest(recon: Tensor, pool: Tensor, chunk: int = 256) -> Tensor:
    """Index into ``pool`` of each reconstruction's nearest example (MSE), both in pixels."""
    a = recon.flatten(1).double()
    b = pool.flatten(1).double()
    b_sq = b.pow(2).sum(1)
    out = []
    for start in range(0, len(a), chunk):
        part = a[start : start + chunk]
        dist = part.pow(2).sum(1, keepdim=True) - 2 * part @ b.T + b_sq
        out.append(dist.argmin(1))
    return torch.cat(out)


def score_against_partition(
    result: AttackResult,
    images: Tensor,
    labels: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    success_ssim: float,
) -> dict[str, Any]:
    """JSON scores of ``result`` against the partition ``(images, labels)``.

    Keys as :func:`precode_flower.metrics.score` (``mse``, ``psnr``, ``ssim``, ``per_image``
    per reconstruction, ``label_accuracy``, ``success``) plus ``match_method`` (``"optimal"``
    or ``"nearest"``) and ``partition_size``; ``partition_match`` (nearest) holds the
    partition index matched to each reconstruction. Label accuracy compares the recovered
    labels with the partition's (as multisets) only when the partition has as many examples
    as reconstructions, else it is None: which examples the client used is not known.
    """
    recon = result.images
    if len(images) == len(recon) and len(images) <= OPTIMAL_MAX:
        out = score(result, images, labels, mean, std, success_ssim=success_ssim)
        return {**out, "match_method": "optimal", "partition_size": len(images)}
    pix_r, pix_p = to_pixels(recon, mean, std), to_pixels(images, mean, std)
    if pix_r.shape[1:] != pix_p.shape[1:]:
        raise ValueError(
            f"partition images have shape {tuple(pix_p.shape[1:])}, reconstructions "
            f"{tuple(pix_r.shape[1:])}"
        )
    idx = nearest(pix_r, pix_p)
    matched = pix_p[idx]
    p = psnr(pix_r, matched)
    s = ssim(pix_r, matched)
    m = (pix_r - matched).pow(2).flatten(1).mean(1)
    acc = None
    if labels is not None and result.labels is not None and len(labels) == len(result.labels):
        acc = label_accuracy(result.labels, labels)
    mean_ssim = float(s.mean())
    return {
        "batch_size": len(recon),
        "mse": float(m.mean()),
        "psnr": float(p.mean()),
        "ssim": mean_ssim,
        "per_image": {
            "psnr": [float(v) for v in p],
            "ssim": [float(v) for v in s],
            "mse": [float(v) for v in m],
            "label_correct": None,
        },
        "partition_match": idx.tolist(),
        "label_accuracy": acc,
        "success": bool(mean_ssim >= success_ssim),
        "success_ssim": float(success_ssim),
        "match_method": "nearest",
        "partition_size": len(images),
    }
