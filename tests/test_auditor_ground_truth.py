"""Scoring against a client's whole partition (ground_truth=partition_fn): best matches."""

from __future__ import annotations

import torch

from precode_flower.attacks import AttackResult
from precode_flower.ground_truth import OPTIMAL_MAX, score_against_partition

MEAN, STD = (0.5,) * 3, (0.5,) * 3


def _pool(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(n) % 10


def _result(images: torch.Tensor, labels: torch.Tensor | None = None) -> AttackResult:
    return AttackResult("x", images, labels, 0.0, 0.0)


def test_reconstructions_are_scored_against_their_nearest_partition_example() -> None:
    pool, labels = _pool(OPTIMAL_MAX + 6)
    picked = torch.tensor([5, 3, 3, 40])  # repeats allowed: nearest, not one-to-one
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1e-3
    out = score_against_partition(_result(pool[picked] + noise), pool, labels, MEAN, STD,
                                  success_ssim=0.6)  # fmt: skip
    assert out["match_method"] == "nearest" and out["partition_size"] == len(pool)
    assert out["partition_match"] == picked.tolist()
    assert out["psnr"] > 50 and out["success"] and out["label_accuracy"] is None
    # Unrelated images match nothing well: the score can fail.
    far = score_against_partition(_result(torch.zeros(4, 3, 16, 16)), pool, labels, MEAN, STD,
                                  success_ssim=0.6)  # fmt: skip
    assert not far["success"] and far["ssim"] < 0.3


def test_a_partition_as_large_as_the_batch_is_matched_optimally() -> None:
    pool, labels = _pool(6)
    perm = torch.tensor([2, 0, 1, 5, 4, 3])
    out = score_against_partition(_result(pool[perm], labels[perm]), pool, labels, MEAN, STD,
                                  success_ssim=0.6)  # fmt: skip
    assert out["match_method"] == "optimal" and out["psnr"] > 100
    assert out["label_accuracy"] == 1.0


def test_label_counts_no_better_than_even_counts_are_not_a_leak() -> None:
    from precode_flower.audit import verdicts

    row = {"round": 1, "client": 0, "attack": "labels", "status": "ok", "scored": True,
           "batch_size": 500, "label_accuracy": 0.58, "label_baseline": 0.92}  # fmt: skip
    (line,) = verdicts([row], ["labels"])
    assert line.startswith("NO LEAK FOUND") and "no better than guessing even class counts" in line
    (line,) = verdicts([{**row, "label_accuracy": 0.99}], ["labels"])
    assert line.startswith("LEAK: labels recovered") and "even-count guess 0.92" in line
