"""The ClientApp's train and evaluate handlers, called in-process with constructed messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_message
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from precode_flower import data as data_mod
from precode_flower import task
from precode_flower.clients.client_app import app, evaluate, train
from precode_flower.training import compute_gradients

SHAPE = (3, 32, 32)


def _context(pid: int = 1, n: int = 3, **node_config) -> Context:
    return Context(
        run_id=7,
        node_id=100 + pid,
        node_config={"partition-id": pid, "num-partitions": n, **node_config},
        state=RecordDict(),
        run_config={},
    )


def _message(cfg: task.RunConfig, kind: str = MessageType.TRAIN, round_: int = 1, state=None):
    state = state if state is not None else task.initial_state(cfg, 10, SHAPE)
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({**cfg.to_config(), "server-round": round_}),
        }
    )
    return make_message(content, kind, round_=round_), state


def _arrays(reply) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_fedsgd_reply_is_the_gradient_on_one_seeded_batch() -> None:
    cfg = task.RunConfig(mode="fedsgd", batch_size=8)
    msg, state = _message(cfg)
    reply = train(msg, _context())
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    model = task.build_model(cfg, 10, SHAPE)
    names = [n for n, _ in model.named_parameters()]
    arrays = _arrays(reply)
    assert list(arrays) == names
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "train-loss", "train-accuracy", "partition-id"}
    assert metrics["num-examples"] == 8 and metrics["partition-id"] == 1

    # Same round, same partition: the same update; audit mode reveals the batch, and the
    # update itself does not change.
    audit = task.RunConfig(mode="fedsgd", batch_size=8, audit_ground_truth=True)
    reply2 = train(_message(audit, state=state)[0], _context())
    idx = reply2.content["metrics"]["batch-indices"]
    assert len(idx) == 8 and len(set(idx)) == 8
    for k in names:
        np.testing.assert_array_equal(arrays[k], _arrays(reply2)[k])

    # The indices point into the train split and belong to this client's partition; the
    # gradient is the plain gradient of the loss on those examples.
    part = task.client_data(cfg, 1, 3)
    assert set(idx) <= set(part.train_indices.tolist())
    bundle = data_mod.load(cfg.dataset)
    x, y = bundle.train.tensors
    task.load_state(model, state)
    grads, _ = compute_gradients(model, x[idx], y[idx])
    for name, g in zip(names, grads, strict=True):
        np.testing.assert_allclose(arrays[name], g.numpy(), rtol=1e-4, atol=1e-6)


def test_batches_depend_on_round_and_partition() -> None:
    cfg = task.RunConfig(mode="fedsgd", batch_size=8, audit_ground_truth=True)
    msg, state = _message(cfg)
    a = train(msg, _context(1)).content["metrics"]["batch-indices"]
    b = train(_message(cfg, round_=2, state=state)[0], _context(1)).content["metrics"]
    c = train(msg, _context(2)).content["metrics"]["batch-indices"]
    assert a != b["batch-indices"] and a != c and not set(a) & set(c)


def test_fedavg_reply_is_the_trained_state_dict() -> None:
    cfg = task.RunConfig(local_steps=3, batch_size=16, audit_ground_truth=True, lr=0.1)
    msg, state = _message(cfg)
    reply = train(msg, _context(0))
    arrays = _arrays(reply)
    assert list(arrays) == list(state)
    assert all(arrays[k].dtype == state[k].numpy().dtype for k in state)
    assert any(not np.array_equal(arrays[k], state[k].numpy()) for k in state)
    metrics = dict(reply.content["metrics"])
    part = task.client_data(cfg, 0, 3)
    assert metrics["num-examples"] == len(part.train_indices)
    assert len(metrics["batch-indices"]) == 3 * 16
    assert set(metrics["batch-indices"]) <= set(part.train_indices.tolist())
    again = _arrays(train(msg, _context(0)))
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_fedavg_local_epochs_cover_the_partition() -> None:
    cfg = task.RunConfig(local_epochs=1.0, batch_size=64, audit_ground_truth=True, clients=20)
    msg, _ = _message(cfg)
    reply = train(msg, _context(4, 20))
    idx = reply.content["metrics"]["batch-indices"]
    part = task.client_data(cfg, 4, 20)
    assert sorted(idx) == sorted(part.train_indices.tolist())


def test_precode_defense_changes_the_model_on_both_sides() -> None:
    cfg = task.RunConfig(mode="fedsgd", defenses=("precode",), latent_dim=32, batch_size=4)
    msg, state = _message(cfg)
    assert any(".precode." in k for k in state)
    reply = train(msg, _context())
    assert any(".precode." in k for k in _arrays(reply))


def test_evaluate_reports_on_the_client_test_share() -> None:
    cfg = task.RunConfig()
    msg, _ = _message(cfg, MessageType.EVALUATE)
    metrics = dict(evaluate(msg, _context(2)).content["metrics"])
    assert set(metrics) == {"num-examples", "eval-loss", "eval-accuracy", "partition-id"}
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0
    shares = [task.client_data(cfg, p, 3).test_indices for p in range(3)]
    assert metrics["num-examples"] == len(shares[2])
    joined = np.concatenate(shares)
    assert len(np.unique(joined)) == len(joined) == len(data_mod.load(cfg.dataset).test)


def test_client_app_dispatches_by_message_type() -> None:
    cfg = task.RunConfig(mode="fedsgd", batch_size=4)
    train_reply = app(_message(cfg)[0], _context())
    assert "arrays" in train_reply.content.array_records
    eval_reply = app(_message(cfg, MessageType.EVALUATE)[0], _context())
    assert not eval_reply.content.array_records and "metrics" in eval_reply.content.metric_records


def test_missing_partition_id_is_a_clear_error() -> None:
    ctx = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="partition-id"):
        train(_message(task.RunConfig())[0], ctx)


def test_node_data_dir_overrides_the_run(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        train(_message(task.RunConfig())[0], _context(**{"data-dir": str(tmp_path)}))


def test_bad_config_values_name_the_choices() -> None:
    cfg = task.RunConfig()
    msg, _ = _message(cfg)
    msg.content["config"]["mode"] = "fedprox"
    with pytest.raises(ValueError, match="choose one of: fedavg, fedsgd"):
        train(msg, _context())


def test_run_config_round_trip_and_validation() -> None:
    cfg = task.RunConfig(mode="fedsgd", defenses=("prune", "precode"), local_steps=2)
    again = task.RunConfig.from_mapping({**cfg.to_config(), "server-round": 3})
    assert again == cfg and again.extra == {"server-round": 3}
    assert (
        task.RunConfig.from_mapping({"batch-size": "7", "audit-ground-truth": "true"}).batch_size
        == 7
    )
    for bad, match in [
        ({"model": "vgg"}, "mlp, convnet, resnet18"),
        ({"dataset": "imagenet"}, "cifar10"),
        ({"partition": "x"}, "iid, dirichlet, pathological"),
        ({"fraction": 0}, "fraction"),
        ({"batch-size": 2.5}, "batch-size"),
        ({"defenses": "dp"}, "precode"),
        ({"beta": "nan"}, "beta must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"seed": 2**64}, "seed must be >= 0 and <= 9223372036854775807"),
    ]:
        with pytest.raises(ValueError, match=match):
            task.RunConfig.from_mapping(bad)


def test_faults_are_injected_by_a_test_mod_around_the_production_functions() -> None:
    from faults import faulty_client_app

    faulty = faulty_client_app("nan:1,shape:2:5,raise:0")
    cfg = task.RunConfig(mode="fedsgd", batch_size=4)
    msg, _ = _message(cfg)
    assert np.isnan(next(iter(_arrays(faulty(msg, _context(1))).values()))).any()
    assert all(np.isfinite(a).all() for a in _arrays(faulty(msg, _context(2))).values())
    with pytest.raises(RuntimeError, match="injected"):
        faulty(_message(cfg)[0], _context(0))


def test_updates_do_not_leak_global_torch_rng_state() -> None:
    cfg = task.RunConfig(mode="fedsgd", batch_size=4, defenses=("precode", "noise"))
    msg, _ = _message(cfg)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(msg, _context())
    assert torch.equal(torch.rand(3), expected)


def test_partition_is_kept_in_node_state_and_evaluation_skips_it(monkeypatch) -> None:
    cfg = task.RunConfig(mode="fedsgd", batch_size=4, audit_ground_truth=True)
    ctx = _context(0)
    msg, state = _message(cfg)
    first = train(msg, ctx).content["metrics"]["batch-indices"]

    def no_partitioning(*args, **kwargs):
        raise AssertionError("partitioned again")

    monkeypatch.setattr(task, "train_indices", no_partitioning)
    again = train(_message(cfg, state=state)[0], ctx).content["metrics"]["batch-indices"]
    assert again == first
    evaluate(_message(cfg, MessageType.EVALUATE)[0], _context(2))  # fresh node, no partitioning
    with pytest.raises(AssertionError, match="partitioned again"):
        train(msg, _context(1))  # another partition: not in this node's state
