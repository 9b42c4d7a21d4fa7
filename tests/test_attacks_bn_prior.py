"""GradInversion's BatchNorm prior in ``ig``, with statistics from the client's buffers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precode_flower import data, metrics, training
from precode_flower.attacks import reconstruct
from precode_flower.attacks.gradient_matching import GradientMatcher, bn_stats_from_buffers

SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Small convolutions: one thread beats two contending ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):  # noqa: ANN001, ANN201  # noqa: ANN201
    bundle = data.load("cifar10")
    x_all, y_all = bundle.test.tensors
    x, y = F.avg_pool2d(x_all[:8], 2), y_all[:8]  # 16x16: a fast case
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    client = copy.deepcopy(model)  # the client's train-mode pass updates its buffers
    grads, _ = training.compute_gradients(client, x, y)
    stats = bn_stats_from_buffers(model, client.state_dict())
    return bundle, model, x, y, grads, stats


def test_stats_from_buffers_are_the_batch_statistics(setup) -> None:  # noqa: ANN001
    _, model, x, _, _, stats = setup
    with torch.no_grad():
        h = model[0](x)
    assert set(stats) == {"1", "4"}
    mean, var = stats["1"]
    assert torch.allclose(mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, h.var((0, 2, 3), unbiased=True), atol=1e-5)


def test_bn_prior_lowers_bn_mismatch_and_raises_psnr(setup) -> None:  # noqa: ANN001
    bundle, model, x, y, grads, stats = setup
    out = {}
    for weight in (0.0, 0.03):
        result = reconstruct(
            "ig",
            model,
            grads,
            labels=y,
            input_shape=SHAPE,
            mean=bundle.mean,
            std=bundle.std,
            iterations=300,
            lr=0.1,
            bn_prior=weight,
            bn_stats=stats if weight else None,
        )
        probe = GradientMatcher(model, grads, [True] * len(grads), bn_prior=1.0, bn_stats=stats)
        with probe:
            probe(result.images, y, create_graph=False)
            mismatch = float(probe.bn_prior_term().detach())
        psnr = metrics.score(result, x, y, bundle.mean, bundle.std)["psnr"]
        out[weight] = (mismatch, psnr)
    assert out[0.03][0] < 0.5 * out[0.0][0]  # the statistics the client's batch had
    assert out[0.03][1] > out[0.0][1] + 0.3  # and closer images


def test_bn_prior_needs_stats(setup) -> None:  # noqa: ANN001
    bundle, model, _, y, grads, stats = setup
    kw = dict(labels=y, input_shape=SHAPE, mean=bundle.mean, std=bundle.std, iterations=1)
    with pytest.raises(ValueError, match="bn_prior needs bn_stats"):
        reconstruct("ig", model, grads, bn_prior=0.1, **kw)
    with pytest.raises(ValueError, match="not a BatchNorm module"):
        reconstruct("ig", model, grads, bn_prior=0.1, bn_stats={"0": stats["1"]}, **kw)
