"""The registry's declarations (input kind, outputs, applicability) that callers read instead
of attack names."""

from __future__ import annotations

import pytest
import torch

from precode_flower import extend, models
from precode_flower.attacks import ATTACKS, AttackResult, register
from precode_flower.attacks.base import reconstructs_images, spec
from precode_flower.audit import attack_inputs
from precode_flower.local_training import LocalTraining

SHAPE = (3, 32, 32)

if "test-decl-weights" not in ATTACKS:

    @register("test-decl-weights", inputs="weights", outputs=("images",))
    def _weights(model, gradients, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        raise AssertionError("not run here")


def test_the_package_attacks_declare_what_they_need_and_return() -> None:
    assert spec("fedavg").inputs == "weights"
    assert {spec(a).inputs for a in ("analytic", "ig", "dlg", "labels")} == {"gradients"}
    assert spec("labels").outputs == {"labels"} and not reconstructs_images("labels")
    assert reconstructs_images("ig") and reconstructs_images("an-attack-of-an-old-run")
    mlp, convnet = models.build("mlp", 10, SHAPE), models.build("convnet", 10, SHAPE)
    assert spec("analytic").why_not(mlp, SHAPE) is None
    assert "does not apply" in spec("analytic").why_not(convnet, SHAPE)
    assert "PRECODE" in spec("ignore-bottleneck").why_not(mlp, SHAPE)
    assert spec("ignore-bottleneck").why_not(extend(mlp, input_shape=SHAPE), SHAPE) is None


def test_an_attack_declared_on_weight_updates_gets_the_update_itself() -> None:
    update = {"w": torch.ones(2)}
    training = LocalTraining(batch_size=4, steps=3, lr=0.1).with_defaults()
    payload = {"update": update, "kind": "weights", "training": training, "batch_size": 12}
    tensors, opts, pseudo = attack_inputs(payload, "test-decl-weights")
    assert tensors is update and not pseudo
    assert opts == {"training": training}
    tensors, _, pseudo = attack_inputs(payload, "ig")  # a gradient attack: pseudo-gradient
    assert pseudo and torch.allclose(tensors["w"], -torch.ones(2) / 0.3)


@pytest.mark.parametrize(
    "kwargs", [{"inputs": "images"}, {"outputs": ()}, {"outputs": ("pixels",)}]
)
def test_senseless_declarations_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="test-decl-bad"):
        register("test-decl-bad", **kwargs)
