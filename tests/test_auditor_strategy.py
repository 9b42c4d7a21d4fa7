"""The auditor as Flower glue: same aggregation, leaks found in real runs, failures contained."""

from __future__ import annotations

import json
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from precode_flower import task
from precode_flower.attacks import ATTACKS, AttackResult, register
from precode_flower.audit import LeakageAuditor
from precode_flower.clients.client_app import app as client_app
from precode_flower.strategies import aggregate_metrics
from precode_flower.strategies.auditor import AuditObserver, Auditor

ROOT = Path(__file__).resolve().parents[1]

if "test-raise" not in ATTACKS:  # worker processes import this module to find it

    @register("test-raise")
    def _raise(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        raise RuntimeError("deliberately broken attack")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "leakage.jsonl").read_text().splitlines()]


def _start(strategy, grid, cfg: task.RunConfig):  # noqa: ANN001, ANN202
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.initial_state(cfg, 10, (3, 32, 32))),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord(cfg.to_config()),
        evaluate_config=ConfigRecord(cfg.to_config()),
    )


def _fedavg() -> FedAvg:
    return FedAvg(
        min_available_nodes=3,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )


def test_wrapping_flowers_fedavg_changes_nothing_it_aggregates(
    tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    # One local step on one example: the pseudo-gradient is exact, so analytic must leak.
    cfg = task.RunConfig(
        mode="fedavg", batch_size=1, local_steps=1, rounds=2, clients=3, audit_ground_truth=True
    )
    plain = _start(_fedavg(), inprocess_grid(client_app, 3), cfg)
    audited = Auditor(
        _fedavg(), ["analytic"], clients=2, out_dir=tmp_path, ground_truth=True, progress=False
    )
    result = _start(audited, inprocess_grid(client_app, 3), cfg)
    audited.close()

    assert list(result.arrays) == list(plain.arrays)
    for key in plain.arrays:
        assert result.arrays[key].numpy().tobytes() == plain.arrays[key].numpy().tobytes(), key
    rows = _rows(tmp_path)
    assert sorted(r["round"] for r in rows) == [1, 1, 2, 2]  # 2 of 3 clients per round
    assert all(r["kind"] == "weights" and r["pseudo_gradient"] for r in rows)
    assert all(r["status"] == "ok" and r["success"] and r["psnr"] > 100 for r in rows)
    assert "LEAK: analytic reconstructed 4/4 audited images" in audited.audit.summary


def test_a_broken_attack_is_logged_and_training_is_unaffected(
    tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    from server import run_federation

    cfg = task.RunConfig(mode="fedsgd", batch_size=1, rounds=2, clients=3, audit_ground_truth=True)
    plain = run_federation(inprocess_grid(client_app, 3), cfg, tmp_path / "plain", progress=False)
    observer = AuditObserver(
        LeakageAuditor(tmp_path / "audited", ["test-raise", "analytic"], progress=False),
        ground_truth=True,
    )
    audited = run_federation(
        inprocess_grid(client_app, 3),
        cfg,
        tmp_path / "audited",
        observers=[observer],
        progress=False,
    )

    assert audited["final_test_accuracy"] == plain["final_test_accuracy"]
    before = torch.load(tmp_path / "plain" / "model.pt")
    after = torch.load(tmp_path / "audited" / "model.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = _rows(tmp_path / "audited")
    assert len(rows) == 2 * 3 * 2  # rounds x clients x attacks
    broken = [r for r in rows if r["attack"] == "test-raise"]
    assert all(r["status"] == "error" and "deliberately broken" in r["error"] for r in broken)
    assert all(r["success"] for r in rows if r["attack"] == "analytic")


def test_unknown_attack_or_senseless_budget_fails_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import simulate

    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        Auditor(FedAvg(), ["analytic", "nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="iterations"):
        Auditor(FedAvg(), ["ig"], iterations=0, out_dir=tmp_path)
    for flags, message in (
        (["--audit", "analytic,nope"], "unknown attack 'nope'; choose from: analytic"),
        (["--audit", "ig", "--audit-iterations", "0"], "expected a positive number"),
        (["--audit", "ig", "--audit-time-limit", "-5"], "expected a positive number"),
        (["--audit", "ig", "--audit-every", "0"], "expected a positive number"),
        (["--audit-ground-truth", "--no-audit-ground-truth"], "contradict"),
    ):
        with pytest.raises(SystemExit) as exit_:
            simulate.main([*flags, "--out", str(tmp_path / "x")])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # nothing started


def _simulate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--clients", "3", "--rounds", "2", "--mode", "fedsgd", "--batch-size", "1"]
    args += ["--model", "mlp", "--audit", "analytic", "--audit-clients", "3", "--no-progress"]
    run = subprocess.run(
        [sys.executable, "simulate.py", *args, *extra, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["none", "precode"])
def test_simulation_reports_the_analytic_leak(tmp_path: Path, defense: str) -> None:
    out = tmp_path / "run"
    run = _simulate(out, *(["--defense", defense] if defense != "none" else []))
    rows = _rows(out)
    assert sorted((r["round"], r["client"]) for r in rows) == [
        (rnd, c) for rnd in (1, 2) for c in (0, 1, 2)
    ]
    assert all(r["status"] == "ok" and r["scored"] and r["psnr"] > 100 for r in rows)
    assert all(r["success"] and r["label_accuracy"] == 1.0 for r in rows)
    expected = "with no defense" if defense == "none" else "despite defense precode"
    # simulate.py tests re-identification against 99 test images: exact images pass it.
    leak = "LEAK: analytic reconstructed 6/6 audited images (SSIM 1.00; 6/6 re-identified)"
    assert f"{leak} {expected}" in run.stdout
    # The round lines: round 1's result shows on round 1's line, or on round 2's as "leak r1:"
    # when the attack finished after round 1 ended; if the attacks are slower than both
    # rounds, the last line says they are pending (and the summary above has the result).
    rounds = [line for line in run.stdout.splitlines() if line.startswith("round ")]
    assert re.search(r"leak( r1)?: analytic 3/3 ssim 1\.00", "\n".join(rounds)) or (
        rounds[-1].endswith("| audit pending: r1, r2")
    )
    recon = out / "reconstructions"
    assert stat.S_IMODE(recon.stat().st_mode) == 0o700
    private = [*recon.iterdir(), out / "leakage.jsonl"]
    assert {p.name for p in private} >= {"round0001.png", "round0002.png"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private)
    summary = (out / "leakage_summary.md").read_text()
    assert str(recon) in summary and np.isfinite(len(summary))
