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
    logger = logging.getLogger("strategies")
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
    with caplog.at_level(logging.WARNING, logger="strategies"):
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
    with caplog.at_level(logging.WARNING, logger="strategies"):
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
            "--fault-injection", "raise:1:2,hang:2:2",
            # Flower's pool: a client queued behind the hung one on its actor would wait too
            "--actor-queue-depth", "1",
            "--out", str(out),
            "--ray-temp-dir", str(flower_env / "ray" / "faults"),
        ],
        timeout=300,
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
        "Ray simulation, `--fault-injection raise:1:2` (ClientApp raises RuntimeError)",
        f"error reply counted as failed in round 2 (partition {failure['partition_id']}, "
        f"reason naming `{injected}`); the round aggregated the "
        f"{second['clients']} valid reply; the run completed {len(rows)} rounds",
    )
    reliability(
        "client hangs past the round timeout",
        f"Ray simulation, `--fault-injection hang:2:2` (sleeps {timeout + 5:g} s), "
        f"`--round-timeout {timeout:g}`, `--actor-queue-depth 1`",
        f"no reply: counted as dropped in round 2 (node {dropped['node_id']}, partition "
        f"{dropped['partition_id']}); the round closed after {second['seconds']:.0f} s with "
        f"{second['clients']} reply; the run completed {len(rows)} rounds",
    )


# --------------------------------------------------------------------------------------------
# Auditor isolation: whatever the attacks do, training computes the same model

if "rel-raise" not in ATTACKS:  # workers import this module to find these attacks

    @register("rel-raise")
    def _raise(model, gradients, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        score = Path("/proc/self/oom_score_adj")
        raise RuntimeError(f"attack bug (oom_score_adj={score.read_text().strip()})")

    @register("rel-oom")
    def _oom(model, gradients, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        raise AssertionError("not reached")

    @register("rel-hang")
    def _hang(model, gradients, **kwargs) -> AttackResult:  # noqa: ANN001, ANN003
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
