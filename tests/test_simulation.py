"""simulate.py: flags, the server-side run loop in-process, and Ray end-to-end runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from faults import faulty_client_app
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

import simulate
from precode_flower import data, task
from precode_flower.clients.client_app import app as client_app
from precode_flower.federation import simulation
from precode_flower.processes import session_pids, stop_sessions
from precode_flower.strategies import Observed
from precode_flower.training import evaluate
from server import make_strategy, make_validator, run_federation, train_rounds

REPO = Path(__file__).resolve().parents[1]
ROUND_KEYS = {"round", "clients", "rejected", "failed", "train_loss", "test_accuracy", "seconds"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "vgg"], "convnet"),
        (["--dataset", "imagenet"], "fashion-mnist"),
        (["--defense", "dp"], "choose from: none, precode, noise, prune"),
        (["--mode", "fedprox"], "fedsgd"),
        (["--partition", "zipf"], "dirichlet"),
        (["--server-optimizer", "lion"], "adam"),
        (["--clients", "0"], "clients must be >= 1, got 0"),
        (["--fraction", "1.5"], "fraction must be > 0 and <= 1"),
        (["--prune-rate", "1"], "prune-rate"),
        (["--rounds", "two"], "expected an integer, got 'two'"),
        (["--client-cpus", "999"], "--client-cpus"),
        (["--object-store-mb", "10"], "--object-store-mb must be at least 75"),
        (["--actor-queue-depth", "0"], "--actor-queue-depth must be at least 1"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(argv, fragment, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        simulate.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("simulate.py: error:") and fragment in err


def test_backend_config_is_local_and_bounded() -> None:
    local = simulate.backend_config(ray_address=None, temp_dir="/tmp/x", client_cpus=1.0)
    assert local["init_args"]["_node_ip_address"] == "127.0.0.1"
    assert local["init_args"]["include_dashboard"] is False
    assert local["init_args"]["_temp_dir"] == "/tmp/x"
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"]["object_store_memory"] == simulate.DEFAULT_OBJECT_STORE_MB << 20
    remote = simulate.backend_config(ray_address="127.0.0.1:6379", temp_dir=None, client_cpus=0.5)
    assert remote["init_args"]["address"] == "127.0.0.1:6379"
    assert not {"num_cpus", "_temp_dir", "object_store_memory"} & set(remote["init_args"])


def test_default_data_is_the_embedded_cifar10_linked_into_the_run(tmp_path, capsys) -> None:
    from precode_flower import data as data_mod

    directory = simulate.embedded_data_dir(tmp_path / "run")
    assert directory == (tmp_path / "run" / "data").resolve()
    assert simulate.embedded_data_dir(tmp_path / "run") == directory  # idempotent
    # A run dir linked from a checkout that has since gone (its link dangles) is relinked.
    link = directory / "cifar10" / "cifar10_subset.npz"
    link.unlink()
    link.symlink_to(tmp_path / "gone" / "cifar10_default.npz")
    assert simulate.embedded_data_dir(tmp_path / "run") == directory
    assert len(data_mod.load("cifar10", directory).train) == 2000
    parser = simulate.build_parser()
    for argv, source in [
        ([], "embedded"),
        (["--data-dir", "somewhere"], "auto"),
        (["--dataset", "mnist"], "auto"),
        (["--data-source", "auto"], "auto"),
    ]:
        assert simulation._data_source(parser, parser.parse_args(argv)) == source
    with pytest.raises(SystemExit) as exc:
        simulation._data_source(
            parser, parser.parse_args(["--data-source", "embedded", "--dataset", "mnist"])
        )
    assert exc.value.code == 2 and "only cifar10" in capsys.readouterr().err


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("mode", ["fedsgd", "fedavg"])
def test_same_seed_same_numbers_and_faults_are_absorbed(mode, tmp_path, inprocess_grid) -> None:
    """The ServerApp's loop (strategy, validation, round log) in-process, without Ray."""
    cfg = task.RunConfig(
        mode=mode,
        clients=3,
        rounds=2,
        batch_size=16,
        local_steps=2,
        audit_ground_truth=True,
    )
    faulty = faulty_client_app("nan:1:2,shape:2:1")  # the test-only fault mod
    runs = []
    for i in range(2):
        grid = inprocess_grid(faulty, 3)
        run_federation(grid, cfg, tmp_path / f"run{i}", progress=False)
        runs.append(_rows(tmp_path / f"run{i}"))
    assert _without_timing(runs[0]) == _without_timing(runs[1])
    first, second = runs[0]
    assert (first["clients"], first["rejected"], first["failed"]) == (2, 1, 0)
    assert (second["clients"], second["rejected"]) == (2, 1)
    assert "shape" in first["rejections"][0]["reason"]
    assert first["rejections"][0]["partition_id"] == 2
    assert "NaN" in second["rejections"][0]["reason"]
    model = torch.load(tmp_path / "run0" / "model.pt", weights_only=True)
    assert all(torch.isfinite(t.float()).all() for t in model.values())
    assert json.loads((tmp_path / "run0" / "config.json").read_text())["mode"] == mode


def _from_superlink(reply):
    """The error reply a SuperLink sends for a node that went offline: its source is the
    SuperLink (node 0), not the node."""
    from flwr.app import Error, Message, Metadata

    metadata = Metadata(
        run_id=7,
        message_id="",
        src_node_id=0,
        dst_node_id=reply.metadata.dst_node_id,
        reply_to_message_id=reply.metadata.reply_to_message_id,
        group_id=reply.metadata.group_id,
        created_at=time.time(),
        ttl=3600.0,
        message_type=reply.metadata.message_type,
    )
    return Message(metadata=metadata, error=Error(code=1, reason="node unavailable"))


@pytest.mark.usefixtures("task_identity")
def test_superlink_error_replies_count_for_their_node(inprocess_grid) -> None:
    cfg = task.RunConfig(clients=2, rounds=1, local_steps=1, batch_size=8)
    errors = []
    grid = inprocess_grid(
        client_app,
        2,
        faulty={102: lambda reply: errors.append(_from_superlink(reply)) or errors[-1]},
    )
    bundle = data.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=0)
    strategy = make_strategy(cfg, [n for n, _ in model.named_parameters()])
    observed = Observed(strategy, validator=make_validator(cfg, strategy))
    train_rounds(observed, grid, ArrayRecord(model.state_dict()), cfg)
    rec = observed.record(1)
    assert (rec.clients, rec.failed, rec.dropped) == (1, 1, 0)  # failed, not also missing
    assert rec.failures[0]["node_id"] == 102 and "unavailable" in rec.failures[0]["reason"]
    assert errors[0].metadata.src_node_id == 0  # read, not rewritten (no private field)


def test_transport_defaults_to_fast_only_where_verified(monkeypatch, capsys) -> None:
    parser = simulate.build_parser()
    monkeypatch.setattr(simulation, "fast_transport_problem", lambda: None)
    assert simulation.choose_transport(parser, None) == "fast"
    assert simulation.choose_transport(parser, "flower") == "flower"
    reason = "the fast transport is verified for Flower 1.42.x, not 1.50.0"
    monkeypatch.setattr(simulation, "fast_transport_problem", lambda: reason)
    assert simulation.choose_transport(parser, None) == "flower"
    err = capsys.readouterr().err
    assert err == f"WARNING: {reason}; using --transport flower\n"
    assert simulation.choose_transport(parser, "flower") == "flower"
    with pytest.raises(SystemExit) as exc:
        simulation.choose_transport(parser, "fast")
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"simulate.py: error: --transport fast: {reason}\n"


def test_object_store_holds_a_rounds_updates_and_two_models() -> None:
    cfg = task.RunConfig(model="mlp", clients=10)
    shape, classes = data.shape_and_classes(cfg.dataset)
    state = task.build_model(cfg, classes, shape).state_dict()
    model = sum(t.numel() * t.element_size() for t in state.values())
    assert task.model_bytes(cfg) == model
    assert simulate.object_store_mb(cfg) << 20 >= 12 * model
    many = task.RunConfig(model="mlp", clients=100)
    assert simulate.object_store_mb(many) << 20 >= 102 * model
    sampled = task.RunConfig(model="mlp", clients=100, fraction=0.1)
    assert simulate.object_store_mb(sampled) == simulate.object_store_mb(cfg)
    small = task.RunConfig(model="convnet", clients=2)  # never below the floor
    assert simulate.object_store_mb(small) == simulate.DEFAULT_OBJECT_STORE_MB


class _EvaluatePhaseSignal:
    """Wraps a grid; sets ``evaluating[r]`` when round r's evaluate phase is sent, and logs
    each push as (message type, round)."""

    def __init__(self, grid, rounds: int) -> None:
        self.grid, self.pushed = grid, []
        self.evaluating = {r: threading.Event() for r in range(1, rounds + 1)}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        if messages:
            kind = messages[0].metadata.message_type
            server_round = messages[0].content["config"]["server-round"]
            self.pushed.append((kind, server_round))
            if kind == "evaluate":
                self.evaluating[server_round].set()
        return self.grid.push_messages(messages)


@pytest.mark.usefixtures("task_identity")
def test_evaluation_overlaps_central_evaluation_and_next_training(inprocess_grid) -> None:
    cfg = task.RunConfig(clients=2, rounds=2, local_steps=1, batch_size=8)
    grid = _EvaluatePhaseSignal(inprocess_grid(client_app, 2), cfg.rounds)
    bundle = data.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=0)
    strategy = make_strategy(cfg, [n for n, _ in model.named_parameters()])
    observed = Observed(strategy, validator=make_validator(cfg, strategy))
    seen, done = [], []

    def central(server_round, arrays):
        # Waits for the clients' evaluation of this round: sequential would time out.
        overlapped = grid.evaluating[server_round].wait(timeout=30)
        return server_round, overlapped, threading.current_thread() is threading.main_thread()

    def after_round(server_round, arrays, result):
        seen.append(result)
        done.append((observed.record(server_round).evaluate_clients, list(grid.pushed)))

    train_rounds(
        observed, grid, ArrayRecord(model.state_dict()), cfg,
        evaluate_fn=central, after_round=after_round,
    )  # fmt: skip
    assert seen == [(1, True, False), (2, True, False)]
    # The round's client evaluation was in when after_round ran, and the next round's
    # training had been sent right behind it.
    assert done == [
        (2, [("train", 1), ("evaluate", 1), ("train", 2)]),
        (2, [("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]),
    ]

    def failing(server_round, arrays):
        raise RuntimeError("central evaluation failed")

    with pytest.raises(RuntimeError, match="central evaluation failed"):
        train_rounds(observed, grid, ArrayRecord(model.state_dict()), cfg, evaluate_fn=failing)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("mode", ["fedavg", "fedsgd"])
def test_round_loop_gives_flowers_start_model_where_they_agree(mode, inprocess_grid) -> None:
    """Every node online, rounds 1..n: train_rounds (pipelined, seeded per round) and
    Flower's Strategy.start (sequential) end on bitwise the same model, with the same
    per-round aggregated metrics and the same central evaluations."""
    cfg = task.RunConfig(mode=mode, clients=3, rounds=2, local_steps=2, batch_size=8)
    bundle = data.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    keys = [n for n, _ in model.named_parameters()]
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def observed() -> Observed:
        strategy = make_strategy(cfg, keys)
        return Observed(strategy, validator=make_validator(cfg, strategy), sort_replies=True)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        task.load_state(model, arrays.to_torch_state_dict())
        stats = evaluate(model, bundle.test)
        return MetricRecord({"loss": stats.loss, "accuracy": stats.accuracy})

    ours_central: dict[int, MetricRecord] = {}
    ours = observed()
    final = train_rounds(
        ours, inprocess_grid(client_app, 3), ArrayRecord(initial), cfg,
        evaluate_fn=central,
        after_round=lambda r, _arrays, result: ours_central.__setitem__(r, result),
    )  # fmt: skip
    theirs = observed()
    result = theirs.start(
        inprocess_grid(client_app, 3),
        ArrayRecord(initial),
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(cfg.to_config()),
        evaluate_config=ConfigRecord(cfg.to_config()),
        evaluate_fn=central,
    )
    mine, flowers = final.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert mine.keys() == flowers.keys()
    assert all(torch.equal(mine[k], flowers[k]) for k in mine)
    assert not all(torch.equal(mine[k], initial[k]) for k in mine)  # it did train
    for r in range(1, cfg.rounds + 1):
        assert result.train_metrics_clientapp[r] and result.evaluate_metrics_serverapp[r]
        assert ours.record(r).train_metrics == dict(result.train_metrics_clientapp[r])
        assert ours.record(r).evaluate_metrics == dict(result.evaluate_metrics_clientapp[r])
        assert dict(ours_central[r]) == dict(result.evaluate_metrics_serverapp[r])


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["fast", "flower"])
def test_ray_simulation_end_to_end(transport, run_simulate, tmp_path, flower_env) -> None:
    out = tmp_path / "run"
    proc = run_simulate(
        [
            "--transport", transport,
            "--clients", "3",
            "--rounds", "2",
            "--local-steps", "2",
            "--audit-ground-truth",
            "--out", str(out),
            "--ray-temp-dir", str(flower_env / "ray" / f"e2e-{transport}"),
        ],
        timeout=240,
        faults="nan:1:2,raise:2:2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert ROUND_KEYS <= set(r)
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0
        assert math.isfinite(r["train_loss"])
    assert (rows[0]["clients"], rows[0]["rejected"], rows[0]["failed"]) == (3, 0, 0)
    assert (rows[1]["clients"], rows[1]["rejected"], rows[1]["failed"]) == (1, 1, 1)
    assert "round 1/2: 3 clients replied" in proc.stdout
    assert f"({transport} transport)" in proc.stdout
    assert (out / "accuracy.png").stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert config["clients"] == 3 and config["rounds"] == 2 and config["mode"] == "fedavg"
    assert config["data-dir"] == str((out / "data").resolve())  # the embedded default
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


# Run in a fresh process: the simulation, then which of Flower's engine parts are Flower's
# own, and whether the server received any record through the fast transport's store.
_TRANSPORT_PROBE = """
import json, sys
import simulate
code = simulate.main(sys.argv[1:])
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport import ray_actor
from precode_flower.strategies import ray_transport
print(json.dumps({
    "feeder": vce_api.add_messages_to_queue.__module__ == vce_api.__name__,
    "injector": vce_api.put_message_into_state.__module__ == vce_api.__name__,
    "pool": raybackend.BasicActorPool is ray_actor.BasicActorPool,
    "shared": ray_transport._SHARED_SEEN,
}))
sys.exit(code)
"""


@pytest.mark.slow
def test_both_transports_give_bitwise_the_same_model(tmp_path, flower_env) -> None:
    """The same seeded 2-round simulation on --transport fast and flower; flower leaves
    Flower's engine as it is and no record goes through the fast transport's store."""
    models, flowers = {}, {}
    for transport in ("fast", "flower"):
        out = tmp_path / transport
        flags = [
            "--clients", "2", "--rounds", "2", "--local-steps", "2", "--seed", "3",
            "--no-progress", "--transport", transport, "--out", str(out),
            "--ray-temp-dir", str(flower_env / "ray" / transport),
        ]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", _TRANSPORT_PROBE, *flags],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "2/2 rounds in" in proc.stdout and f"({transport} transport)" in proc.stdout
        flowers[transport] = json.loads(proc.stdout.strip().splitlines()[-1])
        models[transport] = torch.load(out / "model.pt", weights_only=True)
    assert flowers["flower"] == {"feeder": True, "injector": True, "pool": True, "shared": False}
    assert flowers["fast"] == {"feeder": False, "injector": False, "pool": False, "shared": True}
    fast, plain = models["fast"], models["flower"]
    assert fast.keys() == plain.keys()
    assert all(torch.equal(fast[k], plain[k]) for k in fast)
    rows = {t: _without_timing(_rows(tmp_path / t)) for t in models}
    assert rows["fast"] == rows["flower"]


@pytest.fixture
def ray_head(flower_env, free_port):
    """A local Ray head on 127.0.0.1 in its own session; killed (the session) afterwards."""
    port = free_port()
    temp = flower_env / "ray" / f"head{port}"
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--temp-dir", str(temp),
        "--num-cpus", "2",
        "--include-dashboard", "false",
        "--disable-usage-stats",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
    ]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(flower_env / f"ray-head-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if "Ray runtime started" in (flower_env / f"ray-head-{port}.log").read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, (flower_env / f"ray-head-{port}.log").read_text()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        stop_sessions([proc.pid], grace=8)
        proc.wait(timeout=10)
        log.close()
        assert not session_pids(proc.pid)


@pytest.mark.slow
def test_simulation_on_an_existing_ray_cluster(run_simulate, ray_head, tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_simulate(
        [
            "--clients",
            "2",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--ray-address",
            ray_head,
            "--out",
            str(out),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = _rows(out)
    assert row["clients"] == 2 and row["failed"] == 0
