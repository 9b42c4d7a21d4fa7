"""``analytic`` never counts a blend as exact: claimed and verified recoveries are reported
separately, and a claim that is a mixture of other claims is rejected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from precode_flower import data, metrics, models, training
from precode_flower.attacks import reconstruct
from precode_flower.attacks.analytic import verify_claims


@pytest.fixture(scope="module")
def cifar() -> data.DataBundle:
    return data.load("cifar10", source="embedded")  # the same images wherever tests run


def _best_psnr(image: torch.Tensor, originals: torch.Tensor, bundle: data.DataBundle) -> float:
    n = len(originals)
    return float(
        metrics.psnr(image.expand(n, -1, -1, -1), originals, bundle.mean, bundle.std).max()
    )


def test_every_verified_recovery_from_batches_with_repeated_labels_is_an_original(
    cifar: data.DataBundle,
) -> None:
    x_all, y_all = training.as_tensors(cifar.test)
    claimed = verified = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        classes = torch.randperm(10, generator=gen)[:2]  # 8 images of 2 classes: repeats
        pool = torch.nonzero((y_all == classes[0]) | (y_all == classes[1])).flatten()
        idx = pool[torch.randperm(len(pool), generator=gen)[:8]]
        x, y = x_all[idx], y_all[idx]
        torch.manual_seed(seed)
        model = models.build("mlp", 10, cifar.input_shape)
        grads, _ = training.compute_gradients(model, x, y)
        result = reconstruct(
            "analytic", model, grads, input_shape=cifar.input_shape, mean=cifar.mean,
            std=cifar.std, batch_size=8,
        )  # fmt: skip
        info = result.info
        assert info["verified"] == result.recovered <= info["claimed"] <= 8
        assert info["claimed"] == result.recovered + info["rejected_mixtures"]
        assert info["not_recovered"] == 8 - result.recovered
        for i in range(result.recovered):
            assert _best_psnr(result.images[i : i + 1], x, cifar) > 60, (seed, i)
        claimed += info["claimed"]
        verified += result.recovered
    assert verified >= 0.6 * 8 * 12  # the check keeps the real recoveries (65 of 96 here)
    assert claimed - verified <= 2


def _crafted(cifar: data.DataBundle) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    """A first-layer gradient in which rows 0-11 isolate three images, rows 12-15 agree on a
    0.4/0.6 blend of the first two (what proportional error signals produce), and a fourth
    example is active in no isolated row."""
    x_all, _ = training.as_tensors(cifar.test)
    x = x_all[:4].flatten(1).double()
    blend = 0.4 * x[0] + 0.6 * x[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 10))
    db = torch.zeros(32, dtype=torch.float64)
    dw = torch.zeros(32, x.shape[1], dtype=torch.float64)
    sources = [x[0]] * 4 + [x[1]] * 4 + [x[2]] * 4 + [blend] * 4
    for k, source in enumerate(sources):
        db[k] = 0.01 * (k + 1) * (-1) ** k
        dw[k] = db[k] * source
    rows = torch.arange(16, 32)  # rows mixing everything: no two agree
    mix = torch.rand(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    db[rows] = mix.sum(1) * 0.01
    dw[rows] = 0.01 * mix @ x
    grads = [dw.float(), db.float(), torch.zeros(10, 32), torch.zeros(10)]
    return model, grads, x_all[:4]


def test_a_constructed_blend_is_rejected(cifar: data.DataBundle) -> None:
    model, grads, originals = _crafted(cifar)
    common = dict(
        labels=torch.tensor([0, 1, 2, 3]), input_shape=cifar.input_shape, mean=cifar.mean,
        std=cifar.std, batch_size=4,
    )  # fmt: skip
    result = reconstruct("analytic", model, grads, **common)
    assert result.info["claimed"] == 4 and result.info["rejected_mixtures"] == 1
    assert result.recovered == 3 and result.info["not_recovered"] == 1
    for i in range(3):
        assert _best_psnr(result.images[i : i + 1], originals, cifar) > 60
    # Without the check (tolerance 0) the blend is claimed as the fourth exact image.
    unchecked = reconstruct("analytic", model, grads, blend_tol=0.0, **common)
    assert unchecked.recovered == 4
    assert min(_best_psnr(unchecked.images[i : i + 1], originals, cifar) for i in range(4)) < 40


def test_verify_claims_rejects_convex_mixtures_only() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 300, generator=gen, dtype=torch.float64)
    assert verify_claims(images) == ([0, 1, 2, 3, 4, 5], [])
    blend = (0.2 * images[0] + 0.5 * images[3] + 0.3 * images[5]).unsqueeze(0)
    assert verify_claims(torch.cat([images, blend])) == ([0, 1, 2, 3, 4, 5], [6])
