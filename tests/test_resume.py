"""Checkpoint and resume: an interrupted-then-resumed run ends bit for bit where an
uninterrupted one does; corrupted or foreign checkpoints are refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import simulate
from precode_flower import task
from precode_flower.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from precode_flower.clients.client_app import app as client_app
from precode_flower.processes import session_pids, stop_sessions
from server import run_federation

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    # Server optimiser state (Adam's moments and step) and node sampling both matter.
    "fedsgd-adam": task.RunConfig(
        mode="fedsgd",
        clients=4,
        rounds=3,
        fraction=0.5,
        batch_size=8,
        server_optimizer="adam",
        server_lr=0.01,
    ),
    # FedAvg (no strategy state) is covered end to end by the Ray test below.
}


class Crash(Exception):
    """Stands for the server process dying mid-round."""


class CrashingGrid:
    """Forwards to ``grid`` until round ``crash_round``'s evaluation is sent, then raises:
    the server dies mid-round, after that round's training (and the previous round's
    checkpoint), before its own checkpoint."""

    def __init__(self, grid, crash_round: int) -> None:
        self.grid, self.crash_round = grid, crash_round

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        if any(
            m.metadata.message_type == "evaluate"
            and m.content["config"]["server-round"] == self.crash_round
            for m in messages
        ):
            raise Crash(f"killed in round {self.crash_round}")
        return self.grid.push_messages(messages)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_interrupted_then_resumed_equals_uninterrupted(
    name, tmp_path, inprocess_grid, reliability
) -> None:
    cfg = CONFIGS[name]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_federation(inprocess_grid(client_app, 4), cfg, whole, progress=False)

    with pytest.raises(Crash):
        run_federation(CrashingGrid(inprocess_grid(client_app, 4), 3), cfg, broken, progress=False)
    assert load_checkpoint(broken).round == 2
    # A row the crashed server wrote after its last checkpoint, and a line cut short.
    with (broken / "rounds.jsonl").open("a") as f:
        f.write(json.dumps({"round": 3, "clients": 99}) + "\n" + '{"round": 4, "cli')

    # A fresh grid: node state is gone, as after a restart of every process.
    run_federation(inprocess_grid(client_app, 4), cfg, broken, progress=False, resume=True)
    assert _same_bits(_model(whole), _model(broken))
    assert [r["round"] for r in _rows(broken)] == [1, 2, 3]
    assert _no_time(_rows(broken)) == _no_time(_rows(whole))
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["resumed_after"] == 2 and summary["rounds"] == 3
    assert load_checkpoint(broken).round == 3
    reliability(
        f"server crash mid-run ({name})",
        "in-process: the grid raises as round 3's evaluation is sent; then `resume=True` "
        "(`--resume DIR`) with fresh client state",
        "resumed after round 2 from checkpoint.pt; final model bit-for-bit equal to the "
        "uninterrupted run; rounds.jsonl rounds [1, 2, 3] (a stale round-3 row and a torn "
        "line dropped), rows equal to the uninterrupted run's",
    )


def _save_like(out: Path, cfg: task.RunConfig, **changes) -> None:
    """A checkpoint of ``cfg`` after round 1, with ``changes`` (e.g. another model)."""
    model = task.build_model(cfg, 10, (3, 32, 32), seed=cfg.seed).state_dict()
    fields = {"round": 1, "config": cfg.to_config(), "model": model, **changes}
    save_checkpoint(out, Checkpoint(**fields))


def _untouched(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.usefixtures("task_identity")
def test_bad_checkpoints_are_refused_and_nothing_is_loaded(
    tmp_path, inprocess_grid, reliability, capsys
) -> None:
    cfg = task.RunConfig(mode="fedavg", clients=2, rounds=2, local_steps=1)
    out = tmp_path / "run"
    _save_like(out, cfg)
    (out / "rounds.jsonl").write_text('{"round": 1}\n')
    path = out / CHECKPOINT_NAME
    data = path.read_bytes()
    cases = []

    # Truncated (a copy cut short, a full disk): unreadable.
    path.write_bytes(data[: len(data) // 2])
    before = _untouched(out)
    with pytest.raises(CheckpointError, match="corrupted or not a checkpoint") as err:
        run_federation(inprocess_grid(client_app, 2), cfg, out, progress=False, resume=True)
    assert _untouched(out) == before  # nothing written, nothing half-applied
    cases.append(("truncated checkpoint", "checkpoint.pt cut to half its size", err.value))
    # The CLI refuses it in one line, before Ray starts.
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--resume", str(out), "--clients", "2", "--rounds", "2"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "corrupted" in line and "--resume" in line

    # Another run's checkpoint: the settings that differ are named.
    path.write_bytes(data)
    other = task.RunConfig(mode="fedavg", clients=2, rounds=2, local_steps=1, lr=0.2)
    with pytest.raises(CheckpointError, match=r"lr: 0\.01 -> 0\.2") as err:
        run_federation(inprocess_grid(client_app, 2), other, out, progress=False, resume=True)
    cases.append(
        ("checkpoint of another config", "resume with `--lr 0.2` instead of 0.05", err.value)
    )

    # Same config, wrong shapes (e.g. edited or produced by other code).
    bad = task.build_model(cfg, 10, (3, 32, 32), seed=0).state_dict()
    first = next(iter(bad))
    bad[first] = bad[first][:-1].clone()
    _save_like(out, cfg, model=bad)
    with pytest.raises(CheckpointError, match="has shape") as err:
        run_federation(inprocess_grid(client_app, 2), cfg, out, progress=False, resume=True)
    cases.append(("checkpoint with wrong shapes", f"`{first}` saved one row short", err.value))

    # A flipped value that the zip container does not notice: the digest does.
    _save_like(out, cfg)
    raw = torch.load(path, weights_only=True)
    raw["model"][first].view(-1)[0] += 1.0
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="does not match its digest") as err:
        load_checkpoint(out, config=cfg.to_config())
    cases.append(("tampered checkpoint", "one model value changed, digest kept", err.value))

    # Arbitrary pickles are never executed: weights_only refuses them.
    torch.save({"format": "precode-flower-checkpoint", "evil": _Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        load_checkpoint(out)
    cases.append(("checkpoint with a pickled object", "a custom class saved inside", err.value))

    for fault, injection, error in cases:
        reliability(fault, injection, f"refused before anything is loaded: {error}")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_ray_simulation_killed_and_resumed_matches_an_uninterrupted_run(
    tmp_path, flower_env, inprocess_grid, reliability
) -> None:
    """SIGKILL of the whole simulation (driver and Ray) after round 1; then --resume."""
    out = tmp_path / "run"
    # One of two clients per round: the resumed run must sample the same partitions
    # although Flower gives the nodes new random ids in every simulation.
    flags = ["--clients", "2", "--fraction", "0.5", "--rounds", "3", "--local-steps", "1"]
    flags.append("--no-progress")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ray_tmp = ["--ray-temp-dir", str(flower_env / "ray" / "resume")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "simulate.py", *flags, "--out", str(out), *ray_tmp],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    killed_after = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                killed_after = load_checkpoint(out).round
                break
            except CheckpointError:
                time.sleep(0.2)
    finally:
        stop_sessions([proc.pid], grace=0, kill_wait=30)
        proc.wait(timeout=30)
        log.close()
    assert killed_after is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert not session_pids(proc.pid)

    resumed = subprocess.run(
        [sys.executable, "simulate.py", *flags, "--resume", str(out), *ray_tmp],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]

    # The same run uninterrupted, in-process (same client code, seeds and reply order).
    # The run's own config: simulate.py may point data-dir at its data (see config.json).
    cfg = task.RunConfig.from_mapping(json.loads((out / "config.json").read_text()))
    assert (cfg.clients, cfg.fraction, cfg.rounds, cfg.local_steps) == (2, 0.5, 3, 1)
    whole = tmp_path / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray actor, for the same float reductions
    try:
        run_federation(inprocess_grid(client_app, 2), cfg, whole, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _same_bits(_model(whole), _model(out))
    reliability(
        "simulation killed (SIGKILL of driver and Ray)",
        f"`simulate.py --clients 2 --fraction 0.5 --rounds 3` killed once checkpoint.pt "
        f"reached round {killed_after}; "
        "then `simulate.py --resume DIR` with the same flags",
        f"resumed after round {killed_after}; rounds.jsonl rounds [1, 2, 3] without "
        "duplicates; final model bit-for-bit equal to an uninterrupted run of the same seed",
    )
