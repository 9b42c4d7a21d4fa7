"""Bad updates and client faults: rejected, logged, counted; the run goes on.

Bad updates are checked in-process (the real ClientApp behind an in-process grid, the real
server loop and round log; fast); client faults that need real processes (a client that
raises, one that hangs past the round timeout) run in a Ray simulation. Each test records
what it observed into docs/RELIABILITY.md (see the ``reliability`` fixture).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from precode_flower import task
from precode_flower.attacks import ATTACKS, AttackResult, register
from precode_flower.audit import LeakageAuditor
from precode_flower.clients.client_app import app as client_app
from precode_flower.strategies import Observed
from precode_flower.strategies.auditor import AuditObserver
from server import run_federation

REPO = Path(__file__).resolve().parents[1]
GOOD = 2  # honest clients (partitions 0 and 1) in the bad-update round


def _first(reply: Message) -> tuple[ArrayRecord, str]:
    arrays = reply.content["arrays"]
    return arrays, next(iter(arrays))


def _map_arrays(reply: Message, fn: Callable[[np.ndarray], np.ndarray]) -> Message:
    arrays = reply.content["arrays"]
    for k in list(arrays):
        arrays[k] = Array(np.ascontiguousarray(fn(arrays[k].numpy())))
    return reply


def _poison_first(value: float) -> Callable[[Message], Message]:
    def hook(reply: Message) -> Message:
        arrays, name = _first(reply)
        bad = arrays[name].numpy().copy()
        bad.flat[0] = value
        arrays[name] = Array(bad)
        return reply

    return hook


def _drop_record(key: str) -> Callable[[Message], Message]:
    def hook(reply: Message) -> Message:
        del reply.content[key]
        return reply

    return hook


def _extra_record(reply: Message) -> Message:
    reply.content["smuggled"] = ArrayRecord({"x": Array(np.zeros(4, np.float32))})
    return reply


def _rename(reply: Message) -> Message:
    arrays, name = _first(reply)
    arrays["not-a-parameter"] = arrays.pop(name)
    return reply


def _shape(reply: Message) -> Message:
    arrays, name = _first(reply)
    arrays[name] = Array(np.ascontiguousarray(arrays[name].numpy()[:-1]))
    return reply


def _dtype(reply: Message) -> Message:
    arrays = reply.content["arrays"]
    name = list(arrays)[-1]  # a small array: the reply stays within the size limit
    arrays[name] = Array(arrays[name].numpy().astype(np.float64))
    return reply


def _pad(reply: Message) -> Message:
    # 1.5 million numbers: ~12 MB, above the limit the run sets (see bad_round).
    reply.content["metrics"]["padding"] = [0.0] * 1_500_000
    return reply


def _weight(value: int) -> Callable[[Message], Message]:
    def hook(reply: Message) -> Message:
        reply.content["metrics"]["num-examples"] = value
        return reply

    return hook


def _wrong_config(reply: Message) -> Message:
    reply.content["config"] = ConfigRecord({"evil": "yes"})
    return reply


@dataclass(frozen=True)
class Bad:
    fault: str
    injection: str
    hook: Callable[[Message], Message]
    reason: str  # a fragment of the logged reason


BAD: dict[str, Bad] = {
    "no-metrics": Bad(
        "missing record",
        "the reply's MetricRecord `metrics` is removed",
        _drop_record("metrics"),
        "expected one MetricRecord",
    ),
    "no-arrays": Bad(
        "missing record",
        "the reply's ArrayRecord `arrays` is removed",
        _drop_record("arrays"),
        "expected one ArrayRecord",
    ),
    "extra-record": Bad(
        "unexpected record",
        "a second ArrayRecord `smuggled` is added",
        _extra_record,
        "expected one ArrayRecord",
    ),
    "extra-config": Bad(
        "unexpected record",
        "a ConfigRecord is added to the reply",
        _wrong_config,
        "unexpected records",
    ),
    "names": Bad(
        "wrong array names",
        "the first array is renamed `not-a-parameter`",
        _rename,
        "missing arrays",
    ),
    "shape": Bad("wrong shape", "the last row of the first array is dropped", _shape, "has shape"),
    "dtype": Bad(
        "wrong dtype",
        "the last array is sent as float64",
        _dtype,
        "has dtype",
    ),
    "nan": Bad("NaN", "one entry of the first array set to NaN", _poison_first(np.nan), "NaN"),
    "inf": Bad("Inf", "one entry of the first array set to +Inf", _poison_first(np.inf), "Inf"),
    "magnitude": Bad(
        "absurd magnitude",
        "every array multiplied by 1e6 (`--max-update-norm 100`)",
        lambda r: _map_arrays(r, lambda a: a * np.float32(1e6)),
        "exceeds 100",
    ),
    "size": Bad(
        "oversized reply",
        "1.5 million extra numbers in the metrics (`--max-reply-mb` = 1.5x the model)",
        _pad,
        "MiB, limit",
    ),
    "weight-zero": Bad(
        "bad aggregation weight", "`num-examples` set to 0", _weight(0), "positive number"
    ),
    "weight-negative": Bad(
        "bad aggregation weight", "`num-examples` set to -5", _weight(-5), "positive number"
    ),
}


@dataclass
class BadRound:
    rows: list[dict]
    log: str
    model: dict[str, torch.Tensor]
    node_of: dict[str, int]  # kind -> node id
    partition_of: dict[str, int]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _model_mb(cfg: task.RunConfig) -> float:
    model = task.build_model(cfg, 10, (3, 32, 32), seed=0)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


@pytest.fixture(scope="module")
def bad_round(module_task_identity, tmp_path_factory) -> BadRound:
    """One FedAvg round: 2 honest clients and one client per bad kind, in-process."""
    from conftest import InProcessGrid

    kinds = list(BAD)
    n = GOOD + len(kinds)
    base = task.RunConfig(mode="fedavg", clients=n, rounds=1, batch_size=16, local_steps=1)
    cfg = task.RunConfig.from_mapping(
        base.to_config(), **{"max-update-norm": 100.0, "max-reply-mb": 1.5 * _model_mb(base)}
    )
    node_of = {kind: 101 + GOOD + i for i, kind in enumerate(kinds)}
    grid = InProcessGrid(client_app, n, faulty={node_of[k]: BAD[k].hook for k in kinds})
    out = tmp_path_factory.mktemp("bad") / "run"
    capture = _Capture()
    logger = logging.getLogger("precode_flower.strategies")
    logger.addHandler(capture)
    try:
        run_federation(grid, cfg, out, progress=False)
    finally:
        logger.removeHandler(capture)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    model = torch.load(out / "model.pt", weights_only=True)
    return BadRound(
        rows,
        "\n".join(capture.lines),
        model,
        node_of,
        {k: GOOD + i for i, k in enumerate(kinds)},
    )


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_update_is_rejected_logged_and_counted(kind, bad_round, reliability) -> None:
    bad = BAD[kind]
    (row,) = bad_round.rows
    node, pid = bad_round.node_of[kind], bad_round.partition_of[kind]
    mine = [r for r in row["rejections"] if r["node_id"] == node]
    assert len(mine) == 1, row["rejections"]
    reason = mine[0]["reason"]
    assert bad.reason in reason
    assert mine[0]["partition_id"] in (pid, None)  # None where the metrics were removed
    # The log line names the client, the round and the reason.
    line = f"round 1: rejected reply of node {node} (partition "
    assert any(line in entry and reason in entry for entry in bad_round.log.splitlines())
    # The round aggregated the honest replies only, and the model stays finite.
    assert row["rejected"] == len(BAD) and row["clients"] == GOOD and row["skipped"] is None
    assert all(torch.isfinite(t.float()).all() for t in bad_round.model.values())
    reliability(
        bad.fault,
        f"in-process FedAvg round, client {pid}: {bad.injection}",
        f"rejected ({reason}); logged with node id, partition, round; rounds.jsonl: "
        f"rejected={row['rejected']}, the other {row['clients']} honest replies aggregated; "
        "global model finite",
    )


@pytest.mark.usefixtures("task_identity")
def test_too_few_valid_replies_skip_the_round_and_keep_the_model(
    tmp_path, inprocess_grid, reliability, caplog
) -> None:
    cfg = task.RunConfig(
        mode="fedsgd", clients=3, rounds=2, batch_size=8, min_replies=2, server_momentum=0.5
    )
    nan = BAD["nan"].hook
    # Round 1: two clients send NaN, one valid reply < min-replies 2; round 2 is healthy.
    grid = inprocess_grid(
        client_app,
        3,
        faulty={102: _only_round(1, nan), 103: _only_round(1, nan)},
    )
    with caplog.at_level(logging.WARNING, logger="precode_flower.strategies"):
        run_federation(grid, cfg, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    ]
    first, second = rows
    assert first["skipped"] == "only 1 valid replies, at least 2 needed"
    assert first["rejected"] == 2 and first["clients"] == 1
    assert "round 1 skipped, global model unchanged" in caplog.text
    # The model after round 1 is the initial one: round 1's test loss equals the initial.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert first["test_loss"] == summary["initial"]["test_loss"]
    assert second["skipped"] is None and second["clients"] == 3
    assert second["test_loss"] != first["test_loss"]
    reliability(
        "too few valid replies",
        "in-process FedSGD, `--min-replies 2`, 2 of 3 clients send NaN in round 1",
        f"round 1 skipped ({first['skipped']}), logged; global model unchanged (test loss "
        f"{first['test_loss']:.4f} = initial); round 2 aggregated {second['clients']} replies",
    )


def _only_round(server_round: int, hook: Callable[[Message], Message]):
    """Apply ``hook`` to the node's train reply of ``server_round`` only (one per round)."""
    calls = iter(range(1, 1 << 30))
    return lambda r: hook(r) if next(calls) == server_round else r


@pytest.mark.usefixtures("task_identity")
def test_a_non_finite_aggregate_never_becomes_the_model(reliability, caplog) -> None:
    """Finite but huge updates can overflow in the weighted sum: the round is skipped."""

    class Overflowing:
        def configure_train(self, server_round, arrays, config, grid):
            return []

        def aggregate_train(self, server_round, replies):
            return ArrayRecord({"w": Array(np.array([np.inf, 1.0], np.float32))}), None

    strategy = Observed(Overflowing())  # type: ignore[arg-type]
    strategy.validator.min_replies = 0  # no replies needed: only the aggregate is under test
    with caplog.at_level(logging.WARNING, logger="precode_flower.strategies"):
        arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is None
    assert strategy.rounds[1].skipped == "the aggregated model is not finite"
    reliability(
        "aggregate overflows",
        "a strategy returns a model with +Inf (as a float32 sum of huge finite updates would)",
        f"round skipped ({strategy.rounds[1].skipped}); the global model is left unchanged",
    )


# --------------------------------------------------------------------------------------------
# Client faults in a Ray simulation


@pytest.mark.slow
def test_a_client_that_raises_or_hangs_costs_only_its_reply(
    run_simulate, tmp_path, flower_env, reliability
) -> None:
    out = tmp_path / "run"
    timeout = 60.0  # above the first round's cold start (actors, data) on 2 busy cores
    proc = run_simulate(
        [
            "--clients", "3",
            "--rounds", "2",
            "--local-steps", "1",
            "--round-timeout", str(timeout),
            # Flower's pool: a client queued behind the hung one on its actor would wait too
            "--actor-queue-depth", "1",
            "--out", str(out),
            "--ray-temp-dir", str(flower_env / "ray" / "faults"),
        ],
        timeout=300,
        faults="raise:1:2,hang:2:2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    first, second = rows
    assert (first["clients"], first["failed"], first["dropped"]) == (3, 0, 0)
    assert (second["clients"], second["failed"], second["dropped"]) == (1, 1, 1)
    (failure,) = second["failures"]
    assert failure["partition_id"] == 1 and "injected fault" in failure["reason"]
    injected = re.search(r"injected fault: partition \d+ raises", failure["reason"]).group(0)
    (dropped,) = second["dropped_nodes"]
    assert dropped["partition_id"] == 2  # known from its round-1 reply
    assert second["seconds"] >= timeout  # the server waited for the hung client, no longer
    assert all(math.isfinite(r["test_loss"]) for r in rows)
    reliability(
        "client raises",
        "Ray simulation, test mod `raise:1:2` (tests/faults.py: the ClientApp raises)",
        f"error reply counted as failed in round 2 (partition {failure['partition_id']}, "
        f"reason naming `{injected}`); the round aggregated the "
        f"{second['clients']} valid reply; the run completed {len(rows)} rounds",
    )
    reliability(
        "client hangs past the round timeout",
        f"Ray simulation, test mod `hang:2:2` (sleeps {timeout + 5:g} s), "
        f"`--round-timeout {timeout:g}`, `--actor-queue-depth 1`",
        f"no reply: counted as dropped in round 2 (node {dropped['node_id']}, partition "
        f"{dropped['partition_id']}); the round closed after {second['seconds']:.0f} s with "
        f"{second['clients']} reply; the run completed {len(rows)} rounds",
    )


# --------------------------------------------------------------------------------------------
# Auditor isolation: whatever the attacks do, training computes the same model

if "rel-raise" not in ATTACKS:  # workers import this module to find these attacks

    @register("rel-raise")
    def _raise(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        score = Path("/proc/self/oom_score_adj")
        raise RuntimeError(f"attack bug (oom_score_adj={score.read_text().strip()})")

    @register("rel-oom")
    def _oom(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        raise AssertionError("not reached")

    @register("rel-hang")
    def _hang(case, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        time.sleep(120)
        raise AssertionError("not reached")


@pytest.mark.usefixtures("task_identity")
def test_auditor_crashes_timeouts_and_oom_never_touch_training(
    tmp_path, inprocess_grid, reliability, caplog
) -> None:
    cfg = task.RunConfig(mode="fedavg", clients=2, rounds=1, local_steps=1)
    run_federation(inprocess_grid(client_app, 2), cfg, tmp_path / "plain", progress=False)
    auditor = LeakageAuditor(
        tmp_path / "audited",
        ["rel-raise", "rel-oom", "rel-hang"],
        time_limit=2,
        max_pending=1,  # 2 clients in the round: the second job is dropped
        progress=False,
        print_summary=False,
    )
    observer = AuditObserver(auditor, close_timeout=60)
    with caplog.at_level(logging.WARNING, logger="precode_flower.audit"):
        run_federation(
            inprocess_grid(client_app, 2),
            cfg,
            tmp_path / "audited",
            observers=[observer],
            progress=False,
        )
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    audited = torch.load(tmp_path / "audited" / "model.pt", weights_only=True)
    assert all(torch.equal(plain[k], audited[k]) for k in plain)
    rows = [
        json.loads(line)
        for line in (tmp_path / "audited" / "leakage.jsonl").read_text().splitlines()
    ]
    status = {(r["attack"], r["status"]) for r in rows}
    assert ("rel-raise", "error") in status and ("rel-hang", "timeout") in status
    oom = [r for r in rows if r["attack"] == "rel-oom" and r["status"] == "error"]
    assert oom and "died" in oom[0]["error"]
    raised = next(r for r in rows if r["attack"] == "rel-raise" and r["status"] == "error")
    assert "oom_score_adj=1000" in raised["error"]  # the OOM killer picks workers first
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert dropped and all("queue full (1)" in r["error"] for r in dropped)
    assert "queue full" in caplog.text
    reliability(
        "auditor attack raises / is OOM-killed / hangs",
        "attacks that raise, SIGKILL their worker (as the OOM killer would) and sleep past "
        "`time_limit=2`; workers run at oom_score_adj 1000",
        "logged as error / error (worker died, replaced) / timeout (worker killed, replaced); "
        "the trained model is bit-for-bit the model of the same run without the audit",
    )
    reliability(
        "auditor backlog",
        "`max_pending=1` while the round submits 2 jobs",
        f"{len(dropped) // 3} job(s) dropped at submission with a logged reason (queue "
        "full), written as `dropped` rows; pending audit memory bounded by max_pending",
    )


# --------------------------------------------------------------------------------------------
# Hostile clients and impossible settings (issue 19)


def _zero_update(claim: int) -> Callable[[Message], Message]:
    """An all-zero update claiming ``claim`` examples (its FedAvg weight)."""

    def hook(reply: Message) -> Message:
        _map_arrays(reply, np.zeros_like)
        reply.content["metrics"]["num-examples"] = claim
        return reply

    return hook


@pytest.mark.usefixtures("task_identity")
def test_an_inflated_weight_claim_is_rejected_and_the_model_stays_sane(
    tmp_path, inprocess_grid, reliability, caplog
) -> None:
    cfg = task.RunConfig(mode="fedavg", clients=3, rounds=1, batch_size=16, local_steps=1)
    # The same round without the third client's reply (the node drops out): the reference.
    dropped = inprocess_grid(client_app, 3, faulty={103: lambda r: None})
    run_federation(dropped, cfg, tmp_path / "honest", progress=False)
    hostile = inprocess_grid(client_app, 3, faulty={103: _zero_update(10**12)})
    with caplog.at_level(logging.WARNING, logger="precode_flower.strategies"):
        run_federation(hostile, cfg, tmp_path / "hostile", progress=False)
    (row,) = [
        json.loads(x) for x in (tmp_path / "hostile" / "rounds.jsonl").read_text().splitlines()
    ]
    (rejection,) = row["rejections"]
    assert rejection["partition_id"] == 2 and "claims 1000000000000 examples" in rejection["reason"]
    assert "rejected reply of node 103" in caplog.text
    honest = torch.load(tmp_path / "honest" / "model.pt", weights_only=True)
    model = torch.load(tmp_path / "hostile" / "model.pt", weights_only=True)
    assert all(torch.equal(honest[k], model[k]) for k in honest)  # the zeros had no weight
    limit = task.max_examples(cfg)
    reliability(
        "inflated aggregation weight",
        "in-process FedAvg, 3 clients; client 2 sends an all-zero update with "
        "`num-examples` = 10**12",
        f"rejected ({rejection['reason']}; the default bound is the largest partition, "
        f"{limit}); logged; the global model is bit-for-bit the one aggregated from the 2 "
        "honest replies",
    )


class _EvaluateFaults:
    """Wraps an in-process grid; ``hooks`` rewrite chosen nodes' evaluate replies."""

    def __init__(self, grid, hooks) -> None:
        self.grid, self.hooks = grid, hooks

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        ids = self.grid.push_messages(messages)
        for msg, mid in zip(messages, ids, strict=True):
            hook = self.hooks.get(msg.metadata.dst_node_id)
            if hook and msg.metadata.message_type == "evaluate" and mid in self.grid.replies:
                self.grid.replies[mid] = hook(self.grid.replies[mid])
        return ids


def _set_metric(key: str, value: object) -> Callable[[Message], Message]:
    def hook(reply: Message) -> Message:
        metrics = reply.content["metrics"]
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value
        return reply

    return hook


@pytest.mark.usefixtures("task_identity")
def test_bad_evaluate_replies_are_rejected_and_the_run_goes_on(
    tmp_path, inprocess_grid, reliability, caplog
) -> None:
    cfg = task.RunConfig(mode="fedsgd", clients=5, rounds=2, batch_size=8)
    hooks = {
        102: _set_metric("num-examples", None),  # crashed Flower's aggregate_evaluate
        103: _set_metric("eval-loss", float("nan")),
        104: _set_metric("eval-accuracy", -3.0),
        105: _set_metric("num-examples", 0),
    }
    grid = _EvaluateFaults(inprocess_grid(client_app, 5), hooks)
    with caplog.at_level(logging.WARNING, logger="precode_flower.strategies"):
        run_federation(grid, cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        reasons = {r["partition_id"]: r["reason"] for r in row["evaluate_rejections"]}
        assert set(reasons) == {1, 2, 3, 4}
        assert "'num-examples' must be a positive number, got None" in reasons[1]
        assert "'eval-loss' is not finite" in reasons[2]
        assert "'eval-accuracy' must be a number in [0, 1]" in reasons[3]
        assert "got 0" in reasons[4]
        assert math.isfinite(row["client_eval_loss"])  # from the one valid reply
    assert "rejected evaluate reply of node 102" in caplog.text
    reliability(
        "bad evaluate replies",
        "in-process FedSGD, 5 clients; evaluate replies without `num-examples`, with a NaN "
        "loss, an accuracy of -3, and `num-examples` 0",
        f"each rejected and logged ({'; '.join(sorted(set(reasons.values())))}); both rounds "
        f"completed; client evaluation aggregated from the 1 valid reply",
    )


def test_a_zero_total_weight_does_not_divide_by_zero(reliability) -> None:
    from flwr.app import MetricRecord, RecordDict

    from precode_flower.strategies import aggregate_metrics

    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 0, "eval-loss": 1.0})})
        for _ in range(3)
    ]
    out = aggregate_metrics(replies, "num-examples")
    assert dict(out) == {"num-examples": 0}
    reliability(
        "zero total evaluate weight",
        "`aggregate_metrics` of 3 replies with `num-examples` 0 (more clients than test examples)",
        f"no ZeroDivisionError: the aggregate is {dict(out)} (no means without weight)",
    )


def test_the_production_client_ignores_a_fault_injection_key(reliability) -> None:
    from conftest import make_message
    from flwr.app import Context, RecordDict

    cfg = task.RunConfig(mode="fedsgd", batch_size=4, round_timeout=1.0)
    state = task.initial_state(cfg, 10, (3, 32, 32))
    context = Context(
        run_id=7,
        node_id=101,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )

    def reply_to(config: dict) -> tuple[Message, float]:
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
        started = time.perf_counter()
        reply = client_app(make_message(content, "train"), context)
        return reply, time.perf_counter() - started

    plain, _ = reply_to({**cfg.to_config(), "server-round": 1})
    hostile = "raise:1,hang:1,nan:1,scale:1"
    reply, seconds = reply_to({**cfg.to_config(), "server-round": 1, "fault-injection": hostile})
    assert not reply.has_error() and seconds < cfg.round_timeout + 5
    got, want = reply.content["arrays"], plain.content["arrays"]
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
    reliability(
        "fault-injection key sent to a production client",
        f'a train message whose config carries `fault-injection = "{hostile}"`',
        f"ignored: the reply ({seconds:.2f} s, no error) is bit-for-bit the reply without the "
        "key; fault injection exists only as a test mod (tests/faults.py)",
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{file}"], "exists and is not a directory"),
        (["--out", "{file}/sub"], "cannot create it"),
        (["--device", "cuda:3"], "CUDA device(s)"),
        (["--device", "tpu"], "--device"),
        (["--latent-dim", "-1"], "--latent-dim: latent-dim must be >= 1"),
        (["--train-steps", "-5"], "--train-steps must be >= 0"),
        (["--seed", str(2**70)], "--seed must be in"),
    ],
)
def test_the_attack_cli_refuses_impossible_values_before_attacking(
    args, message, tmp_path, capsys, reliability
) -> None:
    from precode_flower import attack

    file = tmp_path / "a-file"
    file.write_text("not a directory")
    argv = [a.replace("{file}", str(file)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        attack.main(["--attack", "analytic", "--images", "1", *argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0]
    assert captured.out == ""  # no attack ran
    reliability(
        "impossible attack CLI value",
        f"`python -m precode_flower.attack {' '.join(args)}`",
        f"exit 2 before any attack, one error line: `{lines[-1].replace(str(tmp_path), '...')}`",
    )


@pytest.mark.usefixtures("task_identity")
def test_every_output_of_a_run_is_owner_only(tmp_path, inprocess_grid, reliability) -> None:
    cfg = task.RunConfig(mode="fedsgd", clients=2, rounds=1, batch_size=4)
    out = tmp_path / "run"
    old = os.umask(0o022)  # the usual umask: files 0644, directories 0755 unless chosen
    try:
        run_federation(inprocess_grid(client_app, 2), cfg, out, progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    expected = {"checkpoint.pt", "model.pt", "config.json", "rounds.jsonl", "summary.json"}
    assert expected <= set(modes), modes
    assert out.stat().st_mode & 0o777 == 0o700
    assert {n: m for n, m in modes.items() if m != 0o600} == {}
    reliability(
        "run outputs readable by others",
        "a FedSGD run under umask 022 (from its checkpoint after round 1 and the seed, a "
        "batch-1 client's image can be rebuilt exactly)",
        f"run directory 0700; {', '.join(sorted(modes))}: all 0600",
    )


@pytest.mark.usefixtures("task_identity")
def test_resume_rebuilds_a_lost_round_log_from_the_checkpoint(
    tmp_path, inprocess_grid, reliability, caplog
) -> None:
    cfg = task.RunConfig(mode="fedsgd", clients=2, rounds=2, batch_size=4)
    out = tmp_path / "run"
    run_federation(inprocess_grid(client_app, 2), cfg, out, progress=False)
    before = (out / "rounds.jsonl").read_text().splitlines()
    (out / "rounds.jsonl").unlink()
    more = task.RunConfig(mode="fedsgd", clients=2, rounds=3, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="precode_flower"):
        run_federation(inprocess_grid(client_app, 2), more, out, progress=False, resume=True)
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    assert lines[:2] == before
    assert "rebuilt rounds.jsonl rows of rounds 1-2 from checkpoint.pt" in caplog.text
    reliability(
        "round log lost before resuming",
        "rounds.jsonl deleted after round 2, then `--resume` with `--rounds 3`",
        "rows of rounds 1-2 rebuilt from checkpoint.pt (equal to the lost ones) and logged; "
        "round 3 appended; rounds.jsonl holds rounds [1, 2, 3]",
    )


@pytest.mark.usefixtures("task_identity")
def test_a_moved_run_directory_resumes_with_default_flags(
    tmp_path, inprocess_grid, reliability
) -> None:
    import dataclasses
    import shutil

    import simulate

    cfg = task.RunConfig(mode="fedsgd", clients=2, rounds=1, batch_size=4)
    first = tmp_path / "first"
    embedded = dataclasses.replace(cfg, data_dir=str(simulate.embedded_data_dir(first)))
    run_federation(inprocess_grid(client_app, 2), embedded, first, progress=False)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)
    # What `simulate.py --resume MOVED --rounds 2` builds: the run's own data, at its new place.
    again = dataclasses.replace(cfg, rounds=2, data_dir=str(simulate.embedded_data_dir(moved)))
    run_federation(inprocess_grid(client_app, 2), again, moved, progress=False, resume=True)
    rows = [json.loads(x) for x in (moved / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    reliability(
        "run directory moved, then resumed",
        "a run using simulate.py's embedded data (`<run dir>/data`) moved to another path, "
        "then resumed there with default flags",
        "the checkpoint's data-dir is recognised as the run's own data at its new place; "
        f"resumed after round 1, rounds.jsonl holds rounds {[r['round'] for r in rows]}",
    )


IMPOSSIBLE = {
    "NaN beta": (["--defense", "precode", "--beta", "nan"], "beta must be a finite number"),
    "NaN sigma": (["--defense", "noise", "--sigma", "nan"], "sigma must be a finite number"),
    "infinite lr": (["--lr", "inf"], "lr must be a finite number"),
    "infinite alpha": (["--partition", "dirichlet", "--alpha", "inf"], "alpha must be a finite"),
    "classes per client": (
        ["--partition", "pathological", "--classes-per-client", "99"],
        "classes-per-client must be <= 10",
    ),
    "quorum above the clients": (
        ["--min-replies", "5", "--clients", "2"],
        "min-replies 5 exceeds the 2 clients",
    ),
    "huge seed": (["--seed", str(10**30)], "seed must be >= 0 and <= 9223372036854775807"),
    "negative latent size": (["--latent-dim", "-1"], "latent-dim must be >= 1"),
    "more clients than examples": (["--clients", "3000"], "num_partitions must be in [1, 2000]"),
    "missing data dir": (["--data-dir", "{tmp}/nowhere"], "no 'cifar10' data in data_dir"),
    "--out is a file": (["--out", "{tmp}/a-file"], "exists and is not a directory"),
    "--out cannot be created": (["--out", "{tmp}/a-file/run"], "cannot create it"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_settings_are_refused_in_one_line_before_ray_starts(
    case, tmp_path, capsys, reliability, monkeypatch
) -> None:
    import simulate

    args, message = IMPOSSIBLE[case]
    (tmp_path / "a-file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    started = []
    monkeypatch.setattr("ray.init", lambda *a, **k: started.append(1))  # must not be reached
    with pytest.raises(SystemExit) as exit_:
        simulate.main(["--rounds", "1", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not started  # Ray never started; and no run was written:
    assert not any((tmp_path / "run" / name).exists() for name in ("config.json", "rounds.jsonl"))
    reliability(
        f"impossible setting: {case}",
        f"`simulate.py {' '.join(args).replace('{tmp}/', '')}`",
        f"exit 2 before Ray starts, one line: `{lines[0].replace(str(tmp_path) + '/', '')}`",
    )


def test_an_existing_run_is_never_overwritten(tmp_path, capsys, reliability) -> None:
    import simulate

    out = tmp_path / "finished"
    out.mkdir()
    for name in ("rounds.jsonl", "checkpoint.pt", "model.pt", "summary.json", "config.json"):
        (out / name).write_text(f"the {name} of a finished run\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        simulate.main(["--out", str(out), "--clients", "2", "--rounds", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    reliability(
        "results overwritten",
        "`simulate.py --out DIR` where DIR holds a finished run (no `--resume`)",
        f"exit 2, nothing touched: `{lines[0].replace(str(tmp_path) + '/', '')}`; "
        "`--overwrite` replaces it explicitly",
    )


def test_a_dead_ray_address_gives_up_at_once(tmp_path, capsys, free_port, reliability) -> None:
    import simulate

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        simulate.main(["--ray-address", address, "--out", str(tmp_path / "run")])
    seconds = time.perf_counter() - started
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and address in lines[0]
    assert seconds < 30
    reliability(
        "dead Ray address",
        "`simulate.py --ray-address 127.0.0.1:<a port nothing listens on>`",
        f"exit 2 after {seconds:.1f} s, one line: `{lines[0].replace(address, '<address>')}`",
    )


@pytest.mark.slow
def test_a_client_that_never_returns_cannot_keep_the_process_alive(
    run_simulate, tmp_path, flower_env, reliability
) -> None:
    out = tmp_path / "run"
    timeout = 30.0
    started = time.perf_counter()
    proc = run_simulate(
        [
            "--clients", "2", "--rounds", "1", "--local-steps", "1",
            "--round-timeout", str(timeout), "--actor-queue-depth", "1", "--out", str(out),
            "--ray-temp-dir", str(flower_env / "ray" / "never"),
        ],
        timeout=400,
        faults="never:1:1",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    (dropped,) = row["dropped_nodes"]
    assert row["clients"] == 1 and (out / "summary.json").exists()
    assert "still running after the run ended" in proc.stderr
    reliability(
        "client never returns",
        f"Ray simulation, a test mod makes partition 1 sleep forever in round 1 "
        f"(`--round-timeout {timeout:g}`)",
        f"dropped in round 1 (node {dropped['node_id']}); the run ended, reported the client "
        f"still running, stopped Ray and exited 0 after {seconds:.0f} s in all",
    )
