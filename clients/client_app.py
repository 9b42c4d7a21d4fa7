"""The Flower ClientApp: thin glue around :mod:`precode_flower.task`.

Messages (Flower 1.42 Message API):

- train: content ``{"arrays": ArrayRecord (global state dict), "config": ConfigRecord}``
  where the config is :meth:`RunConfig.to_config` plus ``server-round``. Reply
  ``{"arrays": ArrayRecord, "metrics": MetricRecord}``: FedSGD the gradient on one local
  batch (parameter names), FedAvg the state dict after local training. Metrics:
  ``num-examples`` (FedSGD: batch size; FedAvg: partition size), ``train-loss``,
  ``train-accuracy``, ``partition-id`` and, only with ``audit-ground-truth``,
  ``batch-indices`` (indices into the dataset's train split; see :mod:`precode_flower.task`).
- query: no content; reply ``{"metrics": MetricRecord}`` with ``partition-id`` and
  ``num-partitions`` (the server orders nodes by partition before sampling).
- evaluate: same content; reply ``{"metrics": MetricRecord}`` with ``num-examples``,
  ``eval-loss``, ``eval-accuracy``, ``partition-id`` on the client's test share.

Mods: SecAgg+ train messages (``--secagg``) go through Flower's ``secaggplus_mod``
(:mod:`precode_flower.strategies.secagg`), and in ``dp-client`` runs the reply through
Flower's clipping mod (:mod:`precode_flower.strategies.privacy`); other messages pass.

Node-local settings come from ``context.node_config``: ``partition-id`` and
``num-partitions`` (set by the simulation engine, or ``--node-config`` of
``flower-supernode``) and optionally ``data-dir`` (overrides the run's ``data-dir``).
The partition's train indices are kept in ``context.state`` so that later messages to
the node need not partition again.

Nothing in a message can make this app fail on purpose: unknown config keys (an old
server's ``fault-injection``, say) are ignored. Robustness tests inject faults with a
test-only mod around these functions (``tests/faults.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from precode_flower import heap, task
from precode_flower.strategies.arrays import arrays_view
from precode_flower.strategies.privacy import dp_client_mod
from precode_flower.strategies.ray_transport import share_arrays
from precode_flower.strategies.secagg import secagg_client_mod

# Flower's SecAgg+ mod (SecAgg+ messages only) outside Flower's DP clipping mods (dp-client
# runs only), so that a client clips its update before SecAgg+ masks it.
app = ClientApp(mods=[secagg_client_mod, dp_client_mod])


def _node_settings(context: Context) -> tuple[int, int, str | None]:
    cfg = context.node_config
    try:
        pid, n = int(cfg["partition-id"]), int(cfg["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node_config lacks {err}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<N>"'
        ) from None
    data_dir = cfg.get("data-dir")
    return pid, n, str(data_dir) if data_dir else None


_STATE_KEY = "precode.partition"  # node state: {"key": ConfigRecord, "indices": ArrayRecord}


def _cached_train_indices(
    cfg: task.RunConfig, pid: int, n: int, data_dir: str | None, context: Context
) -> np.ndarray:
    """The partition's train indices, kept in the node's state across messages.

    In deployment every message runs in a fresh ``flwr-clientapp`` process, so an in-process
    cache is lost; partitioning again would re-import Hugging Face ``datasets`` each time.
    """
    key = task.partition_key(cfg, pid, n, data_dir)
    state = context.state
    if f"{_STATE_KEY}.key" in state and state[f"{_STATE_KEY}.key"].get("key") == key:
        return state[f"{_STATE_KEY}.indices"]["train"].numpy()
    indices = task.train_indices(cfg, pid, n, data_dir)
    state[f"{_STATE_KEY}.key"] = ConfigRecord({"key": key})
    state[f"{_STATE_KEY}.indices"] = ArrayRecord({"train": Array(np.asarray(indices))})
    return indices


def _setup(
    msg: Message, context: Context, *, with_train: bool
) -> tuple[task.RunConfig, task.ClientData, Any, int]:
    # A simulation actor serves many clients in turn: give a large free part of its heap
    # back (trimming every time costs more in page faults than it saves).
    heap.release_freed_memory(min_free=heap.TRIM_MIN_FREE)
    config = msg.content["config"]
    cfg = task.RunConfig.from_mapping(dict(config))
    pid, n, data_dir = _node_settings(context)
    train = _cached_train_indices(cfg, pid, n, data_dir, context) if with_train else None
    data = task.client_data(cfg, pid, n, data_dir, train=train, with_train=with_train)
    model = task.get_model(cfg, data.num_classes, data.input_shape)
    return cfg, data, model, int(config.get("server-round", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Compute this client's update (FedSGD gradient or FedAvg weights) for the round."""
    cfg, data, model, server_round = _setup(msg, context, with_train=True)
    state = arrays_view(msg.content["arrays"])
    update = task.compute_update(model, state, data, cfg, server_round)
    # One copy: into Ray's object store in a simulation actor, else into .npy bytes.
    arrays = share_arrays(update.arrays)
    metrics = MetricRecord(update.metrics(data.partition_id, cfg.audit_ground_truth))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's test share."""
    cfg, data, model, _ = _setup(msg, context, with_train=False)
    stats = task.evaluate_client(model, arrays_view(msg.content["arrays"]), data)
    metrics = MetricRecord(
        {
            "num-examples": int(stats.examples),
            "eval-loss": float(stats.loss),
            "eval-accuracy": float(stats.accuracy),
            "partition-id": data.partition_id,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (it orders nodes by it before sampling, so
    that the same seed samples the same partitions whatever the node ids)."""
    pid, n, _ = _node_settings(context)
    metrics = MetricRecord({"partition-id": pid, "num-partitions": n})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
