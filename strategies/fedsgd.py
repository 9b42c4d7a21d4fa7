"""FedSGD on Flower's Message API: clients send gradients, the server owns the optimiser.

Each round the clients reply with the gradient of their loss on one local batch (names of
the model's trainable parameters). :class:`FedSGD` averages the gradients weighted by
``num-examples`` (in float64, in partition order so sums are reproducible) and applies the
average to the global model with a persistent server optimiser (SGD with optional
momentum, or Adam) whose state carries over between rounds.

Flower's ``aggregate_train`` does not receive the global model, so :class:`FedSGD` keeps
the model it sends in ``configure_train`` (sampling, messages and evaluation are
FedAvg's). A round whose averaged gradient is not finite leaves the model unchanged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .arrays import array_view, arrays_view, to_array_record

log = logging.getLogger(__name__)

__all__ = ["IDENTITY_METRICS", "FedSGD", "aggregate_metrics"]

#: Metrics that identify a client or carry per-client lists; never averaged.
IDENTITY_METRICS = frozenset({"partition-id", "batch-indices"})


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of the scalar metrics that every reply has.

    Unlike Flower's default, skips identity metrics (``partition-id``) and list-valued
    metrics (``batch-indices``, whose lengths differ between clients), and reports the
    total of ``weighted_by_key`` (alone where that total is 0: nothing to average with).
    """
    metric_records = [next(iter(r.metric_records.values())) for r in records]
    if not metric_records:
        return MetricRecord()
    weights = [float(m[weighted_by_key]) for m in metric_records]
    total = sum(weights)
    keys = [
        k
        for k, v in metric_records[0].items()
        if k not in IDENTITY_METRICS
        and k != weighted_by_key
        and isinstance(v, int | float)
        and all(isinstance(m.get(k), int | float) for m in metric_records)
    ]
    out = MetricRecord({weighted_by_key: int(total) if total.is_integer() else total})
    if not total > 0:  # no weight to average with (e.g. clients with no test examples)
        return out
    for k in keys:
        out[k] = sum(w * float(m[k]) for w, m in zip(weights, metric_records, strict=True)) / total
    return out


class FedSGD(FedAvg):
    """Federated SGD: average client gradients, step a server optimiser on the global model.

    Args:
        param_keys: names of the trainable parameters (the gradients' names); other arrays
            sent (buffers) are passed through unchanged. ``None``: every floating array.
        server_lr: learning rate of the server optimiser.
        server_momentum: SGD momentum (ignored by Adam).
        optimizer: ``"sgd"`` or ``"adam"``.
        Other arguments: as Flower's ``FedAvg`` (sampling, record keys, metric aggregation);
        metric aggregation defaults to :func:`aggregate_metrics`.
    """

    def __init__(
        self,
        *,
        param_keys: Sequence[str] | None = None,
        server_lr: float = 0.1,
        server_momentum: float = 0.0,
        optimizer: str = "sgd",
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn or aggregate_metrics,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn or aggregate_metrics,
        )
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose one of: sgd, adam")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.param_keys = tuple(param_keys) if param_keys is not None else None
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.optimizer_name = optimizer
        self._global: OrderedDict[str, np.ndarray] | None = None
        self._params: OrderedDict[str, torch.nn.Parameter] = OrderedDict()
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def reply_keys(self) -> tuple[str, ...] | None:
        """The array names a valid reply carries (for :class:`~strategies.observed.Observed`)."""
        return self.param_keys

    def summary(self) -> None:
        super().summary()
        log.info(
            "FedSGD server optimiser: %s(lr=%g, momentum=%g)",
            self.optimizer_name,
            self.server_lr,
            self.server_momentum,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._set_global(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _set_global(self, arrays: ArrayRecord) -> None:
        """Keep the global model; (re)build the optimiser only if the parameters changed."""
        self._global = OrderedDict(arrays_view(arrays))
        keys = self.param_keys
        if keys is None:
            keys = tuple(k for k, a in self._global.items() if np.issubdtype(a.dtype, np.floating))
        missing = [k for k in keys if k not in self._global]
        if missing:
            raise ValueError(f"FedSGD: the global model lacks parameters {missing[:4]}")
        shapes = {k: self._global[k].shape for k in keys}
        if list(self._params) != list(keys) or any(
            tuple(p.shape) != shapes[k] for k, p in self._params.items()
        ):
            self._params = OrderedDict(
                (k, torch.nn.Parameter(torch.from_numpy(self._global[k].copy()))) for k in keys
            )
            params = list(self._params.values())
            if self.optimizer_name == "adam":
                self._optimizer = torch.optim.Adam(params, lr=self.server_lr)
            else:
                self._optimizer = torch.optim.SGD(
                    params, lr=self.server_lr, momentum=self.server_momentum
                )
        else:  # same parameters: copy values in place, keep the optimiser state
            with torch.no_grad():
                for k, p in self._params.items():
                    np.copyto(p.detach().numpy(), self._global[k])

    def state_dict(self) -> dict[str, Any]:
        """The server optimiser's state (for checkpoints); empty before the first round."""
        if self._optimizer is None:
            return {}
        return {
            "optimizer": self.optimizer_name,
            "param_keys": list(self._params),
            "state": self._optimizer.state_dict(),
        }

    def load_state_dict(self, arrays: ArrayRecord, state: dict[str, Any]) -> None:
        """Restore the optimiser of a checkpoint whose global model is ``arrays``.

        Raises ValueError (leaving this strategy as it was) if ``state`` belongs to another
        optimiser or other parameters.
        """
        if not state:
            return
        if state.get("optimizer") != self.optimizer_name:
            raise ValueError(
                f"checkpoint has a {state.get('optimizer')!r} server optimiser, "
                f"this run uses {self.optimizer_name!r}"
            )
        saved = (self._global, self._params, self._optimizer)
        try:
            self._set_global(arrays)
            if list(self._params) != list(state.get("param_keys", [])):
                raise ValueError("checkpoint optimiser state is for other parameters")
            assert self._optimizer is not None
            self._optimizer.load_state_dict(state["state"])
            for p in self._params.values():  # torch does not check state shapes itself
                for name, t in self._optimizer.state.get(p, {}).items():
                    if torch.is_tensor(t) and t.dim() and tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"optimiser state {name!r} has shape {tuple(t.shape)}")
        except Exception as err:
            self._global, self._params, self._optimizer = saved
            if isinstance(err, ValueError):
                raise
            raise ValueError(f"cannot restore the server optimiser: {err}") from err

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the replies' gradients, applied with the server optimiser."""
        if self._global is None or self._optimizer is None:
            raise RuntimeError("FedSGD.aggregate_train called before configure_train")
        usable: list[tuple[Any, Message, float]] = []
        for msg in replies:
            reason = self._unusable(msg)
            if reason:
                log.warning(
                    "FedSGD round %d: skipping reply of node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    reason,
                )
                continue
            metrics = msg.content.metric_records[self._metric_key(msg)]
            pid = metrics.get("partition-id")
            order = (
                float(pid) if isinstance(pid, int | float) else float("inf"),
                msg.metadata.src_node_id,
            )
            usable.append((order, msg, float(metrics[self.weighted_by_key])))
        if not usable:
            return None, None
        usable.sort(key=lambda u: u[0])  # reproducible float sums, whatever the arrival order
        total = sum(w for _, _, w in usable)
        mean: dict[str, np.ndarray] = {}
        for _, msg, w in usable:
            record = msg.content[self.arrayrecord_key]
            for k in self._params:
                g = array_view(record[k]).astype(np.float64) * (w / total)
                mean[k] = g if k not in mean else mean[k] + g
        if not all(np.isfinite(g).all() for g in mean.values()):
            log.warning(
                "FedSGD round %d: averaged gradient not finite; model unchanged", server_round
            )
            return None, self.train_metrics_aggr_fn(
                [m.content for _, m, _ in usable], self.weighted_by_key
            )
        self._optimizer.zero_grad(set_to_none=False)
        for k, p in self._params.items():
            p.grad = torch.from_numpy(mean[k]).to(p.dtype)
        self._optimizer.step()
        new = OrderedDict()
        for k, a in self._global.items():
            new[k] = self._params[k].detach().numpy().astype(a.dtype) if k in self._params else a
        self._global = new
        arrays = to_array_record(new)
        metrics = self.train_metrics_aggr_fn(
            [m.content for _, m, _ in usable], self.weighted_by_key
        )
        return arrays, metrics

    def _metric_key(self, msg: Message) -> str:
        return next(iter(msg.content.metric_records))

    def _unusable(self, msg: Message) -> str | None:
        """Why a reply cannot be aggregated (FedSGD works even without Observed)."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        content = msg.content
        if self.arrayrecord_key not in content.array_records or len(content.metric_records) != 1:
            return "missing arrays or metrics record"
        record = content[self.arrayrecord_key]
        if set(record) != set(self._params):
            return "gradient names differ from the model's parameters"
        for k, p in self._params.items():
            if tuple(record[k].shape) != tuple(p.shape):
                return (
                    f"gradient {k!r} has shape {tuple(record[k].shape)}, expected {tuple(p.shape)}"
                )
        w = content.metric_records[self._metric_key(msg)].get(self.weighted_by_key)
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            return f"bad {self.weighted_by_key!r}: {w!r}"
        return None
