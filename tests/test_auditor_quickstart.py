"""The auditor on a Flower app it knows nothing of, attached in three lines (issue 18)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import quickstart_app as qs
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from precode_flower.local_training import unrolled_update
from precode_flower.model_source import model_factory
from precode_flower.strategies import Auditor, LocalTraining

REPO = Path(__file__).resolve().parents[1]
LOCAL = LocalTraining(batch_size=qs.BATCH_SIZE, epochs=1, lr=qs.LR, momentum=qs.MOMENTUM)


def _start(strategy, grid, rounds: int = 2):  # noqa: ANN001, ANN202
    random.seed(0)  # Flower samples nodes with `random`
    torch.manual_seed(0)
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(qs.Net().state_dict()),
        num_rounds=rounds,
        train_config=ConfigRecord({}),
    )


def _fedavg() -> FedAvg:
    return FedAvg(min_available_nodes=3, fraction_train=1.0, fraction_evaluate=1.0)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "leakage.jsonl").read_text().splitlines()]


def test_three_line_attach_on_a_quickstart_app(
    tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    plain = _start(_fedavg(), inprocess_grid(qs.app, 3))

    jobs = []
    # The three-line attach (plus a tiny budget and the ground-truth hook).
    strategy = Auditor(_fedavg(), model=qs.Net, input_shape=qs.SHAPE, mean=qs.MEAN, std=qs.STD,
                       local=LOCAL, attacks=["labels", "ig", "fedavg"],
                       ground_truth=qs.load_partition, clients=1, iterations=2, out_dir=tmp_path,
                       progress=False)  # fmt: skip
    submit = strategy.audit.auditor.submit_many
    strategy.audit.auditor.submit_many = lambda js: (jobs.extend(js), submit(js))[1]
    with strategy:
        result = _start(strategy, inprocess_grid(qs.app, 3))

    # Aggregation bit for bit unchanged.
    assert list(result.arrays) == list(plain.arrays)
    for key in plain.arrays:
        assert result.arrays[key].numpy().tobytes() == plain.arrays[key].numpy().tobytes(), key

    # The auditor modelled the clients' real training: 3 steps of 32, 32, 6 with momentum.
    assert len(jobs) == 2 and all(j.kind == "weights" for j in jobs)
    job = jobs[0]
    assert job.training.total_steps(qs.EXAMPLES) == 3 and job.assumed == ()
    model = qs.Net()
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in job.global_state.items()})
    x, y = qs.load_partition(int(job.client))
    order = qs.visit_order(int(job.client), job.round)
    ours = unrolled_update(model, x[order], y[order], job.training, create_graph=False)
    for name, value in ours.items():
        real = torch.as_tensor(np.asarray(job.update[name]))
        torch.testing.assert_close(value, real, rtol=1e-4, atol=1e-6, msg=name)

    rows = _rows(tmp_path)
    assert {(r["round"], r["attack"]) for r in rows} == {
        (rnd, a) for rnd in (1, 2) for a in ("labels", "ig", "fedavg")
    }
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    # Every row states the training the attack assumed, and that nothing was guessed.
    for r in rows:
        assert r["training"] == (
            "SGD lr 0.1 momentum 0.9, batch 32, 1 epoch(s) = 3 steps over 70 examples "
            "(last batch 6)"
        )
        assert r["assumed"] == []
    # Scores against the client's partition (ground_truth=partition_fn).
    for r in rows:
        assert r["scored"] and r["match_method"] in ("optimal", "nearest"), r
        assert r["partition_size"] == qs.EXAMPLES
    assert all(r["psnr"] is not None for r in rows if r["attack"] != "labels")
    labels = [r for r in rows if r["attack"] == "labels"]
    assert all(0 < r["label_baseline"] <= 1 and r["label_accuracy"] is not None for r in labels)
    summary = strategy.audit.summary
    assert "`SGD lr 0.1 momentum 0.9, batch 32, 1 epoch(s) = 3 steps over 70 examples " \
        "(last batch 6)` (2 update(s); as stated)" in summary  # fmt: skip
    assert "guessed" not in summary
    assert str(tmp_path.resolve()) in summary


def test_a_guessed_training_warns_once_and_the_verdict_says_assumed(
    tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    strategy = Auditor(_fedavg(), model="quickstart_app:Net", input_shape=qs.SHAPE,
                       attacks=["labels"], clients=1, out_dir=tmp_path, progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="local training is not fully known") as caught:
        with strategy:
            _start(strategy, inprocess_grid(qs.app, 3), rounds=1)
    assert sum("not fully known" in str(w.message) for w in caught) == 1
    rows = _rows(tmp_path)
    assert rows and all("batch_size" in r["assumed"] and "lr" in r["assumed"] for r in rows)
    assert "(assumed)" in rows[0]["training"]
    summary = strategy.audit.summary
    assert "The attacks on weight updates assumed the clients' training (batch_size" in summary
    # No ground truth given: the summary names that reason, not "deployment" in general.
    assert "no ground truth given to the auditor" in summary
    assert "returned (unverified)" in summary


def test_a_model_that_does_not_load_the_global_arrays_fails_at_start(
    tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    # The project's own MLP where the app's CNN runs: an error naming the cause, at start.
    strategy = Auditor(_fedavg(), attacks=["labels"], out_dir=tmp_path, progress=False)
    with strategy, pytest.raises(ValueError, match="does not load the global arrays.*model="):
        _start(strategy, inprocess_grid(qs.app, 3), rounds=1)
    # An attack that cannot apply to the CNN (no Linear sees the image): at start, with why.
    strategy = Auditor(_fedavg(), model=qs.Net, input_shape=qs.SHAPE, local=LOCAL,
                       attacks=["analytic", "ig"], out_dir=tmp_path / "b",
                       progress=False)  # fmt: skip
    with strategy, pytest.raises(ValueError, match="analytic: analytic attack does not apply"):
        _start(strategy, inprocess_grid(qs.app, 3), rounds=1)


def _build_in_worker(factory) -> int:  # noqa: ANN001
    return sum(p.numel() for p in factory().parameters())


def test_every_model_form_builds_in_a_spawned_worker() -> None:
    def local_factory() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3))

    class LocalNet(torch.nn.Module):  # not importable: sent by value
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

    forms = [qs.Net, "quickstart_app:Net", qs.Net(), local_factory, LocalNet, LocalNet(),
             lambda: torch.nn.Linear(2, 2)]  # fmt: skip
    factories = [model_factory(f) for f in forms]
    with mp.get_context("spawn").Pool(1) as pool:
        sizes = pool.map(_build_in_worker, factories)
    net = sum(p.numel() for p in qs.Net().parameters())
    assert sizes == [net, net, net, 15, 10, 10, 6]
    for bad, message in (("nomodule_xyz:Net", "cannot import"), ("quickstart_app:Nope", "no "),
                         ("no-colon", "expected"), (42, "expected a class")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=message):
            model_factory(bad)


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from flwr.serverapp.strategy import FedAvg
import quickstart_app as qs
from precode_flower.strategies import Auditor
strategy = Auditor(FedAvg(), model=qs.Net, input_shape=qs.SHAPE, attacks=["labels"],
                   out_dir={out!r}, progress=False)
{body}
"""


def _script(tmp_path: Path, body: str, guard: bool) -> subprocess.CompletedProcess:
    text = SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path / "audit"), body=body)
    if guard:
        text = "if __name__ == '__main__':\n" + textwrap.indent(text, "    ")
    path = tmp_path / "app.py"
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)  # fmt: skip


def test_a_missing_close_warns_and_the_audit_is_still_written(tmp_path: Path) -> None:
    run = _script(tmp_path, "print('done')", guard=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Auditor was never closed" in run.stderr
    assert (tmp_path / "audit" / "leakage_summary.md").exists()


def test_a_worker_that_cannot_start_is_reported_within_seconds(tmp_path: Path) -> None:
    # No __main__ guard: the spawned worker re-runs the script and dies while bootstrapping.
    body = "t = time.monotonic()\nstrategy.audit.auditor.wait_workers(60)\n" \
           "print('reported after', time.monotonic() - t)\nstrategy.close()"  # fmt: skip
    run = _script(tmp_path, body, guard=False)
    assert "worker process failed to start" in run.stderr, run.stderr[-3000:]
    # Reported as soon as the worker died (seconds: its imports), not at a 600 s close.
    waited = float(run.stdout.split("reported after")[1].split()[0])
    assert waited < 60, waited
    assert "__main__" in run.stderr  # the hint: guard the script
    summary = (tmp_path / "audit" / "leakage_summary.md").read_text()
    assert "worker process failed to start" in summary


@pytest.mark.slow
def test_the_quickstart_benchmark_smoke_run(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/auditor_quickstart.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "auditor_quickstart.json").read_text())
    stated, guessed = result["stated"], result["guessed"]
    assert all(r["status"] == "ok" for s in (stated, guessed) for r in s["attacks"].values())
    # The stated training replays the real update; the guess is one full-batch step.
    assert stated["closeness"]["cosine"] > 0.9999
    assert abs(stated["closeness"]["norm_ratio"] - 1) < 1e-3
    assert "(assumed)" in guessed["closeness"]["training"]
    assert guessed["attacks"]["fedavg"]["assumed"] and not stated["attacks"]["fedavg"]["assumed"]
    assert "| stated | fedavg | ok |" in run.stdout
