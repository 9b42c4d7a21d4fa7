"""``Observed``: wrap any Message-API strategy to validate replies and show them to observers.

The wrapper is the server's single inspection point (the honest-but-curious auditor and
the reliability layer are observers): per round it

1. remembers the arrays and config it sent (:class:`RoundContext`) in ``configure_train``;
2. in ``aggregate_train`` drops error replies (logging the node id), validates every other
   reply with a :class:`~strategies.validation.ReplyValidator` (missing records, wrong
   array names / shapes / dtypes versus what was sent, NaN/Inf, ...), logs each rejection
   with node id, partition id, round and reason, hands the valid replies (as
   :class:`ClientReply`) to each observer, and calls the wrapped strategy's
   ``aggregate_train`` with only the valid reply messages, unchanged; then empties the
   replies' array records (:func:`~strategies.replies.release_arrays`), so that a round's
   updates do not outlive it;
3. records per round how many clients were accepted, rejected, failed (error replies) and
   dropped (no reply before the timeout), naming each by node id and, where known from
   any earlier reply, partition id, in :attr:`Observed.rounds`;
   evaluate replies are validated the same way (``evaluate_validator``: one MetricRecord,
   finite metrics, a bounded positive weight, consistent keys), and a bad one is rejected
   and logged instead of ending the run inside the strategy's ``aggregate_evaluate``;
4. skips the round (no new global model, reason recorded) when fewer valid replies than
   the validator's ``min_replies`` remain, or when the aggregate is not finite (e.g. float
   overflow of large but finite updates), so the global model never becomes NaN/Inf.

It never changes what is aggregated beyond leaving out invalid replies: ``Observed(FedAvg())``
aggregates exactly like ``FedAvg()`` given the same valid replies. With
``sort_replies=True`` the valid replies are passed in a canonical order (partition id,
then node id) instead of arrival order, which makes floating-point sums, and so whole
runs, reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .arrays import array_view, arrays_view, lend_values
from .replies import release_arrays
from .validation import ReplyValidator

log = logging.getLogger(__name__)

#: Strategy classes whose ``aggregate_train`` only reads the reply arrays' ``numpy()``
#: values; they get them without a copy (:func:`~strategies.arrays.lend_values`).
READS_REPLY_ARRAYS_ONLY: frozenset[type] = frozenset({FedAvg})

__all__ = ["ClientReply", "Observed", "Observer", "RoundContext", "RoundRecord"]


@dataclass(frozen=True)
class RoundContext:
    """What the server sent this round."""

    server_round: int
    global_arrays: dict[str, np.ndarray]  # the model the clients received (ordered as sent)
    train_config: dict[str, Any]  # the ConfigRecord sent with it, as a plain dict


@dataclass(frozen=True)
class ClientReply:
    """One client's reply as the server received it."""

    node_id: int
    partition_id: int | None  # if the client reported it in its metrics
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    num_examples: int


class Observer(Protocol):
    def observe(self, context: RoundContext, replies: list[ClientReply]) -> None:
        """Called once per round with the valid replies; must not block long."""
        ...

    def close(self) -> None:
        """Called at the end of the run."""
        ...


@dataclass
class RoundRecord:
    """What happened to the replies of one round (for the round log)."""

    server_round: int
    sent: int = 0
    clients: int = 0  # accepted and aggregated
    partitions: list[int | None] = field(default_factory=list)  # of the accepted replies
    rejected: int = 0
    failed: int = 0  # error replies
    dropped: int = 0  # sent but no reply
    rejections: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    dropped_nodes: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None  # why the round produced no new model, if it did not
    train_metrics: dict[str, Any] | None = None
    evaluate_clients: int = 0  # evaluate replies accepted
    evaluate_failed: int = 0
    evaluate_failures: list[dict[str, Any]] = field(default_factory=list)
    evaluate_rejected: int = 0
    evaluate_rejections: list[dict[str, Any]] = field(default_factory=list)
    evaluate_metrics: dict[str, Any] | None = None


def _partition_of(msg: Message, key: str) -> int | None:
    try:
        pid = msg.content[key]["partition-id"]
    except Exception:  # noqa: BLE001 - any malformed content simply has no partition id
        return None
    return int(pid) if isinstance(pid, int | float) and not isinstance(pid, bool) else None


def _node_of(msg: Message, origin: dict[str, int]) -> int:
    """The node ``msg`` answers for: the destination of the message it replies to (see
    ``Observed._requests``), else its source. Read, never written into the message:
    Flower's metadata has no public setter for it."""
    return origin.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def _inexact(a: Any) -> bool:
    return np.issubdtype(np.dtype(a.dtype), np.inexact)


def _sort_key(pid: int | None, node_id: int) -> tuple[int, int, int]:
    return (pid is None, pid if pid is not None else 0, node_id)


class Observed(Strategy):
    """Wraps ``strategy``: validates train replies and shows the valid ones to ``observers``.

    Every Strategy method is delegated to ``strategy``; attributes not defined here are
    read from it too. ``validator`` defaults to :meth:`ReplyValidator.default` with the
    wrapped strategy's ``reply_keys`` (FedSGD replies carry only parameter names) and
    ``weighted_by_key`` when it has them.
    """

    def __init__(
        self,
        strategy: Strategy,
        observers: Sequence[Observer] = (),
        validator: ReplyValidator | None = None,
        *,
        sort_replies: bool = False,
        evaluate_validator: ReplyValidator | None = None,
    ) -> None:
        self.strategy = strategy
        self.observers = list(observers)
        weighted_by_key = getattr(strategy, "weighted_by_key", "num-examples")
        self.validator = validator or ReplyValidator.default(
            reply_keys=getattr(strategy, "reply_keys", None), weighted_by_key=weighted_by_key
        )
        self.evaluate_validator = evaluate_validator or ReplyValidator.for_evaluation(
            weighted_by_key
        )
        self.sort_replies = sort_replies
        self.rounds: dict[int, RoundRecord] = {}
        #: node id -> partition id, from every reply that reported one (for the logs).
        self.partitions: dict[int, int] = {}
        self._contexts: dict[int, RoundContext] = {}
        # The messages sent per (phase, round): the grid gives them their ids when it pushes
        # them, and a reply names the id it answers. The SuperLink answers for a node that
        # went offline with an error whose source is itself, not the node.
        self._requests: dict[tuple[str, int], list[Message]] = {}
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: expose the wrapped strategy's.
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def record(self, server_round: int) -> RoundRecord:
        """The round's record (created on first use)."""
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    # --- Strategy API ---------------------------------------------------------------------

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent_arrays, sent_config = arrays, config
        if messages and messages[0].has_content():
            content = messages[0].content
            if content.array_records:
                sent_arrays = content.array_records.get(
                    "arrays", next(iter(content.array_records.values()))
                )
            if content.config_records:
                sent_config = content.config_records.get(
                    "config", next(iter(content.config_records.values()))
                )
        self._contexts[server_round] = RoundContext(
            server_round=server_round,
            global_arrays=arrays_view(sent_arrays),
            train_config=dict(sent_config),
        )
        self._requests["train", server_round] = messages
        self.record(server_round).sent = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays: ArrayRecord | None = None
        try:
            arrays, metrics = self._aggregate_train(server_round, replies)
            return arrays, metrics
        finally:
            # Done with the round's model-sized replies: let them go now, not at the next
            # cyclic GC (a strategy may hand back a reply's own record: that one stays).
            release_arrays(replies, keep=arrays)

    def _aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        context = self._contexts.pop(server_round, None) or RoundContext(server_round, {}, {})
        rec = self.record(server_round)
        origin = self._origins("train", server_round)
        sent = set(origin.values())
        akey, mkey = self.validator.array_record_key, self.validator.metric_record_key
        self._learn_partitions(replies, mkey)
        missing = sorted(sent - {_node_of(m, origin) for m in replies})
        rec.dropped = len(missing)
        for node in missing:
            rec.dropped_nodes.append(self._who(node))
            log.warning(
                "round %d: no reply from node %d (partition %s) before the timeout",
                server_round,
                node,
                self._pid_text(node),
            )

        candidates: list[tuple[Message, ClientReply]] = []
        for msg in replies:
            node = _node_of(msg, origin)
            if msg.has_error():
                reason = msg.error.reason
                rec.failures.append({**self._who(node), "reason": reason})
                log.warning(
                    "round %d: client node %d failed: %s (partition %s)",
                    server_round,
                    node,
                    reason,
                    self._pid_text(node),
                )
                continue
            reason = self.validator.check_message(msg, context)
            reply = None
            if reason is None:
                try:
                    reply = self._to_reply(msg, akey, mkey)
                except Exception as err:  # noqa: BLE001 - undecodable arrays are a rejection
                    reason = f"cannot decode reply: {err}"
            if reply is not None:
                reason = self.validator.check_reply(context, reply)
            if reason:
                self._reject(rec, node, _partition_of(msg, mkey), reason)
                continue
            candidates.append((msg, reply))  # type: ignore[arg-type]

        late = self.validator.check_round(context, [r for _, r in candidates])
        for i, reason in sorted(late.items()):
            self._reject(rec, candidates[i][1].node_id, candidates[i][1].partition_id, reason)
        valid = [c for i, c in enumerate(candidates) if i not in late]
        if self.sort_replies:
            valid.sort(key=lambda c: _sort_key(c[1].partition_id, c[1].node_id))
        rec.clients = len(valid)
        rec.partitions = [r.partition_id for _, r in valid]
        rec.failed = len(rec.failures)
        rec.rejected = len(rec.rejections)
        log.info(
            "round %d: %d replies accepted, %d rejected, %d failed, %d dropped",
            server_round,
            rec.clients,
            rec.rejected,
            rec.failed,
            rec.dropped,
        )

        accepted = [r for _, r in valid]
        for observer in self.observers:
            try:
                observer.observe(context, accepted)
            except Exception:  # an observer must never stop training
                log.exception("round %d: observer %r raised", server_round, observer)

        if len(valid) < self.validator.min_replies:
            return self._skip(
                rec,
                f"only {len(valid)} valid replies, at least {self.validator.min_replies} needed",
            ), None
        # Flower's FedAvg only reads the replies' arrays: lend it the stored values rather
        # than a copy of every update (a subclass may do otherwise, so the exact class).
        lend = lend_values() if type(self.strategy) in READS_REPLY_ARRAYS_ONLY else nullcontext()
        with lend:
            arrays, metrics = self.strategy.aggregate_train(server_round, [m for m, _ in valid])
        rec.train_metrics = dict(metrics) if metrics is not None else None
        if arrays is None:
            self._skip(rec, "the strategy produced no new model")
        elif not all(np.isfinite(array_view(a)).all() for a in arrays.values() if _inexact(a)):
            # Large finite updates can still overflow in the weighted sum.
            return self._skip(rec, "the aggregated model is not finite"), metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._requests["evaluate", server_round] = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        origin = self._origins("evaluate", server_round)
        replies = list(replies)
        if self.sort_replies:
            replies.sort(key=lambda m: _sort_key(_partition_of(m, "metrics"), _node_of(m, origin)))
        rec = self.record(server_round)
        validator = self.evaluate_validator
        mkey = validator.metric_record_key
        self._learn_partitions(replies, mkey)
        context = RoundContext(server_round, {}, {})
        rec.evaluate_failures, rec.evaluate_rejections = [], []
        candidates: list[tuple[Message, ClientReply]] = []
        for msg in replies:
            node = _node_of(msg, origin)
            if msg.has_error():
                rec.evaluate_failures.append({**self._who(node), "reason": msg.error.reason})
                continue
            reason = validator.check_message(msg, context)
            reply = None
            if reason is None:
                reply = self._to_reply(msg, None, mkey)
                reason = validator.check_reply(context, reply)
            if reason:
                self._reject(rec, node, _partition_of(msg, mkey), reason, phase="evaluate")
                continue
            candidates.append((msg, reply))  # type: ignore[arg-type]
        late = validator.check_round(context, [r for _, r in candidates])
        for i, reason in sorted(late.items()):
            reply = candidates[i][1]
            self._reject(rec, reply.node_id, reply.partition_id, reason, phase="evaluate")
        valid = [m for i, (m, _) in enumerate(candidates) if i not in late]
        rec.evaluate_failed = len(rec.evaluate_failures)
        rec.evaluate_rejected = len(rec.evaluate_rejections)
        rec.evaluate_clients = len(valid)
        metrics = None
        if valid:
            try:
                metrics = self.strategy.aggregate_evaluate(server_round, valid)
            except Exception:  # client metrics are a report: never end the run for them
                log.exception("round %d: aggregating the evaluate replies failed", server_round)
        rec.evaluate_metrics = dict(metrics) if metrics is not None else None
        return metrics

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _to_reply(msg: Message, akey: str | None, mkey: str) -> ClientReply:
        metrics = dict(msg.content[mkey])
        pid = metrics.get("partition-id")
        weight = metrics.get("num-examples", 0)
        return ClientReply(
            node_id=msg.metadata.src_node_id,
            partition_id=int(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None,
            arrays=arrays_view(msg.content[akey]) if akey is not None else {},
            metrics=metrics,
            num_examples=int(weight)
            if isinstance(weight, int | float) and math.isfinite(weight)
            else 0,
        )

    def _origins(self, phase: str, server_round: int) -> dict[str, int]:
        """{message id: destination node} of the messages sent in this phase and round."""
        sent = self._requests.pop((phase, server_round), [])
        return {
            m.metadata.message_id or f"unsent-{i}": m.metadata.dst_node_id
            for i, m in enumerate(sent)
        }

    def _learn_partitions(self, replies: list[Message], key: str) -> None:
        for msg in replies:
            if not msg.has_error():
                pid = _partition_of(msg, key)
                if pid is not None:
                    self.partitions[msg.metadata.src_node_id] = pid

    def _who(self, node: int) -> dict[str, Any]:
        return {"node_id": node, "partition_id": self.partitions.get(node)}

    def _pid_text(self, node: int) -> str:
        pid = self.partitions.get(node)
        return str(pid) if pid is not None else "?"

    def _skip(self, rec: RoundRecord, reason: str) -> None:
        """Record that round ``rec`` leaves the global model unchanged (returns None)."""
        rec.skipped = reason
        log.warning("round %d skipped, global model unchanged: %s", rec.server_round, reason)

    def _reject(
        self, rec: RoundRecord, node: int, pid: int | None, reason: str, phase: str = "train"
    ) -> None:
        pid = pid if pid is not None else self.partitions.get(node)
        entry = {"node_id": node, "partition_id": pid, "reason": reason}
        (rec.rejections if phase == "train" else rec.evaluate_rejections).append(entry)
        log.warning(
            "round %d: rejected %sreply of node %d (partition %s): %s",
            rec.server_round,
            "" if phase == "train" else f"{phase} ",
            node,
            pid if pid is not None else "?",
            reason,
        )

    def close(self) -> None:
        """Close every observer (once); call at the end of the run."""
        if self._closed:
            return
        self._closed = True
        for observer in self.observers:
            try:
                observer.close()
            except Exception:
                log.exception("observer %r raised on close", observer)
