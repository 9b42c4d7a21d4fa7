"""LocalTraining and its differentiable replay: the same numbers as torch.optim's training loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from precode_flower.attacks import reconstruct
from precode_flower.local_training import LocalTraining, unrolled_update
from precode_flower.strategies import LocalTraining as Reexported

SHAPE = (3, 8, 8)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def real_update(model: nn.Module, x, y, opt_name: str, epochs: int, shuffle: bool, **kw):
    """The client's loop as Flower's quickstart writes it: DataLoader, torch.optim, CE."""
    client = small_cnn()
    client.load_state_dict(model.state_dict())
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt_name]
    opt = cls(client.parameters(), **kw)
    gen = torch.Generator().manual_seed(2)
    loader = DataLoader(TensorDataset(x, torch.arange(len(y))), batch_size=8, shuffle=shuffle,
                        generator=gen)  # fmt: skip
    order = []
    for _ in range(epochs):
        for xb, idx in loader:
            opt.zero_grad()
            F.cross_entropy(client(xb), y[idx]).backward()
            opt.step()
            order.append(idx)
    named = dict(model.named_parameters())
    return {k: (p - named[k]).detach() for k, p in client.named_parameters()}, order


@pytest.mark.parametrize(
    ("opt_name", "kw"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
        ("sgd", {"lr": 0.1}),
        ("adam", {"lr": 0.01, "weight_decay": 1e-3}),
        ("adamw", {"lr": 0.01, "weight_decay": 1e-2}),
    ],
)
def test_the_replay_reproduces_torch_optim_with_a_ragged_last_batch(opt_name, kw) -> None:
    model = small_cnn()
    x, y = data(21)  # batches of 8: 8, 8, 5; two epochs = 6 steps
    real, _ = real_update(model, x, y, opt_name, epochs=2, shuffle=False, **kw)
    training = LocalTraining(batch_size=8, epochs=2, optimizer=opt_name, **kw)
    assert training.total_steps(21) == 6 and training.batches(21)[2] == (16, 21)
    ours = unrolled_update(model, x, y, training, create_graph=False)
    for k, v in real.items():
        torch.testing.assert_close(ours[k].detach(), v, rtol=1e-4, atol=2e-6)
    # A wrong assumption (no momentum / plain SGD) is far off: the check can fail.
    wrong = unrolled_update(model, x, y, LocalTraining(batch_size=8, epochs=2, lr=kw["lr"]),
                            create_graph=False)  # fmt: skip
    if opt_name != "sgd" or kw.get("momentum") or kw.get("weight_decay"):
        assert max(float((wrong[k] - v).abs().max()) for k, v in real.items()) > 1e-3


def test_a_reshuffling_client_is_reproduced_given_its_batches() -> None:
    model = small_cnn()
    x, y = data(20)
    real, order = real_update(model, x, y, "sgd", epochs=2, shuffle=True, lr=0.1, momentum=0.9)
    training = LocalTraining(batch_size=8, epochs=2, lr=0.1, momentum=0.9)
    ours = unrolled_update(model, x, y, training, order=order, create_graph=False)
    for k, v in real.items():
        torch.testing.assert_close(ours[k].detach(), v, rtol=1e-4, atol=2e-6)


def test_local_training_states_what_it_knows_and_guesses() -> None:
    assert Reexported is LocalTraining
    known = LocalTraining(batch_size=32, epochs=1, lr=0.1, momentum=0.9)
    assert known.unknown() == ["weight_decay", "optimizer"]
    full, guessed = known.resolve(2000)
    assert guessed == ["weight_decay", "optimizer"] and full.optimizer == "sgd"
    assert full.total_steps(2000) == math.ceil(2000 / 32) == 63
    text = full.describe(2000)
    assert text == "SGD lr 0.1 momentum 0.9, batch 32, 1 epoch(s) = 63 steps over 2000 examples " \
        "(last batch 16)"  # fmt: skip
    nothing, guessed = LocalTraining().resolve(2000)
    assert guessed == ["batch_size", "epochs", "lr", "momentum", "weight_decay", "optimizer"]
    assert nothing.total_steps(2000) == 1 and "(assumed)" in nothing.describe(2000, guessed)
    # Train-config values win over local=; a stated step count replaces local='s epochs.
    merged = known.merged({"lr": 0.05, "local-steps": 10, "momentum": 0.0})
    assert (merged.lr, merged.steps, merged.epochs, merged.momentum) == (0.05, 10, None, 0.0)
    # Mean-gradient scale of heavy-ball momentum: sum_k (1 - mu^k) / (1 - mu).
    mom = LocalTraining(batch_size=1, steps=3, lr=1.0, momentum=0.5)
    assert mom.effective_steps(3) == pytest.approx(1 + 1.5 + 1.75)
    for bad in ({"batch_size": 0}, {"momentum": 1.0}, {"optimizer": "lbfgs"}, {"lr": -1}):
        with pytest.raises(ValueError, match="LocalTraining"):
            LocalTraining(**bad)
    with pytest.raises(ValueError, match="train config batch-size"):
        known.merged({"batch-size": 2.5})


def test_fedavg_attack_unrolls_momentum_over_a_ragged_epoch() -> None:
    model = small_cnn()
    x, y = data(5)
    training = LocalTraining(batch_size=2, epochs=1, lr=0.1, momentum=0.9)
    update = unrolled_update(model, x, y, training, create_graph=False)
    update = {k: v.detach() for k, v in update.items()}
    opts = {"iterations": 30, "lr": 0.1, "seed": 0, "training": training}
    start = reconstruct("fedavg", model, update, labels=y, input_shape=SHAPE,
                        mean=(0.0,) * 3, std=(1.0,) * 3, **{**opts, "iterations": 1})  # fmt: skip
    result = reconstruct("fedavg", model, update, labels=y, input_shape=SHAPE,
                         mean=(0.0,) * 3, std=(1.0,) * 3, **opts)  # fmt: skip
    assert result.images.shape == (5, *SHAPE) and result.loss < start.loss
    assert result.info["local_steps"] == 3 and result.info["assumed"] == [
        "weight_decay",
        "optimizer",
    ]
    assert "momentum 0.9, batch 2" in result.info["training"]
