"""Server-side checks of client replies, in one place: :class:`ReplyValidator`.

A reply passes three stages (the first failing check's reason is logged and the reply is
dropped from aggregation; see :class:`strategies.observed.Observed`):

1. :meth:`ReplyValidator.check_message`: the message has exactly one ArrayRecord under
   ``arrays`` and one MetricRecord under ``metrics`` (what Flower's FedAvg requires), and
   its records hold at most ``max_reply_bytes`` (counted on the serialised arrays before
   anything is decoded, so an oversized reply costs no further memory).
2. per-reply checks, each ``(RoundContext, ClientReply) -> reason | None``: array names,
   shapes and dtypes versus what the server sent, finite values, a positive weight that
   is at most what a client can hold (:func:`weight_bound`: a client's ``num-examples``
   is its FedAvg weight, so an inflated claim would hand it the whole average).
3. round checks, each ``(RoundContext, [ClientReply]) -> {index: reason}``: checks that
   need all replies (all replies must carry the same metric keys, or Flower's aggregation
   raises).

After the stages, :attr:`ReplyValidator.min_replies` is the quorum: with fewer valid
replies the round is skipped and the global model stays as it was.
:meth:`ReplyValidator.from_limits` builds the validator of the CLI flags
(``--max-update-norm``, ``--max-reply-mb``, ``--min-replies``, ``--max-examples``).
:meth:`ReplyValidator.for_evaluation` checks evaluate replies the same way (one
MetricRecord, finite metrics, a bounded positive weight).

Bounds on single replies do not make an average robust to Byzantine clients: a client
within every bound can still steer the mean. For that, Flower's robust strategies
(``FedTrimmedAvg``, ``FedMedian``, ``Krum``/``MultiKrum``, ``Bulyan``) can be wrapped in
:class:`~strategies.observed.Observed` like any other (``--aggregation``).

To add a check (norm bound, byte size, ...), write a function of the stage-2 or stage-3
signature and pass it in ``checks`` / ``round_checks`` (or add it to
:meth:`ReplyValidator.default`); :func:`norm_bound`, :func:`max_bytes` and
:func:`min_replies` are ready-made examples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from .arrays import serialised_size

if TYPE_CHECKING:  # the dataclasses live in observed.py, which imports this module
    from .observed import ClientReply, RoundContext

ReplyCheck = Callable[["RoundContext", "ClientReply"], "str | None"]
RoundCheck = Callable[["RoundContext", "list[ClientReply]"], "dict[int, str]"]

__all__ = [
    "ReplyCheck",
    "ReplyValidator",
    "RoundCheck",
    "AUTO",
    "array_specs",
    "consistent_metric_keys",
    "finite_values",
    "metric_bounds",
    "max_bytes",
    "min_replies",
    "norm_bound",
    "positive_weight",
    "reply_bytes",
    "weight_bound",
]

#: ``max_reply_bytes`` value meaning "twice the bytes of the model sent, plus 8 MiB".
AUTO = "auto"
_AUTO_SLACK = 8 << 20  # metrics (e.g. batch-indices lists) on top of the arrays


def array_specs(reply_keys: Sequence[str] | None = None) -> ReplyCheck:
    """Reply arrays must be exactly ``reply_keys`` (default: the names sent), each with the
    shape and dtype of the array of that name that the server sent."""
    expected_keys = tuple(reply_keys) if reply_keys is not None else None

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        sent = context.global_arrays
        expected = expected_keys if expected_keys is not None else tuple(sent)
        got = set(reply.arrays)
        missing = [k for k in expected if k not in got]
        unexpected = sorted(got - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing arrays {_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected arrays {_preview(unexpected)}")
            return "; ".join(parts)
        for name in expected:
            if name not in sent:
                continue  # nothing to compare with (e.g. a wrapped strategy sent other names)
            a, ref = reply.arrays[name], sent[name]
            if a.shape != ref.shape:
                return f"array {name!r} has shape {a.shape}, expected {ref.shape}"
            if a.dtype != ref.dtype:
                return f"array {name!r} has dtype {a.dtype}, expected {ref.dtype}"
        return None

    return check


def finite_values(context: RoundContext, reply: ClientReply) -> str | None:
    """No NaN or Inf in any array or scalar metric."""
    for name, a in reply.arrays.items():
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "Inf"
            return f"array {name!r} contains {bad}"
    for key, v in reply.metrics.items():
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            return f"metric {key!r} is not finite"
    return None


def positive_weight(key: str = "num-examples") -> ReplyCheck:
    """The aggregation weight ``key`` must be a positive scalar."""

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        w = reply.metrics.get(key)
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            return f"metric {key!r} must be a positive number, got {w!r}"
        return None

    return check


def weight_bound(limit: int | float, key: str = "num-examples") -> ReplyCheck:
    """The aggregation weight ``key`` must not exceed ``limit`` (examples a client can hold).

    Run after :func:`positive_weight`. FedAvg weighs each reply by its claim, so a claim of
    10**12 would give one client all the weight; no honest client claims more than its
    partition (FedAvg) or its batch (FedSGD).
    """
    if not limit > 0:
        raise ValueError(f"weight limit must be > 0, got {limit!r}")

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        w = reply.metrics.get(key)
        if isinstance(w, int | float) and not isinstance(w, bool) and w > limit:
            return f"metric {key!r} claims {w!r} examples, more than the {limit:g} allowed"
        return None

    return check


def metric_bounds(bounds: Mapping[str, tuple[float, float]]) -> ReplyCheck:
    """Each metric named in ``bounds`` must be a number in its closed ``(low, high)`` range
    (e.g. a loss is >= 0, an accuracy in [0, 1]); a metric a reply lacks is not checked
    here (:func:`consistent_metric_keys` compares the replies' keys)."""
    items = dict(bounds)

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        for key, (low, high) in items.items():
            if key not in reply.metrics:
                continue
            v = reply.metrics[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
                return f"metric {key!r} must be a number in [{low:g}, {high:g}], got {v!r}"
        return None

    return check


def norm_bound(max_norm: float, keys: Sequence[str] | None = None) -> ReplyCheck:
    """Reject updates whose global L2 norm exceeds ``max_norm`` (FedSGD: the gradient;
    FedAvg: the weight difference to the model sent)."""

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        total = 0.0
        for name, a in reply.arrays.items():
            if keys is not None and name not in keys or not np.issubdtype(a.dtype, np.inexact):
                continue
            ref = context.global_arrays.get(name)
            is_weights = context.train_config.get("mode") == "fedavg" and ref is not None
            d = a.astype(np.float64) - (ref if is_weights else 0.0)
            total += float(np.square(d).sum())
        norm = math.sqrt(total)
        return f"update norm {norm:.4g} exceeds {max_norm:g}" if norm > max_norm else None

    return check


def max_bytes(limit: int) -> ReplyCheck:
    """Reject replies whose arrays hold more than ``limit`` bytes."""

    def check(context: RoundContext, reply: ClientReply) -> str | None:
        size = sum(a.nbytes for a in reply.arrays.values())
        return f"reply holds {size} bytes, limit {limit}" if size > limit else None

    return check


def reply_bytes(msg: Message) -> int:
    """Payload bytes of a message's records, without decoding any array.

    Arrays count their serialised bytes; numbers 8 bytes each (lists element-wise);
    strings and bytes their length.
    """
    total = 0
    content = msg.content
    for record in content.array_records.values():
        total += sum(serialised_size(a) for a in record.values())
    for records in (content.metric_records, content.config_records):
        for record in records.values():
            for value in record.values():
                for v in value if isinstance(value, list) else [value]:
                    total += len(v) if isinstance(v, str | bytes) else 8
    return total


def consistent_metric_keys(context: RoundContext, replies: list[ClientReply]) -> dict[int, str]:
    """Keep the replies with the most common set of metric keys (ties: the first seen)."""
    if not replies:
        return {}
    sets = [frozenset(r.metrics) for r in replies]
    majority = Counter(sets).most_common(1)[0][0]
    return {
        i: f"metric keys {sorted(s)} differ from the other replies' {sorted(majority)}"
        for i, s in enumerate(sets)
        if s != majority
    }


def min_replies(n: int) -> RoundCheck:
    """Reject the whole round (no update) when fewer than ``n`` replies are valid."""

    def check(context: RoundContext, replies: list[ClientReply]) -> dict[int, str]:
        if len(replies) >= n:
            return {}
        return {
            i: f"only {len(replies)} valid replies, at least {n} needed"
            for i in range(len(replies))
        }

    return check


@dataclass
class ReplyValidator:
    """Decides which client replies the server aggregates.

    Attributes:
        checks: per-reply checks, run in order (the first reason rejects).
        round_checks: checks over all replies that passed ``checks``.
        array_record_key / metric_record_key: record names a reply must carry
            (``array_record_key=None``: a reply without arrays, as to evaluate messages).
        max_reply_bytes: largest accepted reply (:func:`reply_bytes`); :data:`AUTO`: twice
            the bytes of the arrays sent plus 8 MiB; None: no limit.
        min_replies: quorum; a round with fewer valid replies is skipped (no new model).
    """

    checks: list[ReplyCheck] = field(default_factory=list)
    round_checks: list[RoundCheck] = field(default_factory=list)
    array_record_key: str | None = "arrays"
    metric_record_key: str = "metrics"
    max_reply_bytes: int | str | None = None
    min_replies: int = 1

    def __post_init__(self) -> None:
        limit = self.max_reply_bytes
        if limit is not None and limit != AUTO and not (isinstance(limit, int) and limit > 0):
            raise ValueError(f"max_reply_bytes must be a positive int, {AUTO!r} or None")
        if isinstance(self.min_replies, bool) or not (
            isinstance(self.min_replies, int) and self.min_replies >= 1
        ):
            raise ValueError(f"min_replies must be an integer >= 1, got {self.min_replies!r}")

    @classmethod
    def default(
        cls,
        reply_keys: Sequence[str] | None = None,
        weighted_by_key: str = "num-examples",
        extra_checks: Sequence[ReplyCheck] = (),
        extra_round_checks: Sequence[RoundCheck] = (),
    ) -> ReplyValidator:
        """Names/shapes/dtypes, finiteness, positive weight, consistent metric keys (+ extras)."""
        return cls(
            checks=[
                array_specs(reply_keys),
                finite_values,
                positive_weight(weighted_by_key),
                *extra_checks,
            ],
            round_checks=[consistent_metric_keys, *extra_round_checks],
        )

    @classmethod
    def from_limits(
        cls,
        reply_keys: Sequence[str] | None = None,
        weighted_by_key: str = "num-examples",
        *,
        max_update_norm: float = 0.0,
        max_reply_mb: float = 0.0,
        min_replies: int = 1,
        max_examples: float = 0.0,
    ) -> ReplyValidator:
        """:meth:`default` plus the run's limits (0 = off for the norm and the weight bound,
        auto for the size)."""
        extra = [norm_bound(max_update_norm)] if max_update_norm > 0 else []
        if max_examples > 0:
            extra.append(weight_bound(max_examples, weighted_by_key))
        validator = cls.default(reply_keys, weighted_by_key, extra_checks=extra)
        validator.max_reply_bytes = int(max_reply_mb * (1 << 20)) if max_reply_mb > 0 else AUTO
        validator.min_replies = int(min_replies)
        validator.__post_init__()
        return validator

    @classmethod
    def for_evaluation(
        cls,
        weighted_by_key: str = "num-examples",
        *,
        max_examples: float = 0.0,
        bounds: Mapping[str, tuple[float, float]] | None = None,
    ) -> ReplyValidator:
        """The checks of evaluate replies: one MetricRecord and nothing else, finite
        metrics within ``bounds``, a positive weight (at most ``max_examples`` if > 0), the
        same metric keys as the other replies. No quorum: a round's evaluation may have
        no valid reply (its metrics are then absent)."""
        checks = [finite_values, positive_weight(weighted_by_key)]
        if max_examples > 0:
            checks.append(weight_bound(max_examples, weighted_by_key))
        if bounds:
            checks.append(metric_bounds(bounds))
        return cls(
            checks=checks,
            round_checks=[consistent_metric_keys],
            array_record_key=None,
            max_reply_bytes=_AUTO_SLACK,
        )

    def reply_limit(self, context: RoundContext | None) -> int | None:
        """The byte limit for replies to ``context`` (resolves :data:`AUTO`)."""
        if self.max_reply_bytes != AUTO:
            return self.max_reply_bytes  # type: ignore[return-value]
        if context is None or not context.global_arrays:
            return None
        sent = sum(a.nbytes for a in context.global_arrays.values())
        return 2 * sent + _AUTO_SLACK

    def check_message(self, msg: Message, context: RoundContext | None = None) -> str | None:
        """Structure and size of a (non-error) reply message: exactly the expected records."""
        if not msg.has_content():
            return "reply has no content"
        limit = self.reply_limit(context)
        if limit is not None:
            size = reply_bytes(msg)
            if size > limit:
                return f"reply holds {size / 2**20:.3g} MiB, limit {limit / 2**20:.3g} MiB"
        content = msg.content
        arrays = list(content.array_records)
        metrics = list(content.metric_records)
        if self.array_record_key is None:
            if arrays:
                return f"expected no ArrayRecord, got {arrays}"
        elif arrays != [self.array_record_key]:
            return f"expected one ArrayRecord {self.array_record_key!r}, got {arrays}"
        if metrics != [self.metric_record_key]:
            return f"expected one MetricRecord {self.metric_record_key!r}, got {metrics}"
        if content.config_records:
            return f"unexpected records {list(content.config_records)}"
        if (
            self.array_record_key is not None
            and not isinstance(content[self.array_record_key], ArrayRecord)
        ) or not isinstance(content[self.metric_record_key], MetricRecord):
            return "records have the wrong types"
        return None

    def check_reply(self, context: RoundContext, reply: ClientReply) -> str | None:
        for check in self.checks:
            reason = check(context, reply)
            if reason:
                return reason
        return None

    def check_round(self, context: RoundContext, replies: list[ClientReply]) -> dict[int, str]:
        """{index into ``replies``: reason} for the replies the round checks reject."""
        rejected: dict[int, str] = {}
        for check in self.round_checks:
            keep = [i for i in range(len(replies)) if i not in rejected]
            verdict = check(context, [replies[i] for i in keep])
            rejected.update({keep[j]: reason for j, reason in verdict.items()})
        return rejected


def _preview(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(map(repr, names[:n]))
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")
