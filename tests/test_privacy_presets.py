"""The DP and secure-aggregation presets build what they document."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from precode_flower import defenses as d
from precode_flower import task
from precode_flower.federation.rounds import make_strategy
from precode_flower.precode import bottlenecks
from precode_flower.strategies.privacy import DP_WEIGHT_KEY, PrivateStrategy

SHAPE = (1, 28, 28)


def _parts(preset: str) -> tuple[str, ...]:
    return d.parse_defenses(preset)


def test_presets_expand_to_their_documented_parts() -> None:
    assert _parts("dp-precode-early") == ("precode-early", "dp-client")
    assert _parts("dp-secagg") == ("dp-client", "secagg")
    assert _parts("precode-early-secagg") == ("precode-early", "secagg")
    # Presets combine like names, and the canonical config round-trips.
    cfg = task.RunConfig(model="convnet", defenses="dp-precode-early")
    assert task.RunConfig.from_mapping(cfg.to_config()).defenses == cfg.defenses
    assert all(p in d.DEFENSES for parts in d.PRESETS.values() for p in parts)


@pytest.mark.parametrize("preset", ["dp-precode-early", "precode-early-secagg"])
def test_precode_early_presets_build_the_early_bottleneck(preset) -> None:
    cfg = task.RunConfig(model="convnet", dataset="mnist", defenses=preset)
    model = task.build_model(cfg, 10, SHAPE, seed=0)
    assert [n for n, _ in bottlenecks(model)] == ["features.2.precode"]


@pytest.mark.parametrize("preset", ["dp-precode-early", "dp-secagg"])
def test_dp_presets_run_flowers_client_side_wrapper_around_uniform_fedavg(preset) -> None:
    cfg = task.RunConfig(model="convnet", dataset="mnist", defenses=preset, clients=4)
    strategy = make_strategy(cfg, [])
    assert isinstance(strategy, PrivateStrategy) and strategy.defense == "dp-client"
    assert type(strategy.dp) is DifferentialPrivacyClientSideFixedClipping
    assert type(strategy.base) is FedAvg and strategy.base.weighted_by_key == DP_WEIGHT_KEY
    assert strategy.num_sampled_clients == 4
    assert strategy.secagg == ("secagg" in cfg.defenses)


def test_secagg_presets_are_secagg_runs_and_models_are_unchanged() -> None:
    plain = task.build_model(task.RunConfig(model="mlp", dataset="mnist"), 10, SHAPE, seed=0)
    cfg = task.RunConfig(model="mlp", dataset="mnist", defenses="secagg")
    secured = task.build_model(cfg, 10, SHAPE, seed=0)
    assert list(plain.state_dict()) == list(secured.state_dict())
    assert "secagg" in task.RunConfig(defenses="dp-secagg").defenses
    assert not isinstance(make_strategy(cfg, []), PrivateStrategy)  # no DP: plain FedAvg
