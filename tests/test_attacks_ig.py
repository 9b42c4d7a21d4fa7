"""Tests of the optimisation attacks: ig, ignore-bottleneck, fedavg and their shared objective."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precode_flower.attacks import reconstruct
from precode_flower.attacks.base import parameters_before_bottleneck, select_parameters
from precode_flower.attacks.fedavg import UpdateMatcher
from precode_flower.attacks.gradient_matching import GradientMatcher
from precode_flower.local_training import LocalTraining
from precode_flower.models import build
from precode_flower.precode import bottlenecks, extend
from precode_flower.training import compute_gradients

SHAPE = (1, 8, 8)
MEAN, STD = (0.5,), (0.25,)


def tiny_mlp(precode: bool = False, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 48),
        nn.ReLU(),
        nn.Linear(48, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )
    return extend(model, latent_dim=16) if precode else model


def image(batch: int = 1, seed: int = 1) -> torch.Tensor:
    """A smooth random image in [0, 1], normalised with MEAN/STD."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 4, 4, generator=gen)
    pixels = F.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False)
    return (pixels - MEAN[0]) / STD[0]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((x - ref) * STD[0]).clamp(-1, 1).pow(2).mean()
    return float(-10 * torch.log10(mse))


def matcher_cost_and_grad(model, target, mask, x, y, fast, cost="cosine"):
    matcher = GradientMatcher(model, target, mask, cost=cost, fast=fast, noise_seed=3)
    with matcher:
        assert matcher.prepare(x, y) == []
        xc = x.clone().requires_grad_(True)
        value = matcher(xc, y)
        (grad,) = torch.autograd.grad(value, xc)
        grads = matcher.candidate_gradients(x, y)
    return value.detach(), grad, grads, matcher


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
@pytest.mark.parametrize("precode", [False, True], ids=["plain", "precode"])
@pytest.mark.parametrize("batch", [1, 4])
def test_fast_objective_equals_naive(arch: str, precode: bool, batch: int) -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    model = build(arch, 10, shape)
    if precode:
        extend(model, input_shape=shape)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    target, _ = compute_gradients(model, x, y)
    mask = [True] * len(target)
    candidate = torch.randn(batch, *shape)
    fast = matcher_cost_and_grad(model, target, mask, candidate, y, fast=True)
    naive = matcher_cost_and_grad(model, target, mask, candidate, y, fast=False)
    assert fast[3].fast_layers  # the Gram route is really taken
    torch.testing.assert_close(fast[0], naive[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], naive[1], rtol=1e-4, atol=1e-7)
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], naive[2][name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cost", ["cosine", "l2"])
def test_fast_objective_materialised_branch_and_subsets(cost: str) -> None:
    # Batch 16 through Linear(8, 4): the Gram matrices would cost more than the gradient,
    # so that layer is materialised; the selection skips one weight and keeps its bias.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 4, (16,))
    target, _ = compute_gradients(model, x, y)
    mask = select_parameters(model, ["1.weight", "3.bias"])
    candidate = torch.randn(16, *SHAPE)
    fast = matcher_cost_and_grad(model, target, mask, candidate, y, True, cost)
    naive = matcher_cost_and_grad(model, target, mask, candidate, y, False, cost)
    assert sorted(fast[2]) == ["1.weight", "3.bias"]
    torch.testing.assert_close(fast[0], naive[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], naive[1], rtol=1e-4, atol=1e-7)


def test_candidate_gradient_is_the_clients() -> None:
    # The candidate's gradient is the client's (train mode, CE + PRECODE loss) for the
    # same noise draw.
    model = tiny_mlp(precode=True)
    x, y = image(2), torch.tensor([3, 7])
    torch.manual_seed(11)
    client, _ = compute_gradients(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    matcher = GradientMatcher(model, client, [True] * len(names), noise_seed=11)
    with matcher:
        ours = matcher.candidate_gradients(x, y)
        distance = float(matcher(x, y, create_graph=False))
    for name, g in zip(names, client, strict=True):
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-7)
    assert abs(distance) < 1e-6


def test_reused_linear_is_rerouted() -> None:
    # A weight used both by its module and outside it cannot take the Gram route; the
    # one-time check notices and falls back to plain autograd for that layer.
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.out = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x.flatten(1)))
            return self.out(torch.relu(F.linear(h, self.fc.weight)))

    torch.manual_seed(0)
    model = Tied()
    x, y = image(), torch.tensor([1])
    target, _ = compute_gradients(model, x, y)
    matcher = GradientMatcher(model, target, [True] * 4)
    with matcher:
        assert matcher.prepare(torch.randn_like(x), y) == ["fc"]
        assert matcher.fast_layers == ["out"]
        assert float(matcher(x, y, create_graph=False)) == pytest.approx(0.0, abs=1e-6)


# lr 0.1 in these short runs: over a few hundred iterations the paper's 0.01 (meant for
# 7000) decays before the image is reached.


def run_ig(model, grads, labels, **options):
    options = {"iterations": 300, "lr": 0.1, "seed": 0, **options}
    return reconstruct(
        "ig", model, grads, labels=labels, input_shape=SHAPE, mean=MEAN, std=STD, **options
    )


def test_ig_reduces_distance_and_improves_psnr() -> None:
    model = tiny_mlp()
    x, y = image(), torch.tensor([4])
    grads, _ = compute_gradients(model, x, y)
    start = run_ig(model, grads, y, iterations=1)
    result = run_ig(model, grads, y)
    assert result.attack == "ig"
    assert result.images.shape == (1, *SHAPE)
    assert result.loss < 0.5 * start.loss
    assert psnr(result.images, x) > psnr(start.images, x) + 10
    assert result.info["iterations"] == 300 and result.info["restarts"] == 1
    assert result.info["fast_layers"] == ["1", "3", "5"]
    assert result.seconds > 0


def test_ig_batch_restarts_and_options() -> None:
    model = tiny_mlp()
    x, y = image(3), torch.tensor([1, 5, 9])
    grads, _ = compute_gradients(model, x, y)
    result = run_ig(
        model, grads, y, iterations=50, restarts=2, cost="l2", init="rand", schedule=None, tv=0.0
    )
    assert result.images.shape == (3, *SHAPE)
    assert result.info["restarts"] == 2
    assert result.info["best_restart"] in (0, 1)
    assert result.loss == min(result.info["restart_losses"])
    low, high = (0 - MEAN[0]) / STD[0], (1 - MEAN[0]) / STD[0]
    assert result.images.min() >= low - 1e-6 and result.images.max() <= high + 1e-6
    unsigned = run_ig(model, grads, y, iterations=20, signed=False, boxed=False, optimizer="sgd")
    assert math.isfinite(unsigned.loss)


def test_ig_is_seeded_and_leaves_model_and_rng_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    model = extend(model)
    x, y = image(2), torch.tensor([0, 6])
    grads, _ = compute_gradients(model, x, y)
    model.eval()
    model[0].weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)  # reconstruct() seeds the global RNG; the attack then leaves it alone
    rng = torch.random.get_rng_state()
    first = run_ig(model, grads, y, iterations=20)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not model.training and not any(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[4].module.weight.requires_grad
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    second = run_ig(model, grads, y, iterations=20)
    assert torch.equal(first.images, second.images)
    other = run_ig(model, grads, y, iterations=20, seed=1)
    assert not torch.equal(first.images, other.images)


def test_ig_stops_early() -> None:
    model = tiny_mlp()
    x, y = image(), torch.tensor([2])
    grads, _ = compute_gradients(model, x, y)
    seen = []

    def stop(iteration: int, images: torch.Tensor) -> bool:
        seen.append(iteration)
        assert images.shape == (1, *SHAPE)
        return iteration >= 40

    result = run_ig(model, grads, y, stop_when=stop, check_every=20)
    assert seen == [20, 40] and result.info["iterations"] == 40
    assert result.info["stopped_early"]
    by_loss = run_ig(model, grads, y, target_loss=0.5, check_every=10)
    assert by_loss.info["stopped_early"] and by_loss.info["iterations"] < 300


def test_ig_device_follows_model() -> None:
    model = tiny_mlp()
    x, y = image(), torch.tensor([2])
    grads, _ = compute_gradients(model, x, y)
    result = run_ig(model, grads, y, iterations=5)
    device = next(model.parameters()).device
    assert device.type == "cpu" and result.images.device.type == "cpu"
    if torch.cuda.is_available():  # pragma: no cover - no GPU on the CI machine
        model.cuda()
        grads = [g.cuda() for g in grads]
        result = run_ig(model, grads, y.cuda(), iterations=5)
        assert result.images.device.type == "cpu"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"costs": "l2"}, "unknown option"),
        ({"cost": "l1"}, "cost must be one of"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"restarts": 1.5}, "restarts must be an integer >= 1"),
        ({"lr": -1}, "lr must be a number > 0"),
        ({"tv": -1}, "tv must be a number >= 0"),
        ({"init": "ones"}, "init must be one of"),
        ({"init": torch.zeros(2, *SHAPE)}, "init tensor must have shape"),
        ({"schedule": "cosine"}, "schedule must be"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"layers": ["nope"]}, "matches no parameter"),
        ({"stop_when": 3}, "stop_when must be a callable"),
    ],
)
def test_ig_rejects_bad_options(options: dict, message: str) -> None:
    model = tiny_mlp()
    grads, _ = compute_gradients(model, image(), torch.tensor([0]))
    with pytest.raises(ValueError, match=message):
        run_ig(model, grads, torch.tensor([0]), **options)


def test_ig_and_fedavg_recover_labels_when_not_given() -> None:
    model = tiny_mlp()
    x, y = image(2), torch.tensor([2, 8])
    grads, _ = compute_gradients(model, x, y)
    result = run_ig(model, grads, None, batch_size=2, iterations=5)
    assert result.info["labels_recovered"]
    assert sorted(result.labels.tolist()) == [2, 8]
    update = client_update(model, x, y, steps=2, lr=0.1)
    result = run_fedavg(model, update, None, batch_size=2, iterations=5)
    assert result.info["labels_recovered"]
    assert sorted(result.labels.tolist()) == [2, 8]


def test_ig_layer_selection() -> None:
    model = tiny_mlp()
    x, y = image(), torch.tensor([4])
    grads, _ = compute_gradients(model, x, y)
    result = run_ig(model, grads, y, iterations=5, layers=["1"])
    assert result.info["matched_parameters"] == ["1.weight", "1.bias"]
    result = run_ig(model, grads, y, iterations=5, layers=lambda n: n.endswith("bias"))
    assert result.info["matched_parameters"] == ["1.bias", "3.bias", "5.bias"]


def run_ignore(model, grads, labels, **options):
    options = {"iterations": 200, "lr": 0.1, "seed": 0, **options}
    return reconstruct(
        "ignore-bottleneck",
        model,
        grads,
        labels=labels,
        input_shape=SHAPE,
        mean=MEAN,
        std=STD,
        **options,
    )


def test_ignore_bottleneck_matches_only_pre_bottleneck_gradients() -> None:
    model = tiny_mlp(precode=True)
    x, y = image(), torch.tensor([4])
    grads, _ = compute_gradients(model, x, y)
    before = parameters_before_bottleneck(model, SHAPE)
    assert before == ["1.weight", "1.bias", "3.weight", "3.bias"]
    result = run_ignore(model, grads, y)
    assert result.attack == "ignore-bottleneck"
    assert result.info["matched_parameters"] == before
    # Scrambling every gradient behind the bottleneck changes nothing.
    names = [n for n, _ in model.named_parameters()]
    scrambled = [
        g if n in before else torch.randn_like(g) for n, g in zip(names, grads, strict=True)
    ]
    again = run_ignore(model, scrambled, y)
    assert torch.equal(result.images, again.images) and result.loss == again.loss
    # ... while scrambling a pre-bottleneck gradient does.
    changed = [
        torch.randn_like(g) if n == "3.weight" else g for n, g in zip(names, grads, strict=True)
    ]
    assert not torch.equal(run_ignore(model, changed, y).images, result.images)
    start = run_ignore(model, grads, y, iterations=1)
    assert psnr(result.images, x) > psnr(start.images, x) + 10


def test_ignore_bottleneck_needs_a_precode_model() -> None:
    model = tiny_mlp()
    grads, _ = compute_gradients(model, image(), torch.tensor([0]))
    with pytest.raises(ValueError, match="applies only to PRECODE models"):
        run_ignore(model, grads, torch.tensor([0]))
    precode = tiny_mlp(precode=True)
    grads, _ = compute_gradients(precode, image(), torch.tensor([0]))
    with pytest.raises(ValueError, match="drop 'layers'"):
        run_ignore(precode, grads, torch.tensor([0]), layers=["1"])


def client_update(model: nn.Module, x, y, steps: int, lr: float) -> list[torch.Tensor]:
    """One epoch of plain SGD in consecutive batches, as the fedavg attack assumes."""
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=lr)
    b = len(y) // steps
    for t in range(steps):
        opt.zero_grad()
        logits = client(x[t * b : (t + 1) * b])
        F.cross_entropy(logits, y[t * b : (t + 1) * b]).backward()
        opt.step()
    return [
        (new - old).detach()
        for new, old in zip(client.parameters(), model.parameters(), strict=True)
    ]


def run_fedavg(model, update, labels, **extra):
    options = {"iterations": 150, "lr": 0.1, "seed": 0, "local_steps": 2, "local_lr": 0.1}
    options.update(extra)
    return reconstruct(
        "fedavg", model, update, labels=labels, input_shape=SHAPE, mean=MEAN, std=STD, **options
    )


def test_fedavg_unrolls_local_sgd_and_reduces_its_objective() -> None:
    model = tiny_mlp()
    x, y = image(4), torch.tensor([1, 3, 5, 7])
    update = client_update(model, x, y, steps=2, lr=0.1)
    training = LocalTraining(batch_size=2, steps=2, lr=0.1).resolve(4)[0]
    matcher = UpdateMatcher(
        model, update, [True] * 6, cost="cosine", training=training, noise_seed=0
    )
    with matcher:
        simulated = matcher.simulated_update(x, y, create_graph=False)
    for ours, theirs in zip(simulated, update, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    start = run_fedavg(model, update, y, iterations=1)
    result = run_fedavg(model, update, y)
    assert result.attack == "fedavg" and result.images.shape == (4, *SHAPE)
    assert result.loss < 0.5 * start.loss
    assert psnr(result.images, x) > psnr(start.images, x) + 3
    assert result.info["local_steps"] == 2 and result.info["local_batch_size"] == 2


def test_fedavg_with_precode_and_batch_one() -> None:
    model = tiny_mlp(precode=True)
    x, y = image(1), torch.tensor([6])
    torch.manual_seed(5)
    grads, _ = compute_gradients(model, x, y)
    update = [-0.05 * g for g in grads]  # one local step of lr 0.05 = FedSGD
    # The unrolling on a bottleneck, given the client's noise draw (seed 5): with PRECODE's
    # noise unknown to the server, its objective barely falls (1.05 to 0.91 measured).
    opts = {"local_steps": 1, "local_lr": 0.05, "noise_seed": 5}
    start = run_fedavg(model, update, y, iterations=1, **opts)
    result = run_fedavg(model, update, y, iterations=100, **opts)
    assert result.loss < 0.5 * start.loss
    assert all(m.kl is not None for _, m in bottlenecks(model))


def test_fedavg_rejects_inconsistent_options() -> None:
    model = tiny_mlp()
    update = [torch.zeros_like(p) for p in model.parameters()]
    labels = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="visit 2 of batch_size=3 examples"):
        run_fedavg(model, update, labels, local_steps=1, local_batch_size=2)
    with pytest.raises(ValueError, match="unknown option"):
        run_fedavg(model, update, labels[:2], fast=False)
    with pytest.raises(ValueError, match="local_lr must be"):
        run_fedavg(model, update, labels[:2], local_lr=0)
