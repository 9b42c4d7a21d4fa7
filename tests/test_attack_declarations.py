"""The registry's declarations (input kind, outputs, applicability) that callers read instead
of attack names, and the one case object every attack receives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from precode_flower import extend, models
from precode_flower.attacks import ATTACKS, AttackCase, AttackResult, reconstruct, register
from precode_flower.attacks.base import SPECS, reconstructs_images, spec
from precode_flower.audit import attack_inputs
from precode_flower.local_training import LocalTraining

SHAPE = (3, 32, 32)

if "test-decl-weights" not in ATTACKS:

    @register("test-decl-weights", inputs="weights", outputs=("images",))
    def _weights(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
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
    # The batch attacks on a Linear+ReLU layer say where they apply, instead of failing there.
    for name in ("spear", "cocktail"):
        assert spec(name).why_not(mlp, SHAPE) is None
        assert spec(name).why_not(extend(mlp, input_shape=SHAPE), SHAPE) is None
        assert "does not apply" in spec(name).why_not(convnet, SHAPE)
    no_relu = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    assert "nn.ReLU" in spec("spear").why_not(no_relu, SHAPE)
    # Label counts return placeholder images: declared labels-only, so they are never scored.
    assert spec("label-counts").outputs == {"labels"}


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


def test_an_attack_takes_one_frozen_case_that_reconstruct_builds() -> None:
    name = "test-case-echo"
    seen: list[tuple[AttackCase, float]] = []

    @register(name, outputs=("labels",))
    def _echo(case: AttackCase, *, scale: float = 1.0) -> AttackResult:
        seen.append((case, float(torch.rand(()))))  # reconstruct seeds torch before the call
        return AttackResult(
            attack=name,
            images=torch.zeros(case.batch_size, *case.input_shape),
            labels=case.labels,
            loss=scale * float(case.gradients[0].sum()),
            seconds=0.0,
        )

    model = models.mlp(3, (1, 2, 2), width=5)
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}  # by name
    try:
        result = reconstruct(
            name,
            model,
            grads,
            labels=[2, 0],
            input_shape=[1, 2, 2],
            mean=[0.5],
            std=[0.25],
            seed=7,
            scale=2.0,
        )
        with pytest.raises(TypeError, match="bogus"):  # options reach the attack as keywords
            reconstruct(name, model, grads, input_shape=(1, 2, 2), mean=[0], std=[1], bogus=1)
    finally:
        del ATTACKS[name], SPECS[name]
    assert name not in ATTACKS
    ((case, draw),) = seen
    torch.manual_seed(7)
    assert draw == float(torch.rand(()))
    assert case.model is model and result.loss == 2.0 * grads[next(iter(grads))].numel()
    # Checked and normalised once: a list in parameter order, int64 labels, tuples.
    assert isinstance(case.gradients, list)
    assert [g.shape for g in case.gradients] == [p.shape for p in model.parameters()]
    assert case.labels.dtype == torch.long and case.labels.tolist() == [2, 0]
    assert (case.input_shape, case.mean, case.std) == ((1, 2, 2), (0.5,), (0.25,))
    assert (case.batch_size, case.seed, case.device) == (2, 7, torch.device("cpu"))
    low, high = case.pixel_box()
    assert low.shape == (1, 1, 1, 1) and (float(low), float(high)) == (-2.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        case.seed = 8  # type: ignore[misc]
    variant = dataclasses.replace(case, labels=None)
    assert variant.labels is None and case.labels is not None and variant.model is model
