"""Exact batch recovery from a fully connected layer: ``spear`` and ``cocktail``."""

from __future__ import annotations

import pytest
import torch

from precode_flower import data, metrics, models, training
from precode_flower.attacks import reconstruct
from precode_flower.attacks.fc_batch import assemble, factorise, fc_layer, verify
from precode_flower.precode import extend


@pytest.fixture(scope="module")
def cifar() -> data.DataBundle:
    return data.load("cifar10")


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Small dense solves: one thread is faster than two contending ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_mlp(bundle: data.DataBundle, precode: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.mlp(bundle.num_classes, bundle.input_shape, width=256)
    return extend(model, input_shape=bundle.input_shape) if precode else model


def _batch(bundle: data.DataBundle, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = bundle.test.tensors
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


def _run(name: str, model, bundle, x, y, **options):  # noqa: ANN001, ANN202
    torch.manual_seed(123)  # the client's PRECODE draw
    grads, _ = training.compute_gradients(model, x, y)
    return reconstruct(
        name,
        model,
        grads,
        input_shape=bundle.input_shape,
        mean=bundle.mean,
        std=bundle.std,
        batch_size=len(y),
        **options,
    )


def _claimed_are_exact(result, x: torch.Tensor) -> None:  # noqa: ANN001
    """Every claimed image equals one original (to float precision), each original once."""
    claimed = result.images[: result.recovered]
    err = (claimed[:, None] - x[None]).flatten(2).abs().amax(2)  # (claimed, originals)
    best = err.min(1)
    assert (best.values < 1e-4).all()
    assert len(set(best.indices.tolist())) == result.recovered


@pytest.mark.parametrize("precode", [False, True], ids=["plain", "precode"])
@pytest.mark.parametrize("attack", ["spear", "cocktail"])
def test_exact_batch_of_8_every_claim_verified(
    cifar: data.DataBundle, precode: bool, attack: str
) -> None:
    model = _small_mlp(cifar, precode)
    x, y = _batch(cifar, 8, seed=3)
    result = _run(attack, model, cifar, x, y)
    assert result.recovered == 8
    assert result.info["verified"] == [True] * 8
    _claimed_are_exact(result, x)
    score = metrics.score(result, x, y, cifar.mean, cifar.std)
    assert score["psnr"] > 100
    # Labels per image from the deltas: aligned with the recovered slots.
    assert result.info["aligned_labels"]
    assert score["label_accuracy"] == 1.0
    match = torch.as_tensor(score["match"])  # reconstruction slot of each original
    assert torch.equal(result.labels[match], y)


def test_cocktail_batch_32_claims_only_exact_images(cifar: data.DataBundle) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", cifar.num_classes, cifar.input_shape)  # the paper's MLP
    x, y = _batch(cifar, 32, seed=4)
    result = _run("cocktail", model, cifar, x, y)
    assert result.recovered >= 28
    _claimed_are_exact(result, x)


def test_spear_without_enough_samples_claims_nothing(cifar: data.DataBundle) -> None:
    model = _small_mlp(cifar, False)
    x, y = _batch(cifar, 12, seed=5)
    result = _run("spear", model, cifar, x, y, max_samples=64, chunk=64)
    assert result.info["directions_found"] < 12
    assert result.recovered == 0 and (result.images == 0).all()


def test_verification_rejects_blends(cifar: data.DataBundle) -> None:
    model = _small_mlp(cifar, False)
    x, y = _batch(cifar, 4, seed=6)
    grads, _ = training.compute_gradients(model, x, y)
    fc = fc_layer(model, grads, cifar.input_shape, None)
    # True deltas from the SPEAR result, then a blended input in slot 0.
    result = _run("spear", model, cifar, x, y)
    assert result.recovered == 4
    lmat, _, _ = factorise(fc.dw, 4)
    inputs = result.images.flatten(1).double()
    # Deltas consistent with these inputs: D^T = dW X^+.
    dirs = fc.dw @ torch.linalg.pinv(inputs)
    found = assemble(fc, dirs / dirs.norm(dim=0))
    checks = dict(zero_tol=1e-6, agreement=0.99, box_slack=1e-3, residual_tol=1e-3)
    ok, _ = verify(
        fc, found, input_shape=cifar.input_shape, mean=cifar.mean, std=cifar.std, **checks
    )
    assert ok == [True] * 4
    found.inputs[0] = 0.5 * (found.inputs[0] + found.inputs[1])
    ok, agreement = verify(
        fc, found, input_shape=cifar.input_shape, mean=cifar.mean, std=cifar.std, **checks
    )
    assert ok == [False, True, True, True] and agreement[0] < 0.99


def test_applicability_errors(cifar: data.DataBundle) -> None:
    torch.manual_seed(0)
    convnet = models.build("convnet", 10, cifar.input_shape)
    x, y = _batch(cifar, 2, seed=7)
    for attack in ("spear", "cocktail"):
        with pytest.raises(ValueError, match="does not apply"):
            _run(attack, convnet, cifar, x, y)
