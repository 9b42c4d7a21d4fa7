"""Metrics on known pairs, matching, the JSON score and the private image grid."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from precode_flower import data, metrics, plotting
from precode_flower.attacks import AttackResult


@pytest.fixture(scope="module")
def cifar() -> data.DataBundle:
    return data.load("cifar10")


@pytest.fixture(scope="module")
def images(cifar: data.DataBundle) -> torch.Tensor:
    return cifar.test.tensors[0][[5, 700, 1500, 2300, 3100]]


def test_identical_images(cifar: data.DataBundle, images: torch.Tensor) -> None:
    assert torch.allclose(metrics.ssim(images, images, cifar.mean, cifar.std), torch.ones(5))
    assert metrics.psnr(images, images, cifar.mean, cifar.std).tolist() == [metrics.PSNR_CAP] * 5
    assert metrics.mse(images, images, cifar.mean, cifar.std).tolist() == [0.0] * 5


def test_known_pair_values() -> None:
    x = torch.full((1, 3, 16, 16), 0.5)
    assert metrics.mse(x + 0.1, x).item() == pytest.approx(0.01, rel=1e-4)
    assert metrics.psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-3)
    # Out-of-range pixels are clamped to [0, 1] first; NaN counts as black.
    assert metrics.mse(x + 5.0, x).item() == pytest.approx(0.25)
    assert metrics.mse(torch.full_like(x, float("nan")), x).item() == pytest.approx(0.25)
    # Normalised inputs are de-normalised first.
    stats = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    assert (metrics.to_pixels(torch.zeros_like(x), *stats) == 0.5).all()
    assert metrics.mse(torch.zeros_like(x), x, *stats).item() == pytest.approx(0.1**2, rel=1e-4)


def test_ssim_drops_for_different_images(cifar: data.DataBundle, images: torch.Tensor) -> None:
    value = metrics.ssim(images, images.roll(1, 0), cifar.mean, cifar.std)
    assert (value < 0.5).all()


@pytest.mark.parametrize("by", ["ssim", "mse"])
def test_match_undoes_permutation(cifar: data.DataBundle, images: torch.Tensor, by: str) -> None:
    perm = torch.tensor([3, 0, 4, 1, 2])
    noisy = images[perm] + 0.05 * torch.randn(
        images.shape, generator=torch.Generator().manual_seed(0)
    )
    found = metrics.match(noisy, images, cifar.mean, cifar.std, by=by)
    assert torch.equal(noisy[found], noisy[perm.argsort()])


def test_identified_links_a_blurred_reconstruction_and_not_a_foreign_one(
    cifar: data.DataBundle, images: torch.Tensor
) -> None:
    refs = cifar.test.tensors[0][3200:3299]
    # Heavy blur and lost contrast: SSIM well under 0.6, yet nearest to its own original.
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2) * 0.5
    assert (metrics.ssim(blurred, images, cifar.mean, cifar.std) < 0.6).all()
    assert metrics.identified(blurred, images, refs, cifar.mean, cifar.std).all()
    # A reconstruction that is another image of the pool, or flat, is not linked to its original.
    assert not metrics.identified(refs[:5], images, refs, cifar.mean, cifar.std).any()
    flat = torch.zeros_like(images)
    assert not metrics.identified(flat, images, refs, cifar.mean, cifar.std).any()
    # Order-free: a shuffled batch of reconstructions identifies the same originals.
    assert metrics.identified(blurred.flip(0), images, refs, cifar.mean, cifar.std).all()
    with pytest.raises(ValueError, match="image shapes differ"):
        metrics.identified(images, images, refs[..., :16], cifar.mean, cifar.std)


def test_identified_is_calibrated_when_reconstructions_carry_nothing(
    cifar: data.DataBundle,
) -> None:
    # Reconstructions that are real images, but of other examples: an original then wins
    # against 19 references by chance only, 1 time in 20, at batch 4 as at batch 1 (pairing
    # each original with its best reconstruction first, then racing the references, would not
    # be: the pairing favours the original).
    pool = cifar.test.tensors[0]
    gen = torch.Generator().manual_seed(0)
    hits = total = 0
    for _ in range(150):
        pick = torch.randperm(len(pool), generator=gen)[:27]
        recon, originals, refs = pool[pick[:4]], pool[pick[4:8]], pool[pick[8:]]
        hits += int(metrics.identified(recon, originals, refs, cifar.mean, cifar.std).sum())
        total += 4
    assert hits / total < 0.1  # 1 / 20 expected


def test_the_reference_pool_is_seeded_and_leaves_out_what_is_attacked(
    cifar: data.DataBundle,
) -> None:
    pool = data.reference_pool(cifar)
    assert pool.shape == (data.REFERENCE_POOL, 3, 32, 32)
    assert torch.equal(pool, data.reference_pool(cifar))
    first = data.reference_pool(cifar, size=1)[0]
    index = next(i for i, x in enumerate(cifar.test.tensors[0]) if torch.equal(x, first))
    assert not torch.equal(data.reference_pool(cifar, size=1, exclude=[index])[0], first)
    with pytest.raises(ValueError, match="reference pool"):
        data.reference_pool(cifar, size=0)


def test_label_accuracy_is_order_free() -> None:
    assert metrics.label_accuracy([2, 1, 1], [1, 2, 1]) == 1.0
    assert metrics.label_accuracy([1, 1, 1], [1, 2, 3]) == pytest.approx(1 / 3)


def test_score_is_plain_json(cifar: data.DataBundle, images: torch.Tensor) -> None:
    perm = torch.tensor([1, 0, 2, 4, 3])
    recon = images[perm].clone()
    recon[0] = 0.0  # one miss: the slot holding original 1
    labels = torch.tensor([0, 1, 3, 4, 6])
    result = AttackResult("x", recon, labels[perm], float("nan"), 0.5, recovered=4)
    scores = metrics.score(result, images, labels, cifar.mean, cifar.std)
    text = json.dumps(scores, allow_nan=False)  # strict JSON: no NaN or infinity
    assert json.loads(text) == scores
    assert scores["match"] == [1, 0, 2, 4, 3]
    assert scores["per_image"]["psnr"][0] == metrics.PSNR_CAP
    assert scores["per_image"]["ssim"][1] < 0.6
    assert scores["label_accuracy"] == 1.0 and all(scores["per_image"]["label_correct"])
    assert scores["loss"] is None and scores["recovered"] == 4 and scores["batch_size"] == 5
    assert scores["success"] is True  # mean SSIM ~0.8 >= 0.6
    strict = metrics.score(result, images, None, cifar.mean, cifar.std, success_ssim=0.95)
    assert strict["success"] is False and strict["label_accuracy"] is None
    assert math.isclose(scores["ssim"], sum(scores["per_image"]["ssim"]) / 5, rel_tol=1e-6)


def test_image_grid_is_private(cifar: data.DataBundle, images: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "sub" / "grid.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    os.chmod(path, 0o644)  # an existing file with loose permissions is tightened
    out = plotting.image_grid(
        {"original": images, "attack": images.flip(0)[:3]}, cifar.mean, cifar.std, path, "t"
    )
    assert out == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grey = data.load("mnist").test.tensors[0][:2]
    plotting.image_grid({"original": grey}, (0.1307,), (0.3081,), tmp_path / "g.png")
    assert stat.S_IMODE((tmp_path / "g.png").stat().st_mode) == 0o600
