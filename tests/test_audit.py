"""LeakageAuditor without Flower: leaks found and scored, failures logged, budgets enforced."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from precode_flower import extend, models
from precode_flower.attacks import ATTACKS, AttackResult, register
from precode_flower.audit import AuditJob, LeakageAuditor, summarize, verdicts
from precode_flower.training import compute_gradients

SHAPE = (1, 8, 8)
MEAN, STD = (0.5,), (0.25,)


# Attacks that misbehave on purpose. Worker processes import this module to find them
# (the auditor sends each attack's module name along), so they must be module-level.
if "test-boom" not in ATTACKS:

    @register("test-boom")
    def _boom(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        raise RuntimeError("boom from a broken attack")

    @register("test-sleep")
    def _sleep(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        time.sleep(60)
        raise AssertionError("not reached")

    @register("test-crash")
    def _crash(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        os._exit(3)  # like an out-of-memory kill: the worker vanishes


def make_model(precode: bool = False) -> torch.nn.Module:
    """Module-level factory (picklable): a small MLP, fixed initialisation."""
    torch.manual_seed(0)
    model = models.mlp(4, SHAPE, width=64)
    return extend(model, latent_dim=16) if precode else model


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x01 = torch.rand(n, *SHAPE, generator=gen)
    return (x01 - MEAN[0]) / STD[0], torch.randint(0, 4, (n,), generator=gen)


def job(
    round: int, client: int, *, truth: bool = True, precode: bool = False, weights: bool = False
) -> AuditJob:
    model = make_model(precode)
    x, y = data(1, seed=10 * round + client)
    grads, _ = compute_gradients(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    lr = 0.1
    update = {n: -lr * g if weights else g for n, g in zip(names, grads, strict=True)}
    return AuditJob(
        round=round,
        client=client,
        model=make_model if not precode else model,
        update=update,
        kind="weights" if weights else "gradients",
        input_shape=SHAPE,
        mean=MEAN,
        std=STD,
        batch_size=1,
        lr=lr,
        global_state=model.state_dict(),
        ground_truth=(x, y) if truth else None,
        defense="precode" if precode else "none",
    )


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "leakage.jsonl").read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attacks": ["analytic", "nope"]}, "unknown attack 'nope'"),
        ({"attacks": []}, "no attack"),
        ({"iterations": 0}, "iterations"),
        ({"every": 0}, "every"),
        ({"time_limit": -1}, "time_limit"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"max_pending": 0}, "max_pending"),
        ({"success_ssim": 1.5}, "success_ssim"),
    ],
)
def test_senseless_configuration_fails_at_start(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"attacks": ["analytic"], **kwargs}
    with pytest.raises(ValueError, match=message):
        LeakageAuditor(tmp_path, **args)
    assert not (tmp_path / "leakage.jsonl").exists()  # nothing started, nothing written


def test_analytic_leak_is_scored_and_private(tmp_path: Path) -> None:
    auditor = LeakageAuditor(tmp_path, ["analytic", "labels"], clients_per_round=2, seed=1)
    picked = auditor.sample_clients(1, [0, 1, 2, 3])
    assert len(picked) == 2 and picked == auditor.sample_clients(1, [3, 2, 1, 0])
    assert auditor.should_audit(1) and auditor.every == 1
    jobs = [job(1, 0), job(1, 1, weights=True), job(2, 0, precode=True)]
    assert auditor.submit_many(jobs) == [True, True, True]
    assert auditor.wait(120)
    assert auditor.round_line(1).startswith("leak: analytic 2/2 ssim 1.00")
    summary = auditor.close()

    rows = read_rows(tmp_path)
    assert len(rows) == 6 and all(r["status"] == "ok" and r["scored"] for r in rows)
    analytic = [r for r in rows if r["attack"] == "analytic"]
    for r in analytic:
        assert r["success"] and r["ssim"] > 0.99 and r["label_accuracy"] == 1.0
        assert r["psnr"] is None or r["psnr"] > 100  # None: exact (infinite PSNR)
    weights_row = next(r for r in analytic if r["kind"] == "weights")
    assert weights_row["pseudo_gradient"] is True
    assert "LEAK: analytic reconstructed 2/2 audited images" in summary
    assert "despite defense precode" in summary and "with no defense" in summary
    assert (tmp_path / "leakage_summary.md").read_text() == summary

    recon = tmp_path / "reconstructions"
    assert mode(recon) == 0o700
    files = list(recon.iterdir())
    assert {"round0001.png", "round0002.png"} <= {f.name for f in files}
    assert all(mode(f) == 0o600 for f in files)
    assert mode(tmp_path / "leakage.jsonl") == 0o600
    assert str(recon) in summary
    assert (tmp_path / "leakage.png").exists()


def test_failures_are_logged_and_the_audit_goes_on(tmp_path: Path) -> None:
    auditor = LeakageAuditor(
        tmp_path,
        ["test-boom", "test-crash", "test-sleep", "analytic"],
        time_limit=3,
        max_pending=1,
        progress=False,
    )
    accepted = auditor.submit_many([job(1, 0), job(1, 1)])
    assert accepted == [True, False] and auditor.dropped == 1
    assert auditor.wait(90)
    assert auditor.submit(job(2, 0))  # workers were replaced: the audit still runs
    auditor.close(90)

    rows = {(r["round"], r["client"], r["attack"]): r for r in read_rows(tmp_path)}
    assert len(rows) == 12
    assert rows[1, 0, "test-boom"]["status"] == "error"
    assert "boom from a broken attack" in rows[1, 0, "test-boom"]["error"]
    assert rows[1, 0, "test-crash"]["status"] == "error"
    assert "died" in rows[1, 0, "test-crash"]["error"]
    assert rows[1, 0, "test-sleep"]["status"] == "timeout"
    assert 3 <= rows[1, 0, "test-sleep"]["seconds"] < 20
    assert all(rows[1, 1, a]["status"] == "dropped" for a in auditor.attacks)
    assert rows[1, 0, "analytic"]["success"] and rows[2, 0, "analytic"]["success"]
    summary = (tmp_path / "leakage_summary.md").read_text()
    assert "## Failures" in summary and "1 job(s) dropped" in summary


def test_close_abandons_work_past_its_limit(tmp_path: Path) -> None:
    auditor = LeakageAuditor(tmp_path, ["test-sleep"], progress=False)
    auditor.submit_many([job(1, 0), job(1, 1)])
    start = time.monotonic()
    auditor.close(timeout=2)
    assert time.monotonic() - start < 20
    rows = read_rows(tmp_path)
    assert [r["status"] for r in rows] == ["dropped", "dropped"]
    assert all("abandoned" in r["error"] for r in rows) and auditor.abandoned == 2
    assert not auditor.submit(job(2, 0))  # closed: dropped, not queued


def test_deployment_reports_evidence_without_scores(tmp_path: Path) -> None:
    auditor = LeakageAuditor(tmp_path, ["analytic"], progress=False, print_summary=False)
    auditor.submit(job(1, 0, truth=False))
    auditor.close(60)
    # A resumed run continues leakage.jsonl; its summary covers both parts.
    auditor = LeakageAuditor(
        tmp_path, ["analytic"], progress=False, print_summary=False, append=True
    )
    auditor.submit(job(2, 1, truth=False))
    summary = auditor.close(60)
    rows = read_rows(tmp_path)
    assert [(r["round"], r["client"]) for r in rows] == [(1, 0), (2, 1)]
    assert all(r["status"] == "ok" and r["scored"] is False and "ssim" not in r for r in rows)
    assert all(r["recovered"] == 1 and r["labels"] is not None for r in rows)
    assert "SCORES UNAVAILABLE" in summary and "claims exact recovery of 2/2" in summary
    assert {"round0001.png", "round0002.png"} <= {
        p.name for p in (tmp_path / "reconstructions").iterdir()
    }


def _row(attack: str, ssim: float, defense: str = "precode", **extra: object) -> dict:
    return {
        "round": 1,
        "client": 0,
        "attack": attack,
        "defense": defense,
        "batch_size": 1,
        "status": "ok",
        "scored": True,
        "ssim": ssim,
        "psnr": 20.0,
        "success": ssim >= 0.6,
        **extra,
    }


def test_verdicts_tell_the_truth() -> None:
    leak = verdicts([_row("analytic", 1.0), _row("ig", 0.1)], ["analytic", "ig"])
    assert leak == [
        "LEAK: analytic reconstructed 1/1 audited images (SSIM 1.00) despite defense precode."
    ]
    none = verdicts([_row("ig", 0.2, defense="none")], ["ig"])[0]
    assert none.startswith("NO LEAK FOUND with no defense") and "not a guarantee" in none
    failed = [{**_row("ig", 0.0), "status": "timeout", "scored": False}]
    assert verdicts(failed, ["ig"])[0].startswith("NO EVIDENCE under defense precode")
    text = summarize([_row("ig", 0.2)], ["ig"]).lower()
    assert "safe" not in text and "never a proof of privacy" in text


def test_a_re_identified_reconstruction_is_a_possible_leak_under_the_ssim_bar() -> None:
    linked = {"linked": 2, "per_image": {"linked": [True, True]}, "references": 99, "classes": 10}
    rows = [_row("ig", 0.45, batch_size=2, **linked)]
    line = verdicts(rows, ["ig"])[0]
    assert line.startswith("POSSIBLE LEAK: ig reconstructed no image to SSIM 0.60 (mean 0.45)")
    assert "look at them" in line
    assert "re-identified 2/2 of them among 99 other images (chance 1 in 100; about 1 in 11" in line
    # With 100 classes the class alone links about half: 2/2 is needed, 1/2 is not enough.
    many = {**linked, "classes": 100, "linked": 1, "per_image": {"linked": [True, False]}}
    assert verdicts([_row("ig", 0.45, batch_size=2, **many)], ["ig"])[0].startswith("NO LEAK")
    # One link in four is not claimed as a leak (the bar is half), nor is a row without the test.
    weak = {
        "linked": 1,
        "per_image": {"linked": [True, False, False, False]},
        "references": 99,
        "classes": 10,
    }
    assert verdicts([_row("ig", 0.1, batch_size=4, **weak)], ["ig"])[0].startswith("NO LEAK")
    assert verdicts([_row("ig", 0.45)], ["ig"])[0].startswith("NO LEAK")
    assert "| 2/2 |" in summarize(rows, ["ig"])
    both = verdicts([_row("ig", 0.8, **{**linked, "batch_size": 2})], ["ig"])[0]
    assert both.startswith(
        "LEAK: ig reconstructed 2/2 audited images (SSIM 0.80; 2/2 re-identified)"
    )


def test_the_auditor_links_reconstructions_against_a_reference_pool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="references"):
        LeakageAuditor(tmp_path / "bad", ["analytic"], references=torch.zeros(3, 8))
    pool = data(20, seed=99)[0]  # no client example is among them
    auditor = LeakageAuditor(tmp_path, ["analytic"], references=pool)
    assert auditor.submit_many([job(1, 0)]) == [True]
    assert auditor.wait(120)
    auditor.close()
    (row,) = read_rows(tmp_path)
    assert row["linked"] == 1 and row["per_image"]["linked"] == [True] and row["references"] == 20
    assert row["classes"] == 4
