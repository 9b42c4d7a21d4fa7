"""Settings declared once (precode_flower.settings): flags, checks and the pyproject table
are all derived from RunConfig's field declarations, the defenses' parameters from their
own dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from precode_flower import defenses, settings, task

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


#: Where the defenses' parameters are declared (and nowhere else).
DEFENSE_PARAMS = (defenses.DefenseParams, defenses.DpParams)


def _pyproject() -> tuple[list[str], dict]:
    text = (REPO / "pyproject.toml").read_text()
    lines = text.split("[tool.flwr.app.config]\n", 1)[1].splitlines()
    return lines, tomllib.loads(text)["tool"]["flwr"]["app"]["config"]


def _other_valid_value(f: dataclasses.Field, spec: settings.Spec):  # noqa: ANN202
    """A value of setting ``f`` that is not its default and that its spec accepts."""
    if spec.choices:
        return next(c for c in spec.choices if c != f.default)
    if isinstance(f.default, int):
        return f.default + 1
    key = settings.key_of(f.name)
    for value in (f.default / 2, (f.default + 1) / 2, f.default + 1):
        try:
            if value != f.default:
                return settings.check(key, spec, value)
        except ValueError:
            continue
    raise AssertionError(f"no other valid value for {key}")


@pytest.mark.parametrize("cls", DEFENSE_PARAMS, ids=lambda c: c.__name__)
def test_each_defense_parameter_is_a_run_config_key_flag_and_pyproject_line(cls) -> None:
    """A field of a defense's dataclass is, with no other edit, a RunConfig field with the
    same spec, a ``simulate.py`` / ``server.py`` flag with its help and default, a run-config
    key and a ``[tool.flwr.app.config]`` line."""
    from precode_flower.federation.flags import add_training_args

    run = {f.name: (f, spec) for f, spec in settings.specs(task.RunConfig)}
    parser = argparse.ArgumentParser()
    add_training_args(parser, default_clients=2)
    actions = {a.dest: a for a in parser._actions}
    config = task.RunConfig().to_config()
    lines, table = _pyproject()
    declared = list(settings.specs(cls))
    assert declared, f"{cls.__name__} declares no settings"
    for f, spec in declared:
        key = settings.key_of(f.name)
        run_field, run_spec = run[f.name]
        assert run_spec is spec and run_field.default == f.default, key
        assert actions[f.name].option_strings == [f"--{key}"], key
        assert actions[f.name].help == settings.describe(spec), key
        assert actions[f.name].default == f.default, key
        assert config[key] == f.default and table[key] == f.default, key
    defaults = {settings.key_of(f.name): f.default for f, _ in declared}
    missing = [line for line in settings.toml_lines(cls, defaults) if line not in lines]
    assert not missing, f"not in pyproject.toml's [tool.flwr.app.config]: {missing}"


def test_run_config_declares_no_defense_parameter_of_its_own() -> None:
    inherited = {f.name for cls in DEFENSE_PARAMS for f in dataclasses.fields(cls)}
    assert inherited <= {f.name for f in dataclasses.fields(task.RunConfig)}
    # Re-declaring an inherited field in task.py would give it a second spec there.
    for cls in task.RunConfig.__mro__:
        if cls.__module__ == task.__name__:
            assert not inherited & set(vars(cls).get("__annotations__", {})), cls.__name__
    own = [(f, s) for f, s in settings.specs(task.RunConfig) if f.name not in inherited]
    for f, spec in own:
        if f.name == "defenses":  # the names of the defenses, not a parameter of one
            continue
        assert not f.name.startswith("dp_"), f"{f.name}: a DP parameter belongs in DpParams"
        help_ = spec.help.lower()
        assert not any(w in help_ for w in ("defense", "precode", "dp ")), (
            f"{f.name} ({spec.help!r}) looks like a defense parameter: declare it on "
            "DefenseParams or DpParams (precode_flower.defenses)"
        )


def test_defense_parameters_go_through_run_config_generically() -> None:
    """Every defense parameter set on a RunConfig (as a keyword, a config key or a flag)
    reaches ``defense_params`` / ``dp_params``: no per-field copy to forget."""
    values = {
        f.name: _other_valid_value(f, spec)
        for cls in DEFENSE_PARAMS
        for f, spec in settings.specs(cls)
    }
    cfg = task.RunConfig(**values)
    again = task.RunConfig.from_mapping(cfg.to_config())
    argv = [f"--{settings.key_of(name)}={value}" for name, value in values.items()]
    flagged = settings.from_namespace(task.RunConfig, _parser().parse_args(argv))
    for built in (cfg, again, flagged):
        for params, cls in ((built.defense_params, defenses.DefenseParams),
                            (built.dp_params, defenses.DpParams)):  # fmt: skip
            assert type(params) is cls
            assert params == cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (defenses.DefenseParams, {"prune_rate": 1.0}, "prune-rate must be >= 0 and < 1, got 1.0"),
        (defenses.DefenseParams, {"clip": 0.0}, "clip must be > 0, got 0.0"),
        (defenses.DpParams, {"dp_delta": 1.0}, "dp-delta must be > 0 and < 1, got 1.0"),
        (defenses.DpParams, {"dp_clipping": "median"}, "unknown dp-clipping 'median'"),
        (defenses.DpParams, {"dp_noise": math.nan}, "dp-noise must be a finite number"),
    ],
)
def test_defense_dataclasses_check_their_declared_bounds(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
