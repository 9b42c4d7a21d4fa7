"""FedSGD's aggregation math, the Observed wrapper, and reply validation (all in-process)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from precode_flower import task
from precode_flower.clients.client_app import app as client_app
from precode_flower.strategies import FedSGD, Observed, ReplyValidator, RoundContext
from precode_flower.strategies.arrays import StoredArray
from precode_flower.strategies.validation import min_replies, norm_bound

W = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.array([0.5, -0.5], dtype=np.float32)
STEPS = np.array(4, dtype=np.int64)  # a buffer: sent, never a gradient


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(W.copy()), "b": Array(B.copy()), "steps": Array(STEPS.copy())})


class _Grid:
    def __init__(self, nodes=(11, 12, 13)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _reply(request: Message, arrays: dict[str, np.ndarray] | None, metrics: dict | None) -> Message:
    """A client's reply to ``request`` (the node is the request's destination)."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    request.metadata.__dict__["_message_id"] = f"req-{request.metadata.dst_node_id}"
    return Message(content, reply_to=request)


def _grads(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((2, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(2) * scale).astype(np.float32),
    }


def _metrics(n: int, pid: int) -> dict:
    return {"num-examples": n, "train-loss": 1.0 + pid, "train-accuracy": 0.5, "partition-id": pid}


def _round(strategy, server_round: int, arrays: ArrayRecord, replies_for) -> tuple:
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), _Grid()))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [replies_for(node, msg) for node, msg in sorted(by_node.items())]
    return strategy.aggregate_train(server_round, [r for r in replies if r is not None])


@pytest.mark.usefixtures("task_identity")
def test_fedsgd_weighted_mean_and_sgd_step_by_hand() -> None:
    g = {11: _grads(1), 12: _grads(2), 13: _grads(3)}
    n = {11: 10, 12: 30, 13: 60}
    strategy = FedSGD(param_keys=["w", "b"], server_lr=0.5, min_available_nodes=3)
    arrays, metrics = _round(
        strategy,
        1,
        _global(),
        lambda node, msg: _reply(msg, g[node], _metrics(n[node], node - 11)),
    )
    total = sum(n.values())
    for k, start in (("w", W), ("b", B)):
        mean = sum(n[i] * g[i][k].astype(np.float64) for i in g) / total
        np.testing.assert_allclose(arrays[k].numpy(), start - 0.5 * mean, rtol=1e-6)
        assert arrays[k].numpy().dtype == np.float32
    np.testing.assert_array_equal(arrays["steps"].numpy(), STEPS)  # buffers pass through
    assert list(arrays) == ["w", "b", "steps"]
    assert metrics["num-examples"] == 100
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)
    assert "partition-id" not in metrics


@pytest.mark.usefixtures("task_identity")
def test_fedsgd_momentum_state_persists_across_rounds() -> None:
    strategy = FedSGD(
        param_keys=["w", "b"],
        server_lr=0.1,
        server_momentum=0.9,
        min_available_nodes=1,
        min_train_nodes=1,
    )
    grid = _Grid([11])
    g1, g2 = _grads(1), _grads(2)
    arrays = _global()
    for rnd, g in ((1, g1), (2, g2)):
        (msg,) = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(rnd, [_reply(msg, g, _metrics(5, 0))])
    v1 = g1["w"].astype(np.float64)
    v2 = 0.9 * v1 + g2["w"]
    expected = W - 0.1 * v1 - 0.1 * v2
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)


@pytest.mark.usefixtures("task_identity")
def test_fedsgd_adam_and_nonfinite_guard() -> None:
    strategy = FedSGD(
        param_keys=["w", "b"],
        server_lr=0.01,
        optimizer="adam",
        min_available_nodes=1,
        min_train_nodes=1,
    )
    grid = _Grid([11])
    (msg,) = strategy.configure_train(1, _global(), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, [_reply(msg, _grads(1), _metrics(5, 0))])
    # Adam's first step moves every entry by ~lr.
    np.testing.assert_allclose(np.abs(arrays["w"].numpy() - W), 0.01, rtol=1e-3)
    bad = _grads(2)
    bad["w"][0, 0] = np.inf
    (msg,) = strategy.configure_train(2, arrays, ConfigRecord(), grid)
    new, _ = strategy.aggregate_train(2, [_reply(msg, bad, _metrics(5, 0))])
    assert new is None  # unwrapped FedSGD keeps the model rather than stepping on Inf
    with pytest.raises(ValueError, match="sgd, adam"):
        FedSGD(optimizer="rmsprop")


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[RoundContext, list]] = []
        self.closed = False

    def observe(self, context, replies) -> None:
        self.calls.append((context, replies))

    def close(self) -> None:
        self.closed = True


@pytest.mark.usefixtures("task_identity")
def test_observer_sees_every_valid_reply_with_what_was_sent() -> None:
    recorder = _Recorder()
    strategy = Observed(
        FedSGD(param_keys=["w", "b"], server_lr=0.5, min_available_nodes=3), [recorder]
    )
    g = {11: _grads(1), 12: _grads(2), 13: _grads(3)}
    arrays, _ = _round(
        strategy, 1, _global(), lambda node, msg: _reply(msg, g[node], _metrics(8, node))
    )
    ((context, replies),) = recorder.calls
    assert context.server_round == 1
    assert list(context.global_arrays) == ["w", "b", "steps"]
    np.testing.assert_array_equal(context.global_arrays["w"], W)
    assert context.train_config == {"lr": 0.1, "server-round": 1}
    assert sorted(r.node_id for r in replies) == [11, 12, 13]
    for r in replies:
        assert r.partition_id == r.node_id and r.num_examples == 8
        for k in ("w", "b"):
            np.testing.assert_array_equal(r.arrays[k], g[r.node_id][k])
    rec = strategy.rounds[1]
    assert (rec.sent, rec.clients, rec.rejected, rec.failed, rec.dropped) == (3, 3, 0, 0, 0)
    strategy.close()
    assert recorder.closed
    assert strategy.server_lr == 0.5  # attributes are delegated


@pytest.mark.usefixtures("task_identity")
def test_nan_misshapen_and_broken_replies_are_dropped_and_logged(caplog) -> None:
    recorder = _Recorder()
    inner = FedSGD(param_keys=["w", "b"], server_lr=1.0, min_available_nodes=3)
    strategy = Observed(inner, [recorder])
    good = _grads(1)
    nan = _grads(2)
    nan["b"][1] = np.nan
    wide = {"w": np.zeros((2, 4), np.float32), "b": np.zeros(2, np.float32)}

    def replies_for(node, msg):
        return {
            11: _reply(msg, good, _metrics(4, 0)),
            12: _reply(msg, nan, _metrics(4, 1)),
            13: _reply(msg, wide, _metrics(4, 2)),
        }[node]

    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, _ = _round(strategy, 3, _global(), replies_for)
    np.testing.assert_allclose(arrays["w"].numpy(), W - good["w"], rtol=1e-6)
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    text = caplog.text
    assert "round 3: rejected reply of node 12 (partition 1): array 'b' contains NaN" in text
    assert "node 13 (partition 2): array 'w' has shape (2, 4), expected (2, 3)" in text
    assert [r.node_id for r in recorder.calls[0][1]] == [11]
    rec = strategy.rounds[3]
    assert (rec.clients, rec.rejected, rec.failed) == (1, 2, 0)
    assert {r["node_id"] for r in rec.rejections} == {12, 13}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("arrays", "metrics", "reason"),
    [
        (None, _metrics(4, 1), "expected one ArrayRecord 'arrays'"),
        (_grads(1), None, "expected one MetricRecord 'metrics'"),
        ({"w": _grads(1)["w"]}, _metrics(4, 1), "missing arrays 'b'"),
        ({**_grads(1), "extra": np.zeros(1, np.float32)}, _metrics(4, 1), "unexpected arrays"),
        ({k: v.astype(np.float64) for k, v in _grads(1).items()}, _metrics(4, 1), "dtype float64"),
        (_grads(1), {**_metrics(4, 1), "num-examples": 0}, "'num-examples' must be a positive"),
        (_grads(1), {**_metrics(4, 1), "train-loss": float("inf")}, "'train-loss' is not finite"),
    ],
)
def test_each_malformed_reply_is_rejected_with_its_reason(arrays, metrics, reason, caplog) -> None:
    strategy = Observed(FedSGD(param_keys=["w", "b"], min_available_nodes=2))
    good = _grads(5)

    def replies_for(node, msg):
        if node == 11:
            return _reply(msg, good, _metrics(4, 0))
        return _reply(msg, arrays, metrics)

    with caplog.at_level(logging.WARNING, logger="strategies"):
        new, _ = _round(
            strategy, 1, _global(), lambda node, msg: replies_for(node, msg) if node < 13 else None
        )
    assert reason in caplog.text and "node 12" in caplog.text
    assert strategy.rounds[1].clients == 1 and strategy.rounds[1].dropped == 1
    np.testing.assert_allclose(new["w"].numpy(), W - 0.1 * good["w"], rtol=1e-6)


@pytest.mark.usefixtures("task_identity")
def test_error_replies_count_as_failed_and_the_round_goes_on(caplog) -> None:
    strategy = Observed(FedSGD(param_keys=["w", "b"], min_available_nodes=3))

    def replies_for(node, msg):
        if node == 12:
            msg.metadata.__dict__["_message_id"] = "req-12"
            return Message(Error(code=0, reason="client exploded"), reply_to=msg)
        return _reply(msg, _grads(node), _metrics(4, node))

    with caplog.at_level(logging.WARNING, logger="strategies"):
        new, _ = _round(strategy, 1, _global(), replies_for)
    assert new is not None
    assert "client node 12 failed: client exploded" in caplog.text
    rec = strategy.rounds[1]
    assert (rec.clients, rec.failed, rec.rejected) == (2, 1, 0)


@pytest.mark.usefixtures("task_identity")
def test_observer_errors_do_not_stop_training(caplog) -> None:
    class Broken:
        def observe(self, context, replies):
            raise RuntimeError("observer bug")

        def close(self):
            raise RuntimeError("close bug")

    strategy = Observed(FedSGD(param_keys=["w", "b"], min_available_nodes=1), [Broken()])
    arrays, _ = _round(
        strategy, 1, _global(), lambda node, msg: _reply(msg, _grads(1), _metrics(4, 0))
    )
    assert arrays is not None and "observer bug" in caplog.text
    strategy.close()


@pytest.mark.usefixtures("task_identity")
def test_inconsistent_metric_keys_are_rejected_instead_of_crashing_fedavg() -> None:
    strategy = Observed(FedAvg(min_available_nodes=3))
    weights = {k: v.numpy() for k, v in _global().items()}

    def replies_for(node, msg):
        extra = {"surprise": 1.0} if node == 13 else {}
        return _reply(msg, weights, {**_metrics(4, node), **extra})

    arrays, _ = _round(strategy, 1, _global(), replies_for)
    assert arrays is not None
    assert strategy.rounds[1].clients == 2
    assert "metric keys" in strategy.rounds[1].rejections[0]["reason"]


@pytest.mark.usefixtures("task_identity")
def test_validator_extensions_norm_bound_and_min_replies() -> None:
    validator = ReplyValidator.default(reply_keys=["w", "b"], extra_checks=[norm_bound(10.0)])
    strategy = Observed(FedSGD(param_keys=["w", "b"], min_available_nodes=3), validator=validator)
    g = {11: _grads(1), 12: _grads(2, scale=100.0), 13: _grads(3)}
    _round(strategy, 1, _global(), lambda node, msg: _reply(msg, g[node], _metrics(4, node)))
    assert [r["node_id"] for r in strategy.rounds[1].rejections] == [12]
    assert "exceeds 10" in strategy.rounds[1].rejections[0]["reason"]

    quorum = ReplyValidator.default(reply_keys=["w", "b"], extra_round_checks=[min_replies(4)])
    strict = Observed(FedSGD(param_keys=["w", "b"], min_available_nodes=3), validator=quorum)
    arrays, _ = _round(
        strict, 1, _global(), lambda node, msg: _reply(msg, g[11], _metrics(4, node))
    )
    assert arrays is None and strict.rounds[1].rejected == 3


def _fedavg_replies(requests: list[Message]) -> list[Message]:
    rng = np.random.default_rng(0)
    replies = []
    for i, msg in enumerate(requests):
        weights = {
            "w": rng.standard_normal((2, 3)).astype(np.float32),
            "b": rng.standard_normal(2).astype(np.float32),
            "steps": np.array(4 + i, dtype=np.int64),
        }
        replies.append(_reply(msg, weights, _metrics(3 + 7 * i, i)))
    return replies


@pytest.mark.usefixtures("task_identity")
def test_observed_fedavg_aggregates_bit_for_bit_like_fedavg() -> None:
    plain, wrapped = (
        FedAvg(min_available_nodes=3),
        Observed(FedAvg(min_available_nodes=3), [_Recorder()]),
    )
    requests = list(plain.configure_train(1, _global(), ConfigRecord({"lr": 0.1}), _Grid()))
    wrapped_requests = list(
        wrapped.configure_train(1, _global(), ConfigRecord({"lr": 0.1}), _Grid())
    )
    assert [dict(m.content["config"]) for m in requests] == [
        dict(m.content["config"]) for m in wrapped_requests
    ]
    replies = _fedavg_replies(requests)
    a_arrays, a_metrics = plain.aggregate_train(1, replies)
    b_arrays, b_metrics = wrapped.aggregate_train(1, replies)
    assert list(a_arrays) == list(b_arrays)
    for k in a_arrays:
        assert a_arrays[k].dtype == b_arrays[k].dtype
        assert a_arrays[k].numpy().tobytes() == b_arrays[k].numpy().tobytes()
    assert dict(a_metrics) == dict(b_metrics)


@pytest.mark.usefixtures("task_identity")
def test_full_fedsgd_run_in_process_with_the_real_client_app(inprocess_grid) -> None:
    """Strategy.start end to end without Ray: FedSGD + Observed + the real ClientApp."""
    cfg = task.RunConfig(mode="fedsgd", batch_size=8, server_lr=0.1, clients=3)
    model = task.build_model(cfg, 10, (3, 32, 32), seed=0)

    def nan_reply(reply):
        arrays = reply.content["arrays"]
        first = next(iter(arrays))
        bad = arrays[first].numpy().copy()
        bad.flat[0] = np.nan
        arrays[first] = Array(bad)
        return reply

    def crash(reply):
        raise RuntimeError("node crashed")

    grid = inprocess_grid(client_app, 4, faulty={102: nan_reply, 103: crash})
    recorder = _Recorder()
    strategy = Observed(
        FedSGD(param_keys=[n for n, _ in model.named_parameters()], min_available_nodes=4),
        [recorder],
        sort_replies=True,
    )
    result = strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=2,
        timeout=60,
        train_config=ConfigRecord(cfg.to_config()),
        evaluate_config=ConfigRecord(cfg.to_config()),
    )
    for rnd in (1, 2):
        rec = strategy.rounds[rnd]
        assert (rec.clients, rec.rejected, rec.failed) == (2, 1, 1)
        assert rec.evaluate_clients == 4  # faults were injected into training replies only
    assert [r.partition_id for r in recorder.calls[0][1]] == [0, 3]  # canonical order
    final = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], v) for k, v in model.state_dict().items())


def _stored_reply(request: Message, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    msg = _reply(request, None, metrics)
    record = ArrayRecord()
    for k, v in arrays.items():  # as a simulation reply arrives: views of stored values
        record[k] = StoredArray(v)
    msg.content["arrays"] = record
    return msg


@pytest.mark.usefixtures("task_identity")
def test_flowers_fedavg_reads_stored_replies_without_copies(monkeypatch) -> None:
    from flwr.serverapp.strategy import fedavg

    lent: list[bool] = []
    flowers = fedavg.aggregate_arrayrecords

    def spy(records, key):
        lent.extend(not a.numpy().flags.writeable for r in records for a in r["arrays"].values())
        return flowers(records, key)

    monkeypatch.setattr(fedavg, "aggregate_arrayrecords", spy)
    updates = {i: {**_grads(i), "steps": STEPS.copy()} for i in (11, 12, 13)}
    n = {11: 10, 12: 30, 13: 60}

    def run(strategy, stored: bool):
        make = _stored_reply if stored else _reply
        return _round(
            strategy, 1, _global(), lambda node, msg: make(msg, updates[node], _metrics(n[node], 0))
        )[0]

    ours = run(Observed(FedAvg(min_available_nodes=3)), stored=True)
    assert lent and all(lent)
    lent.clear()
    theirs = run(FedAvg(min_available_nodes=3), stored=False)
    assert lent and not any(lent)
    for k in ("w", "b"):
        np.testing.assert_array_equal(ours[k].numpy(), theirs[k].numpy())


@pytest.mark.usefixtures("task_identity")
def test_a_strategy_that_may_write_into_replies_gets_copies() -> None:
    class Scribbler(FedAvg):  # writes into what numpy() returns, as it may
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            for m in replies:
                for a in m.content["arrays"].values():
                    a.numpy()[...] = 0
            return super().aggregate_train(server_round, replies)

    values = {**_grads(1), "steps": STEPS.copy()}
    before = {k: v.copy() for k, v in values.items()}
    arrays, _ = _round(
        Observed(Scribbler(min_available_nodes=1, min_train_nodes=1)),
        1,
        _global(),
        lambda node, msg: _stored_reply(msg, values, _metrics(4, 0)),
    )
    for k in ("w", "b"):  # the mean of three equal updates: nothing was zeroed
        np.testing.assert_allclose(arrays[k].numpy(), before[k], rtol=1e-6)
        np.testing.assert_array_equal(values[k], before[k])
