"""Settings declared once (precode_flower.settings): flags, checks and the pyproject table
are all derived from RunConfig's field declarations."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from precode_flower import settings, task

REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, task.RunConfig)
    return parser


def test_the_pyproject_run_config_is_the_generated_one() -> None:
    text = (REPO / "pyproject.toml").read_text()
    generated = settings.toml_lines(task.RunConfig, task.RunConfig().to_config())
    lines = text.split("[tool.flwr.app.config]\n", 1)[1].splitlines()
    assert lines[: len(generated)] == generated, (
        "pyproject.toml's [tool.flwr.app.config] drifted from RunConfig; regenerate it with "
        "precode_flower.settings.toml_lines(RunConfig, RunConfig().to_config())"
    )
    table = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert task.RunConfig.from_mapping(table) == task.RunConfig()


def test_every_setting_has_a_flag_and_the_defaults_round_trip() -> None:
    parser = _parser()
    flags = {a.dest for a in parser._actions}
    names = [f.name for f, _ in settings.specs(task.RunConfig)]
    assert set(names) <= flags
    assert names == [f.name for f in dataclasses.fields(task.RunConfig) if f.name != "extra"]
    assert settings.from_namespace(task.RunConfig, parser.parse_args([])) == task.RunConfig()
    args = parser.parse_args(["--mode", "FedSGD", "--defense", "precode", "--defense", "noise"])
    cfg = settings.from_namespace(task.RunConfig, args)
    assert cfg.mode == "fedsgd" and cfg.defenses == ("precode", "noise")


@pytest.mark.parametrize(
    "name", [f.name for f, _ in settings.specs(task.RunConfig) if type(f.default) is float]
)
def test_no_number_setting_accepts_nan_or_infinity(name: str) -> None:
    key = settings.key_of(name)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            task.RunConfig(**{name: bad})
        with pytest.raises(argparse.ArgumentError, match="must be a finite number"):
            _parser().parse_args([f"--{key}={bad}"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_dim": -1}, "latent-dim must be >= 1, got -1"),
        ({"seed": 2**64}, "seed must be >= 0 and <= 9223372036854775807"),
        ({"fraction": 1.5}, "fraction must be > 0 and <= 1"),
        ({"max_examples": -1}, "max-examples must be >= 1 (0 = auto"),
        ({"classes_per_client": 99}, "classes-per-client must be <= 10"),
        ({"min_replies": 5, "clients": 2}, "min-replies 5 exceeds the 2 clients sampled"),
        ({"min_replies": 2, "clients": 4, "fraction": 0.25}, "exceeds the 1 clients sampled"),
        ({"aggregation": "krum", "mode": "fedsgd"}, "FedSGD averages gradients"),
        ({"mode": "fedprox"}, "choose one of: fedavg, fedsgd"),
    ],
)
def test_impossible_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        task.RunConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "aggregation, strategy",
    [("mean", "FedAvg"), ("trimmed-mean", "FedTrimmedAvg"), ("median", "FedMedian"),
     ("krum", "Krum")],
)  # fmt: skip
def test_aggregation_selects_flowers_robust_strategies(aggregation: str, strategy: str) -> None:
    from precode_flower.federation import make_strategy

    cfg = task.RunConfig(mode="fedavg", aggregation=aggregation)
    assert type(make_strategy(cfg, ["w"])).__name__ == strategy
