"""The PRECODE bottlenecks, extend() and precode_loss()."""

import math

import pytest
import torch
from torch import nn

import precode_flower as pf
from precode_flower.models import build
from precode_flower.precode import (
    ConvVariationalBottleneck,
    Precoded,
    VariationalBottleneck,
    gaussian_kl_bits,
)


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 8, 2)])
def test_vector_bottleneck_keeps_shape(shape):
    features = math.prod(shape[1:])
    vb = VariationalBottleneck(features, latent_dim=16)
    x = torch.randn(*shape)
    assert vb(x).shape == x.shape


def test_conv_bottleneck_keeps_feature_map_shape():
    cb = ConvVariationalBottleneck(6, latent_channels=4)
    x = torch.randn(2, 6, 9, 7)
    assert cb(x).shape == x.shape
    # Far fewer parameters than a fully connected bottleneck over the flattened map.
    fc = VariationalBottleneck(6 * 9 * 7, latent_dim=256)
    assert sum(p.numel() for p in cb.parameters()) < sum(p.numel() for p in fc.parameters()) / 50


def test_training_forward_samples_and_eval_mode_is_configurable():
    torch.manual_seed(0)
    vb = VariationalBottleneck(32, latent_dim=8)
    x = torch.randn(4, 32)
    assert not torch.allclose(vb(x), vb(x)), "training passes must draw fresh noise"
    vb.eval()
    assert torch.equal(vb(x), vb(x)), "eval_mode='mean' is deterministic"
    vb_sample = VariationalBottleneck(32, latent_dim=8, eval_mode="sample").eval()
    assert not torch.allclose(vb_sample(x), vb_sample(x))


def test_kl_matches_closed_form_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    std = torch.tensor([[1.0, 0.5], [2.0, 1.0]])
    # Per dim: 0.5 * (mu^2 + s^2 - 1 - ln s^2), in nats.
    row0 = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 0.25 - 1 - math.log(0.25))
    row1 = 0.5 * (0 + 4 - 1 - math.log(4)) + 0.5 * (4 + 1 - 1 - 0)
    expected_bits = (row0 + row1) / 2 / math.log(2)
    assert gaussian_kl_bits(mu, std).item() == pytest.approx(expected_bits, rel=1e-6)


def test_precode_loss_is_beta_times_kl_and_zero_without_bottleneck():
    model = pf.extend(build("mlp", 10, (1, 8, 8)), latent_dim=16, beta=0.5)
    model(torch.randn(3, 1, 8, 8))
    (_, vb) = pf.bottlenecks(model)[0]
    assert pf.precode_loss(model).item() == pytest.approx(0.5 * vb.kl.item())
    assert pf.precode_loss(build("mlp", 10, (1, 8, 8))).item() == 0.0


def test_gradients_reach_encoder_and_decoder():
    model = pf.extend(build("mlp", 10, (1, 8, 8)), latent_dim=16)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y) + pf.precode_loss(model)
    loss.backward()
    vb = pf.bottlenecks(model)[0][1]
    for p in [*vb.encoder.parameters(), *vb.decoder.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "where"),
    [("mlp", "5"), ("convnet", "classifier.3"), ("resnet18", "fc")],
)
def test_extend_paper_models_before_classifier(name, where):
    shape = (3, 32, 32)
    model = pf.extend(build(name, 10, shape))
    wrapped = model.get_submodule(where)
    assert isinstance(wrapped, Precoded) and isinstance(wrapped.module, nn.Linear)
    assert isinstance(wrapped.precode, VariationalBottleneck)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_extend_unseen_model_without_editing_it():
    class Odd(nn.Module):  # forward order differs from registration order
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(20, 3)
            self.body = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU())
            self.proj = nn.Linear(5 * 4 * 4, 20)

        def forward(self, x):
            return self.head(torch.relu(self.proj(self.body(x).flatten(1))))

    model = pf.extend(Odd(), latent_dim=4, input_shape=(1, 4, 4))
    assert isinstance(model.head, Precoded)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)


def test_extend_before_early_conv_stage_uses_conv_bottleneck():
    model = pf.extend(build("resnet18", 10, (3, 32, 32)), before="layer1")
    assert isinstance(model.layer1.precode, ConvVariationalBottleneck)
    model = pf.extend(build("convnet", 10, (1, 28, 28)), before="features.2")
    assert isinstance(model.features[2].precode, ConvVariationalBottleneck)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_extend_errors_are_clear():
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        pf.extend(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="no such submodule"):
        pf.extend(build("mlp", 10, (1, 8, 8)), before="nope")
    model = pf.extend(build("mlp", 10, (1, 8, 8)))
    with pytest.raises(ValueError, match="already has"):
        pf.extend(model, before="5")


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        VariationalBottleneck(8, beta=-1)
    with pytest.raises(ValueError, match="eval_mode"):
        VariationalBottleneck(8, eval_mode="median")
    with pytest.raises(ValueError, match="expects 8 features"):
        VariationalBottleneck(8)(torch.randn(2, 9))
