"""Model builders and local training on real MNIST."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import precode_flower as pf
from precode_flower.models import MODELS, build
from precode_flower.training import LocalSGD, compute_gradients, evaluate, loss_fn, train


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_build_shapes(name, shape):
    model = build(name, 7, shape)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_build_rejects_unknown_model():
    with pytest.raises(ValueError, match="mlp, convnet, resnet18"):
        build("vgg", 10, (3, 32, 32))


def test_compute_gradients_matches_parameters_and_leaves_grad_alone():
    model = pf.extend(build("convnet", 10, (1, 28, 28)))
    grads, loss = compute_gradients(model, torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    params = list(model.parameters())
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert all(p.grad is None for p in params) and loss > 0


def _mnist_subset(n_train: int, n_test: int) -> tuple[TensorDataset, TensorDataset]:
    """Reads the real MNIST from the data pack (through the package loader when present)."""
    from precode_flower import data

    bundle = data.load("mnist")
    x, y = bundle.train.tensors
    xt, yt = bundle.test.tensors
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(xt[:n_test], yt[:n_test])


@pytest.mark.parametrize("precode", [False, True])
def test_short_mnist_training_beats_chance(precode):
    torch.manual_seed(0)
    train_set, test_set = _mnist_subset(6000, 2000)
    model = build("mlp", 10, (1, 28, 28))
    if precode:
        model = pf.extend(model)
    stats = train(model, train_set, steps=300, batch_size=32, lr=0.01, momentum=0.9, seed=0)
    result = evaluate(model, test_set)
    assert stats.steps == 300 and np.isfinite(stats.loss)
    assert result.accuracy > 0.8, result  # chance is 0.1


def test_train_argument_errors():
    data = (torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    model = build("mlp", 2, (1, 4, 4))
    with pytest.raises(ValueError, match="exactly one"):
        train(model, data)
    with pytest.raises(ValueError, match="empty"):
        train(model, (data[0][:0], data[1][:0]), steps=1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_sgd_takes_torch_optim_sgd_steps_exactly(momentum):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build("mlp", 10, (1, 8, 8)))
    start = [p.detach().clone() for p in models[0].parameters()]
    ours = LocalSGD(models[0].parameters(), lr=0.1, momentum=momentum)
    reference = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for model, opt in zip(models, (ours, reference), strict=True):
            opt.zero_grad()
            loss_fn(model, x, y)[0].backward()
            opt.step()
    for a, b, s in zip(models[0].parameters(), models[1].parameters(), start, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, s)


def test_local_sgd_rejects_negative_rates():
    with pytest.raises(ValueError, match="lr and momentum"):
        LocalSGD([torch.zeros(1, requires_grad=True)], lr=-1.0)
