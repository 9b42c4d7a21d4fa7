"""Reconstruction quality: MSE, PSNR, SSIM, label accuracy, matching and a JSON score.

Every image metric de-normalises its inputs with the dataset's (mean, std) and clamps them
to the pixel range [0, 1] first (``mean=None`` means the images already are pixels), and
returns one value per image. SSIM and PSNR are torchmetrics' implementations.

Conventions:

* PSNR is capped at :data:`PSNR_CAP` (200 dB) so that identical images give a finite number
  (JSON has no infinity). Float32 round-off alone already gives ~150 dB, so anything above
  ~100 dB means "exact up to float error".
* Reconstructions come in no particular order (batch attacks cannot know the batch order),
  so :func:`score` first pairs them with the originals by :func:`match` (optimal one-to-one
  assignment maximising SSIM) and reports metrics over matched pairs.
* An attack counts as successful when the mean matched SSIM reaches ``success_ssim``
  (default :data:`SUCCESS_SSIM` = 0.6; configurable per call and from the CLI).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .attacks.base import AttackResult
from .attacks.memory import MATCH_CHUNK_ELEMENTS
from .data import denormalize

PSNR_CAP = 200.0
SUCCESS_SSIM = 0.6

Stats = Sequence[float] | None


def preload() -> None:
    """Import the scoring libraries now (scipy, torchmetrics), which the functions here import
    lazily so that processes that never score (clients, the server) do not pay for them."""
    import scipy.optimize  # noqa: F401
    import torchmetrics.functional.image  # noqa: F401


def to_pixels(x: Tensor, mean: Stats = None, std: Stats = None) -> Tensor:
    """(B, C, H, W) float32 CPU images in [0, 1]: de-normalised (if mean/std) and clamped."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        x = denormalize(x, mean, std)
    # A diverged attack can return NaN/inf: count those pixels as black, not as NaN scores.
    return torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)


def _pair(recon: Tensor, original: Tensor, mean: Stats, std: Stats) -> tuple[Tensor, Tensor]:
    a, b = to_pixels(recon, mean, std), to_pixels(original, mean, std)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reconstructions {tuple(a.shape)}, originals {b.shape}")
    return a, b


def mse(recon: Tensor, original: Tensor, mean: Stats = None, std: Stats = None) -> Tensor:
    """(B,) mean squared error in [0, 1] pixel space."""
    a, b = _pair(recon, original, mean, std)
    return (a - b).pow(2).flatten(1).mean(1)


def psnr(recon: Tensor, original: Tensor, mean: Stats = None, std: Stats = None) -> Tensor:
    """(B,) PSNR in dB for pixel range 1, capped at :data:`PSNR_CAP` (identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # lazy: heavy import

    a, b = _pair(recon, original, mean, std)
    # Double precision so near-exact reconstructions are not rounded to "identical".
    value = peak_signal_noise_ratio(
        a.double(), b.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return value.clamp(max=PSNR_CAP).float()


def _ssim_pixels(a: Tensor, b: Tensor) -> Tensor:
    # The usual 11x11 Gaussian window; tiny images get the largest odd window that fits.
    side = min(a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 1:
        raise ValueError(f"images of shape {tuple(a.shape[-2:])} are too small for SSIM")
    from torchmetrics.functional.image import structural_similarity_index_measure  # lazy

    return structural_similarity_index_measure(
        a, b, data_range=1.0, kernel_size=kernel, reduction="none"
    )


def ssim(recon: Tensor, original: Tensor, mean: Stats = None, std: Stats = None) -> Tensor:
    """(B,) structural similarity (Gaussian window 11, sigma 1.5) in [0, 1] pixel space."""
    a, b = _pair(recon, original, mean, std)
    return _ssim_pixels(a, b)


def label_accuracy(predicted: Tensor | Sequence[int], true: Tensor | Sequence[int]) -> float:
    """Fraction of true labels found in the predicted ones, as multisets (order-free).

    The classifier gradient reveals a batch's labels but not their order, so this is the
    measure label-recovery papers use: ``sum_c min(pred_count_c, true_count_c) / B``.
    """
    p = Counter(torch.as_tensor(predicted).flatten().tolist())
    t = Counter(torch.as_tensor(true).flatten().tolist())
    total = sum(t.values())
    if total == 0:
        raise ValueError("no true labels")
    return sum(min(p[c], n) for c, n in t.items()) / total


def match(
    recon: Tensor,
    originals: Tensor,
    mean: Stats = None,
    std: Stats = None,
    *,
    by: Literal["ssim", "mse"] = "ssim",
) -> Tensor:
    """Optimal one-to-one pairing: ``recon[perm]`` lines up with ``originals``.

    Solves the assignment problem (scipy's ``linear_sum_assignment``) on the pairwise cost
    ``-SSIM`` (default) or MSE, in pixel space. Needs as many reconstructions as originals.
    """
    if by not in ("ssim", "mse"):
        raise ValueError(f"match: by must be 'ssim' or 'mse', got {by!r}")
    a, b = _pair(recon, originals, mean, std)
    n = len(b)
    # Identical reconstructions (an attack's blank, unrecovered slots) have identical costs:
    # compare each distinct one once.
    uniq, inverse = torch.unique(a.flatten(1), dim=0, return_inverse=True)
    uniq = uniq.view(-1, *a.shape[1:])
    u = len(uniq)
    # Row i of the cost: original i against every distinct reconstruction, a few rows at a
    # time: all pairs at once would take n * n images (and SSIM ~100 tensors of that size),
    # 23 GB for a 200-example update.
    rows_per_chunk = max(1, MATCH_CHUNK_ELEMENTS // max(1, u * a[0].numel()))
    cost = torch.empty(n, u)
    for start in range(0, n, rows_per_chunk):
        k = min(rows_per_chunk, n - start)
        rec = uniq.unsqueeze(0).expand(k, -1, -1, -1, -1).reshape(k * u, *a.shape[1:])
        org = b[start : start + k].unsqueeze(1).expand(-1, u, -1, -1, -1)
        org = org.reshape(k * u, *b.shape[1:])
        if by == "ssim":
            part = -_ssim_pixels(rec, org)
        else:
            part = (rec - org).pow(2).flatten(1).mean(1)
        cost[start : start + k] = part.view(k, u)
    cost = cost[:, inverse]
    from scipy.optimize import linear_sum_assignment  # lazy: scipy is a heavy import

    rows, cols = linear_sum_assignment(cost.view(n, n).double().numpy())
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def identified(
    recon: Tensor,
    originals: Tensor,
    references: Tensor,
    mean: Stats = None,
    std: Stats = None,
) -> Tensor:
    """(B,) bool: whether the reconstructions re-identify each of the B originals.

    A re-identification test: given a pool of candidate images (``references``, other
    images of the same dataset, none of them an original), could one tell which candidate
    was the client's example? Each candidate image is scored by its best resemblance to any
    reconstruction, resemblance being the correlation of the pixels, each channel centred
    on its mean (so a reconstruction with the wrong brightness or contrast, common in
    gradient inversion, still counts, a flat one resembles nothing, and a shared colour
    cast is not resemblance). Original ``i`` is identified when it
    scores above every reference. Originals and references are scored alike, so when the
    reconstructions carry nothing of the originals an original wins by chance with
    probability ``1 / (len(references) + 1)``, whatever the batch size. No threshold and no
    labels are involved. The order of ``recon`` does not matter, and neither does its
    length. It complements SSIM, which scores recognisable but blurred or low-contrast
    reconstructions (typical of MNIST digits and CNN models) below 0.6.
    """
    a, b = to_pixels(recon, mean, std), to_pixels(originals, mean, std)
    refs = to_pixels(references, mean, std)
    if not a.shape[1:] == b.shape[1:] == refs.shape[1:]:
        raise ValueError(
            f"image shapes differ: reconstructions {tuple(a.shape[1:])}, originals "
            f"{tuple(b.shape[1:])}, references {tuple(refs.shape[1:])}"
        )

    def unit(x: Tensor) -> Tensor:
        # Each channel centred on its own mean: a colour cast alone (which a noise image can
        # share with its original) is not resemblance.
        x = x.flatten(2).double()
        x = (x - x.mean(2, keepdim=True)).flatten(1)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # flat image: all zeros

    ua = unit(a)
    own = (unit(b) @ ua.T).max(1).values  # each original's best-resembling reconstruction
    best_reference = (unit(refs) @ ua.T).max()
    return (own > best_reference) & (own > 0)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def score(
    result: AttackResult,
    images: Tensor,
    labels: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    success_ssim: float = SUCCESS_SSIM,
) -> dict[str, Any]:
    """Plain JSON-serialisable scores of one attack on one batch.

    Reconstructions are matched to ``images`` (:func:`match`); ``mse``/``psnr``/``ssim`` are
    means over matched pairs and ``per_image`` holds the values per original (batch order),
    with ``match`` the reconstruction index paired with each. ``label_accuracy`` is the
    multiset accuracy (:func:`label_accuracy`; None when true or attack labels are missing);
    ``per_image["label_correct"]`` first credits the label of the matched reconstruction,
    then any leftover predicted label of the same class, so its mean equals
    ``label_accuracy``. ``success`` is ``ssim >= success_ssim``. NaN losses become None.
    """
    recon = result.images
    perm = match(recon, images, mean, std)
    matched = recon[perm]
    p = psnr(matched, images, mean, std)
    s = ssim(matched, images, mean, std)
    m = mse(matched, images, mean, std)
    label_acc: float | None = None
    correct: list[bool] | None = None
    if labels is not None and result.labels is not None:
        true = torch.as_tensor(labels).flatten().cpu()
        pred = result.labels.flatten().cpu()
        label_acc = label_accuracy(pred, true)
        if len(pred) == len(true):
            aligned = pred[perm]
            hits = aligned == true
            leftover = Counter(aligned[~hits].tolist())
        else:
            hits = torch.zeros(len(true), dtype=torch.bool)
            leftover = Counter(pred.tolist())
        correct = []
        for t, hit in zip(true.tolist(), hits.tolist(), strict=True):
            if not hit and leftover[t] > 0:
                leftover[t] -= 1
                hit = True
            correct.append(bool(hit))
    mean_ssim = float(s.mean())
    return {
        "attack": result.attack,
        "batch_size": len(images),
        "mse": float(m.mean()),
        "psnr": float(p.mean()),
        "ssim": mean_ssim,
        "per_image": {
            "psnr": [float(v) for v in p],
            "ssim": [float(v) for v in s],
            "mse": [float(v) for v in m],
            "label_correct": correct,
        },
        "match": perm.tolist(),
        "label_accuracy": label_acc,
        "success": bool(mean_ssim >= success_ssim),
        "success_ssim": float(success_ssim),
        "recovered": result.recovered,
        "seconds": float(result.seconds),
        "loss": _finite(result.loss),
    }
