"""Server-side checks of client replies, in one place: :class:`ReplyValidator`.

A reply passes three stages (the first failing check's reason is logged and the reply is
dropped from aggregation; see :class:`strategies.observed.Observed`):

1. :meth:`ReplyValidator.check_message`: the message has exactly one ArrayRecord under
   ``arrays`` and one MetricRecord under ``metrics`` (what Flower's FedAvg requires).
2. per-reply checks, each ``(RoundContext, ClientReply) -> reason | None``: array names,
   shapes and dtypes versus what the server sent, finite values, a positive weight.
3. round checks, each ``(RoundContext, [ClientReply]) -> {index: reason}``: checks that
   need all replies (all replies must carry the same metric keys, or Flower's aggregation
   raises; optionally a minimum number of valid replies).

To add a check (norm bound, byte size, ...), write a function of the stage-2 or stage-3
signature and pass it in ``checks`` / ``round_checks`` (or add it to
:meth:`ReplyValidator.default`); :func:`norm_bound`, :func:`max_bytes` and
:func:`min_replies` are ready-made examples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

if TYPE_CHECKING:  # the dataclasses live in observed.py, which imports this module
    from .observed import ClientReply, RoundContext

ReplyCheck = Callable[["RoundContext", "ClientReply"], "str | None"]
RoundCheck = Callable[["RoundContext", "list[ClientReply]"], "dict[int, str]"]

__all__ = [
    "ReplyCheck",
    "ReplyValidator",
    "RoundCheck",
    "array_specs",
    "consistent_metric_keys",
    "finite_values",
    "max_bytes",
    "min_replies",
    "norm_bound",
    "positive_weight",
]


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
        array_record_key / metric_record_key: record names a reply must carry.
    """

    checks: list[ReplyCheck] = field(default_factory=list)
    round_checks: list[RoundCheck] = field(default_factory=list)
    array_record_key: str = "arrays"
    metric_record_key: str = "metrics"

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

    def check_message(self, msg: Message) -> str | None:
        """Structure of a (non-error) reply message: exactly the expected records."""
        if not msg.has_content():
            return "reply has no content"
        content = msg.content
        arrays = list(content.array_records)
        metrics = list(content.metric_records)
        if arrays != [self.array_record_key]:
            return f"expected one ArrayRecord {self.array_record_key!r}, got {arrays}"
        if metrics != [self.metric_record_key]:
            return f"expected one MetricRecord {self.metric_record_key!r}, got {metrics}"
        if not isinstance(content[self.array_record_key], ArrayRecord) or not isinstance(
            content[self.metric_record_key], MetricRecord
        ):
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
