"""Named defense presets build models whose bottleneck sits where they document it."""

from __future__ import annotations

import pytest
import torch

from precode_flower import defenses as d
from precode_flower import task
from precode_flower.attacks.base import parameters_before_bottleneck
from precode_flower.models import build
from precode_flower.precode import ConvVariationalBottleneck, Precoded, bottlenecks

PARAMS = d.DefenseParams()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_precode_early_sits_after_the_first_convolution_of_the_convnet(shape) -> None:
    model = d.apply_model_defenses(build("convnet", 10, shape), ["precode-early"], PARAMS, shape)
    [(name, bottleneck)] = bottlenecks(model)
    assert name == "features.2.precode"  # after conv1 + ReLU, before the second convolution
    assert isinstance(bottleneck, ConvVariationalBottleneck)
    assert isinstance(model.features[2], Precoded)
    assert isinstance(model.features[2].module, torch.nn.Conv2d)
    assert bottleneck.in_channels == 32
    assert bottleneck.latent_channels == d.EARLY_LATENT_CHANNELS
    assert bottleneck.beta == d.EARLY_BETA
    # Only the first convolution's gradient precedes the bottleneck.
    assert parameters_before_bottleneck(model, shape) == ["features.0.weight", "features.0.bias"]
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # The documented initial std: PRECODE's softplus(s) of a near-zero s, about 0.69.
    with torch.no_grad():
        _, std = bottleneck.posterior(model.features[:2](x))
    assert 0.6 <= float(std.mean()) <= 0.8
    assert "initial std 0.69" in d.DEFENSES["precode-early"].description


def test_precode_early_sits_after_the_resnet_stem() -> None:
    shape = (3, 32, 32)
    model = d.apply_model_defenses(build("resnet18", 10, shape), ["precode-early"], PARAMS, shape)
    [(name, bottleneck)] = bottlenecks(model)
    assert name == "layer1.precode" and bottleneck.in_channels == 64
    assert parameters_before_bottleneck(model, shape) == ["conv1.weight", "bn1.weight", "bn1.bias"]


def test_precode_early_refuses_a_model_without_a_known_first_block() -> None:
    shape = (1, 28, 28)
    with pytest.raises(ValueError, match="precode-early"):
        d.apply_model_defenses(build("mlp", 10, shape), ["precode-early"], PARAMS, shape)


def test_precode_early_is_a_named_defense_of_runs() -> None:
    assert "precode-early" in d.DEFENSES
    assert d.parse_defenses("Precode-Early") == ("precode-early",)
    assert not d.has_update_defense(["precode-early"])
    cfg = task.RunConfig(model="convnet", dataset="mnist", defenses="precode-early")
    assert cfg.to_config()["defenses"] == "precode-early"
    model = task.build_model(cfg, 10, (1, 28, 28), seed=0)
    assert [n for n, _ in bottlenecks(model)] == ["features.2.precode"]
    # Combined with PRECODE: both bottlenecks, the early one first in the forward pass.
    both = task.RunConfig(model="convnet", dataset="mnist", defenses="precode,precode-early")
    names = [n for n, _ in bottlenecks(task.build_model(both, 10, (1, 28, 28), seed=0))]
    assert sorted(names) == ["classifier.3.precode", "features.2.precode"]
