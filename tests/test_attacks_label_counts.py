"""Label counts (``label-counts``) from gradients and multi-step FedAvg updates."""

from __future__ import annotations

import copy

import pytest
import torch

from precode_flower import data, models, training
from precode_flower.attacks import reconstruct
from precode_flower.attacks.label_counts import count_labels, round_counts
from precode_flower.attacks.label_recovery import recover_labels
from precode_flower.precode import extend


@pytest.fixture(scope="module")
def cifar() -> data.DataBundle:
    return data.load("cifar10")


def _mlp(bundle: data.DataBundle, precode: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build("mlp", bundle.num_classes, bundle.input_shape)
    return extend(model, input_shape=bundle.input_shape) if precode else model


def _batch(bundle: data.DataBundle, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = bundle.test.tensors
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


@pytest.mark.parametrize("precode", [False, True], ids=["plain", "precode"])
def test_counts_exact_from_gradient_at_batch_32(cifar: data.DataBundle, precode: bool) -> None:
    model = _mlp(cifar, precode)
    for seed in range(3):
        x, y = _batch(cifar, 32, seed)
        grads, _ = training.compute_gradients(model, x, y)
        result = reconstruct(
            "label-counts",
            model,
            grads,
            input_shape=cifar.input_shape,
            mean=cifar.mean,
            std=cifar.std,
            batch_size=32,
        )
        true = torch.bincount(y, minlength=10).tolist()
        assert result.info["counts"] == true
        assert result.labels.tolist() == sorted(y.tolist())
        # Other attacks get the same multiset when labels are unknown.
        assert recover_labels(model, grads, 32).tolist() == sorted(y.tolist())


@pytest.mark.parametrize("precode", [False, True], ids=["plain", "precode"])
def test_counts_exact_from_four_step_fedavg_update(cifar: data.DataBundle, precode: bool) -> None:
    model = _mlp(cifar, precode)
    for seed in range(3):
        x, y = _batch(cifar, 32, 100 + seed)
        client = copy.deepcopy(model)
        training.train(client, (x, y), epochs=1, batch_size=8, lr=0.01, seed=seed)
        update = [
            new.detach() - old.detach()
            for new, old in zip(client.parameters(), model.parameters(), strict=True)
        ]
        counts, _ = count_labels(
            model, update, 32, update=True, local_steps=4, local_lr=0.01, local_batch_size=8
        )
        assert counts.tolist() == torch.bincount(y, minlength=10).tolist()


def test_counts_beat_absent_class_estimate_at_batch_64(cifar: data.DataBundle) -> None:
    model = _mlp(cifar, False)
    new_ok = old_ok = 0
    for seed in range(4):
        x, y = _batch(cifar, 64, 200 + seed)
        grads, _ = training.compute_gradients(model, x, y)
        true = torch.bincount(y, minlength=10)
        for method in ("counts", "bias"):
            got = torch.bincount(recover_labels(model, grads, 64, method=method), minlength=10)
            ok = int(torch.minimum(got, true).sum())
            new_ok, old_ok = (new_ok + ok, old_ok) if method == "counts" else (new_ok, old_ok + ok)
    assert new_ok >= 0.95 * 4 * 64
    assert new_ok > old_ok


def test_round_counts_sums_and_keeps_present_classes() -> None:
    raw = torch.tensor([2.6, 0.2, 0.0, 1.4, -0.3])
    present = torch.tensor([True, True, False, True, False])
    counts = round_counts(raw, present, 5)
    assert int(counts.sum()) == 5 and (counts >= 0).all()
    assert (counts[present] >= 1).all() and counts[2] == 0 and counts[4] == 0


def test_update_sizes_must_match(cifar: data.DataBundle) -> None:
    model = _mlp(cifar, False)
    update = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="local_steps"):
        count_labels(model, update, 30, update=True, local_steps=4, local_batch_size=8)
