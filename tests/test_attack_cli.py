"""The attack CLI end to end (subprocess) and its usage errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from precode_flower import attack

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "precode_flower.attack", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_analytic_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run("--attack", "analytic", "--images", "2", "--defense", "precode", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["attack"] == "analytic" and row["defense"] == "precode"
        assert row["psnr"] > 100 and row["ssim"] > 0.99
        assert row["label_correct"] is True and row["success"] is True
        assert row["linked"] is True  # an exact reconstruction re-identifies its original
    grid = out / "grid.png"
    assert stat.S_IMODE(grid.stat().st_mode) == 0o600


def test_cli_reports_failing_attack_and_goes_on(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    # The analytic attack does not apply to the ConvNet; the label attack still runs.
    code = attack.main(
        ["--model", "convnet", "--attack", "analytic,labels", "--images", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert "does not apply" in lines[0]["error"] and lines[0]["attack"] == "analytic"
    assert lines[1]["attack"] == "labels" and lines[1]["label_correct"] is True


@pytest.mark.parametrize(
    ("args", "listed"),
    [
        (["--attack", "analytic,nope"], "analytic"),
        (["--model", "vgg"], "mlp"),
        (["--dataset", "imagenet"], "cifar10"),
    ],
)
def test_cli_unknown_names_exit_2(args: list[str], listed: str, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exc:
        attack.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and listed in err


def test_weights_of_a_trained_preset_model_are_attacked(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """--weights loads a run's model.pt into the --model/--defense built here, or says why not."""
    import torch

    from precode_flower import models
    from precode_flower.defenses import DefenseParams, apply_model_defenses

    shape = (1, 28, 28)
    net = apply_model_defenses(
        models.build("convnet", 10, shape), ["precode-early"], DefenseParams(), shape
    )
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.01)  # a state no seeded initialisation gives
    weights = tmp_path / "model.pt"
    torch.save(net.state_dict(), weights)

    built = apply_model_defenses(
        models.build("convnet", 10, shape), ["precode-early"], DefenseParams(), shape
    )
    attack.load_weights(built, weights)
    assert all(
        torch.equal(a, b)
        for a, b in zip(built.state_dict().values(), net.state_dict().values(), strict=True)
    )

    plain = models.build("convnet", 10, shape)  # no bottleneck: the keys do not fit
    with pytest.raises(SystemExit, match="does not fit this --model/--defense/--dataset"):
        attack.load_weights(plain, weights)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="junk.pt: cannot read a state dict"):
        attack.load_weights(plain, tmp_path / "junk.pt")

    code = attack.main(
        ["--dataset", "mnist", "--model", "convnet", "--defense", "precode-early",
         "--weights", str(weights), "--attack", "labels", "--images", "1",
         "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["defense"] == "precode-early" and row["attack"] == "labels"


def test_model_defense_flags_are_declared_on_defense_params() -> None:
    """The attack CLI's defense flags are the model defenses' DefenseParams fields, with
    their declared help, default and bounds (no copy of them here)."""
    from precode_flower import settings
    from precode_flower.defenses import DEFENSES, DefenseParams

    read = {p for d in DEFENSES.values() if d.model is not None for p in d.params}
    assert set(attack.MODEL_DEFENSE_PARAMS) == read and "latent_dim" in read
    actions = {a.dest: a for a in attack.build_parser()._actions}
    for f, spec in settings.specs(DefenseParams):
        if f.name not in read:  # update defenses: this tool sends no update
            assert f.name not in actions
            continue
        assert actions[f.name].help == settings.describe(spec)
        assert actions[f.name].default == f.default
    args = attack.build_parser().parse_args(["--latent-dim", "8", "--beta", "0.5"])
    assert settings.from_namespace(DefenseParams, args) == DefenseParams(latent_dim=8, beta=0.5)
    with pytest.raises(SystemExit):
        attack.build_parser().parse_args(["--beta", "-1"])
