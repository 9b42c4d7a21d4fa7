"""Secure aggregation with Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

Flower 1.42 implements SecAgg+ only for its legacy API, so a Message-API strategy cannot
host it (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py):
``SecAggPlusWorkflow.__call__`` refuses any context but a ``LegacyContext``, whose
``strategy`` is a legacy ``flwr.server.strategy.Strategy``; its setup stage samples
through that strategy's ``configure_fit(round, Parameters, ClientManager)``; its stage 2
converts replies with ``recorddict_to_fitres`` (legacy ``fitres.*`` records); and its
unmask stage hands the unmasked sum to the legacy ``aggregate_fit(round, [(ClientProxy,
FitRes)], failures)``. The client mod ``secaggplus_mod`` likewise reads the ClientApp's
reply as a legacy ``FitRes``.

So each ``--secagg`` training round runs Flower's own four SecAgg+ stages, unchanged,
through the legacy path, with two adapters that only translate formats:

- server: :class:`_RoundStrategy`, a legacy Strategy that hands the workflow the round's
  train messages (sampled and configured by the run's Message-API strategy, so sampling,
  config and DP wrappers are the same as without SecAgg) as ``FitIns``, and takes the
  unmasked aggregate back; the run's strategy then "aggregates" that single sum (FedAvg:
  unchanged; dp-client: Flower's wrapper adds its noise; FedSGD: the server step);
- client: :func:`secagg_client_mod` runs ``secaggplus_mod`` on SecAgg+ messages only,
  with :func:`_legacy_fit` between it and the ClientApp (``fitins.*`` <-> ``arrays`` /
  ``config``; ``arrays`` / ``metrics`` -> ``fitres.*``).

What the server sees: the weighted sum of the quantised updates (SecAgg+ clips every entry
to [-clipping_range, clipping_range] and quantises it to ``quantization_range`` levels), the
clients' scalar metrics and example counts. Never an individual update; so the reply
checks of :class:`~strategies.validation.ReplyValidator` (norm bound, NaN) cannot run on
them, and a client can poison the sum unseen (a limit of secure aggregation itself). The
observers (the auditor) get the aggregate as one reply marked ``aggregate-only``.

Timeouts: every stage's ``send_and_receive`` waits at most ``round-timeout`` seconds
(the workflow's ``timeout``); a client that is silent in a stage is dropped from it, and
SecAgg+ recovers the sum of the others from the secret shares while at least
``reconstruction_threshold`` neighbours answer, otherwise the round is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from precode_flower import task
from precode_flower.defenses import dp_defense

from .arrays import array_view, arrays_view
from .observed import ClientReply, Observed, RoundContext

log = logging.getLogger(__name__)

__all__ = [
    "AGGREGATE_KEY",
    "SECAGG_CLIPPING_RANGE",
    "secagg_client_mod",
    "secagg_max_weight",
    "secagg_train_round",
]

#: Metric that marks the one reply observers get in a SecAgg+ round: the aggregate.
AGGREGATE_KEY = "aggregate-only"
#: Config key carrying the array names (legacy Parameters have none), newline-separated.
NAMES_KEY = "secagg-array-names"
#: SecAgg+'s per-entry clipping range and quantisation levels (Flower's defaults): weights
#: and gradients are far inside +-8, and 2^22 levels over 16 give steps of 3.8e-6.
SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22
#: Share a client's key with every sampled client (SecAgg+ with the full graph) and need
#: two thirds of them to reconstruct a dropped client's masks.
SECAGG_SHARES = 1.0
SECAGG_THRESHOLD = 2 / 3

_RECORD_KEY_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation constant


# --------------------------------------------------------------------------------------------
# Server


class _RoundStrategy:
    """The legacy Strategy the SecAgg+ workflow calls for one round (built lazily: the
    legacy base class is imported only by SecAgg runs)."""

    @staticmethod
    def make(fit: list[tuple[Any, FitIns]]) -> Any:
        from flwr.server.strategy import Strategy as LegacyStrategy

        class RoundStrategy(LegacyStrategy):
            def __init__(self) -> None:
                self.fit = fit
                self.result: tuple[Parameters, list[tuple[Any, FitRes]]] | None = None

            def initialize_parameters(self, client_manager: Any) -> None:
                return None

            def configure_fit(self, server_round: int, parameters: Any, client_manager: Any):
                return list(self.fit)

            def aggregate_fit(self, server_round: int, results: Any, failures: Any):
                # The workflow sets every result's parameters to the unmasked aggregate.
                if not results:
                    return None, {}
                self.result = (results[0][1].parameters, list(results))
                return results[0][1].parameters, {}

            def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any):
                return []

            def aggregate_evaluate(self, server_round: int, results: Any, failures: Any):
                return None, {}

            def evaluate(self, server_round: int, parameters: Any):
                return None

        return RoundStrategy()


class _StageGrid:
    """The run's grid, noting each SecAgg+ stage's error replies and silent nodes (the
    workflow keeps them to itself) for the round's record."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.stage = 0
        self.failures: list[dict[str, Any]] = []
        self.silent: dict[int, int] = {}  # node -> the first stage it did not answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for r in replies:
            if r.has_error():
                self.failures.append(
                    {
                        "node_id": r.metadata.src_node_id,
                        "stage": self.stage,
                        "reason": r.error.reason,
                    }
                )
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.silent.setdefault(m.metadata.dst_node_id, self.stage)
        self.stage += 1
        return replies


def _workflow(timeout: float, max_weight: float) -> Any:
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=SECAGG_SHARES,
        reconstruction_threshold=SECAGG_THRESHOLD,
        max_weight=max_weight,
        clipping_range=SECAGG_CLIPPING_RANGE,
        quantization_range=SECAGG_QUANTIZATION_RANGE,
        timeout=timeout,
    )


def secagg_train_round(
    observed: Observed,
    grid: Grid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    server_round: int,
    *,
    timeout: float,
    max_weight: float,
) -> ArrayRecord | None:
    """One training round under SecAgg+; returns the new global arrays (None: skipped).

    ``observed``'s inner strategy samples and configures the round as usual; its round
    record gets the counts; its observers get one :class:`ClientReply`, the aggregate,
    with ``num_examples`` the total and the metric :data:`AGGREGATE_KEY`. ``max_weight``:
    an upper bound of any client's ``num-examples`` (SecAgg+ quantises weight / max_weight).
    """
    from flwr.server import LegacyContext, ServerConfig, SimpleClientManager

    # The proxy Flower's own legacy workflows build for a node (not exported by flwr.server;
    # the SecAgg+ workflow only reads its node_id).
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    inner: Strategy = observed.strategy
    rec = observed.record(server_round)
    messages = list(inner.configure_train(server_round, arrays, config, grid))
    rec.sent = len(messages)
    if len(messages) < 2:
        rec.skipped = f"SecAgg+ needs at least 2 sampled clients, got {len(messages)}"
        return None
    sent = messages[0].content
    sent_arrays = sent.array_records.get("arrays", next(iter(sent.array_records.values())))
    sent_config = dict(sent.config_records.get("config", next(iter(sent.config_records.values()))))
    names = list(sent_arrays.keys())
    global_arrays = arrays_view(sent_arrays)
    fit_config = {**sent_config, NAMES_KEY: "\n".join(names)}
    parameters = Parameters(
        tensors=[ndarray_to_bytes(np.asarray(v)) for v in global_arrays.values()],
        tensor_type="numpy.ndarray",
    )
    run_id = int(getattr(grid, "run_id", 0) or 0)
    proxies = {m.metadata.dst_node_id: GridClientProxy(m.metadata.dst_node_id, grid, run_id)
               for m in messages}  # fmt: skip
    fit = [(p, FitIns(parameters, dict(fit_config))) for p in proxies.values()]
    strategy = _RoundStrategy.make(fit)
    manager = SimpleClientManager()
    for proxy in proxies.values():
        manager.register(proxy)
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=server_round),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    context.state.array_records["parameters"] = ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in global_arrays.items()}
    )
    stages = _StageGrid(grid)
    _workflow(timeout, max_weight)(stages, context)
    rec.failures = stages.failures
    rec.failed = len(stages.failures)
    rec.dropped_nodes = [{"node_id": n, "stage": s} for n, s in sorted(stages.silent.items())]
    for f in stages.failures:
        log.warning("round %d: SecAgg+ stage %d: node %d failed: %s", server_round, f["stage"],
                    f["node_id"], f["reason"])  # fmt: skip

    if strategy.result is None:
        rec.dropped = len(stages.silent)
        rec.skipped = "SecAgg+ halted: too few clients answered a stage in time, or failed"
        return None
    summed, results = strategy.result
    values = parameters_to_ndarrays(summed)
    reply_names = list(getattr(inner, "reply_keys", None) or names)  # FedSGD: parameters
    if len(values) != len(reply_names):
        rec.skipped = f"SecAgg+ sum has {len(values)} arrays, expected {len(reply_names)}"
        return None
    aggregate = {
        n: np.asarray(v).astype(global_arrays[n].dtype, copy=False)
        for n, v in zip(reply_names, values, strict=True)
    }
    metrics = [r.metrics for _, r in results]
    total = sum(_int_or_none(m.get("num-examples")) or 0 for m in metrics)
    rec.clients = len(results)
    rec.partitions = [_int_or_none(m.get("partition-id")) for m in metrics]
    failed = {f["node_id"] for f in stages.failures}
    summed_nodes = {proxy.node_id for proxy, _ in results}
    rec.dropped = len({m.metadata.dst_node_id for m in messages} - failed - summed_nodes)
    log.info("round %d: SecAgg+ aggregate of %d clients", server_round, len(results))

    reply_metrics: dict[str, Any] = {
        "num-examples": total,
        AGGREGATE_KEY: 1,
        "clients": len(results),
        **_mean_metrics(metrics, [_int_or_none(m.get("num-examples")) or 0 for m in metrics]),
    }
    indices = [m.get("batch-indices") for m in metrics]
    if indices and all(isinstance(i, str) for i in indices):
        reply_metrics["batch-indices"] = [int(x) for i in indices for x in i.split(",") if x]
    context_round = RoundContext(server_round, global_arrays, dict(sent_config))
    reply = ClientReply(0, None, aggregate, reply_metrics, total)
    for observer in observed.observers:
        try:
            observer.observe(context_round, [reply])
        except Exception:  # an observer must never stop training
            log.exception("round %d: observer %r raised", server_round, observer)

    if len(results) < observed.validator.min_replies:  # (the server has seen the sum)
        rec.skipped = (
            f"only {len(results)} clients in the SecAgg+ sum, "
            f"at least {observed.validator.min_replies} needed"
        )
        return None
    # The run's strategy aggregates the one sum (FedAvg: itself; dp-client: plus noise).
    weight_key = getattr(inner, "weighted_by_key", "num-examples")
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in aggregate.items()}),
            "metrics": MetricRecord(
                {k: v for k, v in reply_metrics.items() if k not in ("batch-indices",)}
                | {weight_key: total}
            ),
        }
    )
    reply_msg = Message(content, reply_to=messages[0])
    new, train_metrics = inner.aggregate_train(server_round, [reply_msg])
    rec.train_metrics = dict(train_metrics) if train_metrics is not None else None
    if new is None:
        rec.skipped = "the strategy produced no new model"
    return new


def secagg_max_weight(cfg: task.RunConfig) -> int:
    """The largest weight a client of ``cfg`` gives SecAgg+ (which quantises weight /
    max_weight: a loose bound costs precision): 1 with DP (uniform weights), the batch for
    FedSGD, else the largest partition (FedAvg trains on all of it)."""
    if dp_defense(cfg.defenses):
        return 1
    if cfg.mode == "fedsgd":
        return cfg.batch_size
    return max(len(task.train_indices(cfg, p, cfg.clients)) for p in range(cfg.clients))


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _mean_metrics(metrics: Sequence[dict[str, Any]], counts: Sequence[int]) -> dict[str, float]:
    """Example-weighted means of the float metrics every client reported."""
    total = sum(counts)
    keys = [k for k, v in metrics[0].items() if isinstance(v, float)] if metrics else []
    return {
        k: sum(float(m[k]) * c for m, c in zip(metrics, counts, strict=True)) / total
        for k in keys
        if total and all(isinstance(m.get(k), float) for m in metrics)
    }


# --------------------------------------------------------------------------------------------
# Client


def secagg_client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` on SecAgg+ train messages; every other message passes."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    if _RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, lambda m, c: _legacy_fit(m, c, call_next))


def _legacy_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp's train call for a SecAgg+ stage-2 message (legacy ``fitins.*``
    records), its reply as the legacy ``fitres.*`` records that ``secaggplus_mod`` reads."""
    content = msg.content
    config = dict(content.config_records["fitins.config"])
    names = str(config.pop(NAMES_KEY, "")).split("\n")
    record = content.array_records["fitins.parameters"]
    values = [array_view(a) for a in record.values()]
    if len(values) != len(names):
        raise ValueError(f"SecAgg+ message has {len(values)} arrays for {len(names)} names")
    received = ArrayRecord({n: Array(np.asarray(v)) for n, v in zip(names, values, strict=True)})
    inner = Message(
        content=RecordDict({"arrays": received, "config": ConfigRecord(config)}),
        metadata=msg.metadata,
    )
    reply = call_next(inner, context)
    if reply.has_error():
        return reply
    arrays = arrays_view(reply.content["arrays"])  # FedSGD: the parameters' gradients
    metrics = dict(reply.content["metrics"])
    legacy_metrics: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | float | str):
            legacy_metrics[k] = v
        elif k == "batch-indices":  # the evaluation channel's list, as a string
            legacy_metrics[k] = ",".join(str(int(i)) for i in v)
    out = RecordDict()
    out.config_records["fitres.metrics"] = ConfigRecord(legacy_metrics)
    # SecAgg+ weights the sum by this; DP's noise is calibrated to the unweighted mean.
    weight = 1 if dp_defense(str(config.get("defenses", ""))) else int(metrics["num-examples"])
    out.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    out.array_records["fitres.parameters"] = ArrayRecord(
        {str(i): Array(np.asarray(v)) for i, v in enumerate(arrays.values())}
    )
    out.config_records["fitres.status"] = ConfigRecord({"code": int(Code.OK.value), "message": ""})
    return Message(out, reply_to=msg)
