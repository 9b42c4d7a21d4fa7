"""The defense-comparison runner (benchmarks/defenses.py): grid, hashes, tables, a real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import defenses as runner  # noqa: E402  (benchmarks/defenses.py)


def _exp(**changes) -> runner.Experiment:
    base = runner.Experiment("mnist", "mlp", "none", "fedsgd", 1, runner.PROFILES["quick"].budget)
    return replace(base, **changes)


def test_key_is_stable_and_covers_the_settings() -> None:
    a = _exp()
    assert a.key() == _exp().key()
    assert len({a.key(), _exp(defense="precode").key(), _exp(batch_size=8).key()}) == 3
    more_rounds = replace(a.budget, rounds=a.budget.rounds + 1)
    assert _exp(budget=more_rounds).key() != a.key()
    # FedAvg-only settings do not split FedSGD configurations.
    assert _exp(budget=replace(a.budget, lr=0.5)).key() == a.key()


def test_attacks_follow_the_configuration() -> None:
    assert _exp().attacks() == ("analytic", "ig")
    assert _exp(defense="precode").attacks() == ("analytic", "ig", "ignore-bottleneck")
    assert _exp(model="convnet").attacks() == ("ig",)
    assert _exp(model="convnet", defense="precode-early", mode="fedavg").attacks() == (
        "ig",
        "ignore-bottleneck",
        "fedavg",
    )


def test_a_filter_picks_registry_attacks_where_they_apply() -> None:
    every = replace(_exp().budget, attack_filter=runner._attack_filter("all"))
    mlp = _exp(budget=every).attacks()
    assert mlp[:2] == ("analytic", "ig") and "fedavg" not in mlp  # FedSGD: no weight attack
    assert {"dlg", "labels", "label-counts", "spear", "cocktail"} <= set(mlp)
    assert "ignore-bottleneck" not in mlp  # no PRECODE bottleneck
    cnn = _exp(model="convnet", defense="precode-early", mode="fedavg", budget=every).attacks()
    assert {"ig", "ignore-bottleneck", "fedavg", "dlg", "label-counts"} <= set(cnn)
    assert not {"analytic", "spear", "cocktail"} & set(cnn)  # no Linear layer on the image
    # A filter's order is not the hash's: the same attacks give the same configuration.
    a = replace(_exp().budget, attack_filter=runner._attack_filter("dlg,ig"))
    b = replace(_exp().budget, attack_filter=runner._attack_filter("ig,dlg"))
    assert _exp(budget=a).attacks() == ("ig", "dlg")
    assert _exp(budget=a).key() == _exp(budget=b).key()
    # Filtering to the default attacks keeps the configurations' hashes.
    default = replace(_exp().budget, attack_filter=runner.DEFAULT_ATTACKS)
    assert _exp(defense="precode", budget=default).key() == _exp(defense="precode").key()
    with pytest.raises(Exception, match="not in"):
        runner._attack_filter("ig,no-such-attack")


def test_label_attacks_get_a_label_cell_and_never_break_a_configuration() -> None:
    rows = [
        {"attack": "label-counts", "status": "ok", "scored": True, "success": False,
         "ssim": 0.0, "psnr": 5.0, "label_accuracy": 1.0, "label_baseline": 0.5},
        {"attack": "label-counts", "status": "ok", "scored": True, "success": False,
         "ssim": 0.0, "psnr": 5.0, "label_accuracy": 0.5, "label_baseline": 0.25},
    ]  # fmt: skip
    stats = runner.attack_stats(rows, "label-counts")
    assert stats["success_rate"] is None and stats["ssim"] is None
    assert stats["label_accuracy"] == 0.75 and stats["label_baseline"] == 0.375
    result = _result("none", [0.1, 0.5], {"ig": _stats(0.0), "label-counts": stats})
    lines, points = runner.group_table(("mnist", "mlp", "fedsgd", 8), [result])
    assert "| labels 0.75 (even guess 0.38) over 2 |" in lines[2]
    assert lines[2].endswith("| none |") and points[0]["attack"] == "ig"


def test_grid_filters_and_model_restrictions() -> None:
    quick = runner.PROFILES["quick"]
    exps = runner.grid(quick)
    assert [(e.dataset, e.model, e.defense, e.mode, e.batch_size) for e in exps] == list(
        quick.cells
    )
    exps = runner.grid(quick, datasets=["mnist"], defenses=["none", "precode-early"])
    assert {(e.model, e.defense) for e in exps} == {
        ("mlp", "none"),
        ("convnet", "none"),
        ("convnet", "precode-early"),  # no (mlp, precode-early): the preset needs a CNN
    }
    assert {(e.mode, e.batch_size) for e in exps} == set(quick.settings)


def test_simulate_args_carry_the_defense_parameters(tmp_path) -> None:
    args = _exp(defense="noise-1e-2+prune-90", mode="fedavg").simulate_args(tmp_path, "cpu")
    flat = " ".join(args)
    assert "--defense noise,prune" in flat and "--sigma 0.01" in flat
    assert "--prune-rate 0.9" in flat and "--local-steps" in flat
    assert "--audit analytic,ig,fedavg" in flat


def _result(defense: str, acc: list[float], attacks: dict) -> dict:
    exp = _exp(defense=defense)
    return {
        "key": exp.key(),
        "config": exp.settings(),
        "initial_accuracy": 0.1,
        "final_accuracy": acc[-1],
        "accuracy": acc,
        "round_seconds": [5.0] * len(acc),
        "seconds_per_round": 5.0,
        "attacks": attacks,
        "audited": [[1, "0"]],
    }


def _stats(rate: float | None, psnr: float = 10.0, ssim: float = 0.1) -> dict:
    return {
        "runs": 2,
        "scored": 0 if rate is None else 2,
        "failed": {"error": 0, "timeout": 0, "dropped": 0},
        "success_rate": rate,
        "psnr": psnr,
        "ssim": ssim,
    }


def test_group_table_rows_deltas_and_target() -> None:
    results = [
        _result("none", [0.5, 0.8], {"analytic": _stats(1.0, 200.0, 1.0), "ig": _stats(0.5)}),
        _result("precode", [0.3, 0.75], {"analytic": _stats(1.0, 200.0, 1.0), "ig": _stats(0.0)}),
    ]
    lines, points = runner.group_table(("mnist", "mlp", "fedsgd", 1), results)
    head, _, none, precode = lines
    assert head.count("|") == none.count("|") == precode.count("|")
    assert "| none | 0.800 | +0.0 | - | 2 / 10 |" in none  # - : no epsilon without DP
    # Target: 0.1 + 0.9 * (0.8 - 0.1) = 0.73, reached in round 2 (after 10 s).
    assert "| precode | 0.750 | -5.0 | - | 2 / 10 |" in precode
    assert "2/2 · 200.0 · 1.00" in none and none.endswith("| analytic, ig |")
    assert precode.endswith("| analytic |")
    assert points[1] == {
        "panel": "mnist mlp fedsgd B=1",
        "label": "precode",
        "accuracy": 0.75,
        "success": 1.0,
        "psnr": 200.0,
        "attack": "analytic",
        "epsilon": None,
    }


def test_dp_and_secagg_presets_enter_the_grid_with_their_epsilon() -> None:
    exps = runner.grid(
        runner.PROFILES["quick"],
        datasets=["mnist"],
        defenses=["dp-server", "dp-precode-early", "dp-secagg", "precode-early-secagg"],
    )
    cells = {(e.model, e.defense, e.mode) for e in exps}
    # DP needs FedAvg weight replies; precode-early a CNN.
    assert ("mlp", "dp-server", "fedavg") in cells and ("mlp", "dp-server", "fedsgd") not in cells
    assert ("convnet", "dp-precode-early", "fedavg") in cells
    assert not any(d == "precode-early-secagg" and m == "mlp" for m, d, _ in cells)
    dp = next(e for e in exps if e.defense == "dp-secagg")
    args = dp.simulate_args(Path("/tmp/x"), "cpu")
    assert args[args.index("--defense") + 1] == "dp-secagg"
    assert args[args.index("--dp-noise") + 1] == "1.0"
    assert dp.settings()["dp_noise"] == 1.0
    assert "dp_noise" not in _exp().settings()  # other configurations keep their hashes
    result = _result("dp-server", [0.5, 0.7], {"ig": _stats(0.0)})
    result["epsilon"] = 12.5
    lines, points = runner.group_table(("mnist", "mlp", "fedavg", 1), [result])
    assert "| dp-server | 0.700 | - | 12.5 |" in lines[2] and points[0]["epsilon"] == 12.5


def test_a_run_that_stopped_training_says_so_in_its_row() -> None:
    rounds = [{"skipped": None, "non_finite": 0}] + [
        {"skipped": "only 0 valid replies, at least 1 needed", "non_finite": 4}
    ] * 2
    health = runner.round_health(rounds)
    assert health == {"skipped_rounds": 2, "non_finite_replies": 8}
    result = {**_result("dp-server", [0.07, 0.07, 0.07], {}), **health}
    lines, _ = runner.group_table(("mnist", "mlp", "fedavg", 1), [result])
    assert "| 0.070 (2/3 rounds skipped: 8 non-finite replies) |" in lines[2]


def test_linkage_counts_reconstructions_that_re_identify_their_originals(tmp_path) -> None:
    import torch

    from precode_flower import data

    train = data.load("mnist").train.tensors[0]
    truth, foreign = train[:2], train[100:102]
    result = _result("none", [0.1, 0.5], {"ig": _stats(0.0), "dlg": _stats(0.0)})
    result["attacks"]["label-counts"] = {**_stats(None), "images": False}
    recon = tmp_path / result["key"] / "run" / "reconstructions"
    recon.mkdir(parents=True)
    torch.save(truth, recon / "round0001_client0_original.pt")
    # Blurred and dimmed, in swapped order (the matching undoes it): still linked.
    blurred = torch.nn.functional.avg_pool2d(truth, 3, stride=1, padding=1) * 0.5
    torch.save(blurred.flip(0), recon / "round0001_client0_ig.pt")
    torch.save(foreign, recon / "round0001_client0_dlg.pt")
    torch.save(torch.zeros_like(truth), recon / "round0001_client0_label-counts.pt")
    linked = runner.linkage(result, tmp_path)
    assert linked == {"ig": [2, 2], "dlg": [0, 2]}  # label attacks' placeholders are not images
    lines, _ = runner.group_table(("mnist", "mlp", "fedsgd", 1), [{**result, "linked": linked}])
    assert lines[0].endswith("| broken by | linked by |")
    assert "· linked 2/2 |" in lines[2] and lines[2].endswith("| none | ig |")
    assert runner.linked_verdict({**result, "linked": {"ig": [1, 4]}}) == "none"
    # CIFAR-100: about one same-class image in the pool, so the class alone links half.
    hundred = {**result, "config": {**result["config"], "dataset": "cifar100"}}
    assert runner.linked_verdict({**hundred, "linked": {"ig": [3, 4]}}) == "none"
    assert runner.linked_verdict({**hundred, "linked": {"ig": [4, 4]}}) == "ig"


def test_no_target_when_the_undefended_run_did_not_learn() -> None:
    results = [_result("none", [0.1, 0.12], {}), _result("precode", [0.1, 0.2], {})]
    lines, points = runner.group_table(("mnist", "convnet", "fedsgd", 1), results)
    assert "| none | 0.120 | +0.0 | - |" in lines[2]
    # No attack columns at all when nothing was audited (not an empty one).
    assert lines[0].endswith("| s per round | broken by |") and "|  |" not in "".join(lines)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[3].endswith("| not audited |") and points[1]["success"] is None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/defenses.py", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quick_one_config_runs_writes_a_table_and_resumes(tmp_path, flower_env) -> None:
    """The smallest budget on a 1-configuration grid; then a second invocation skips it."""
    args = [
        "--quick",
        "--datasets", "mnist",
        "--models", "mlp",
        "--defenses", "precode",
        "--settings", "fedsgd:1",
        "--clients", "2",
        "--rounds", "1",
        "--audit-iterations", "1",
        "--results-dir", str(tmp_path / "results"),
        "--doc", str(tmp_path / "RESULTS.md"),
    ]  # fmt: skip
    first = _run(args, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "running" in first.stdout
    done = list((tmp_path / "results").glob("*/result.json"))
    assert len(done) == 1
    result = json.loads(done[0].read_text())
    assert result["config"]["defense"] == "precode" and result["config"]["rounds"] == 1
    assert set(result["attacks"]) == {"analytic", "ig", "ignore-bottleneck"}
    # The analytic attack recovers a batch-1 MLP input exactly, PRECODE or not.
    assert result["attacks"]["analytic"]["success_rate"] == 1.0
    assert 0.0 <= result["final_accuracy"] <= 1.0

    doc = (tmp_path / "RESULTS.md").read_text()
    assert "## Generated results" in doc and "Command: `python benchmarks/defenses.py" in doc
    table = [line for line in doc.splitlines() if line.startswith("|")]
    head, rule, row = table
    assert head.startswith("| defense | final acc.") and re.fullmatch(r"\|(---\|)+", rule)
    assert row.startswith("| precode | ") and row.count("|") == head.count("|")
    assert (tmp_path / "results_privacy_utility.png").stat().st_size > 0
    mtime = done[0].stat().st_mtime_ns

    second = _run(args, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "done earlier, skipped" in second.stdout and "running" not in second.stdout
    assert done[0].stat().st_mtime_ns == mtime
    assert "| precode | " in (tmp_path / "RESULTS.md").read_text()
