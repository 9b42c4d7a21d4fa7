"""The round loop that replaces Flower's ``Strategy.start``, with its strategy and sampling.

:func:`train_rounds` runs the rounds as ``Strategy.start`` does (per round: the strategy's
``configure_train``, the replies, ``aggregate_train``; then ``configure_evaluate``, the
replies, ``aggregate_evaluate``; then the central ``evaluate_fn`` of the new model) and
calls the same strategy hooks in the same order with the same arguments, so any Flower
strategy (wrapped in :class:`~precode_flower.strategies.Observed`) runs under it. It
differs where ``start`` cannot do what a run here needs:

- **Resume.** It can begin at any round (``first_round``), and it seeds the server's RNGs
  from (seed, round) alone before each round (:func:`_seed_round`), so a run resumed from
  a checkpoint samples the nodes an uninterrupted one would have (``start`` leaves the
  RNGs alone; Flower samples with the ``random`` module). :class:`PartitionOrderedGrid`
  makes that sampling independent of the random node ids.
- **Pipelining.** Round r's evaluate messages are pushed right after its aggregation and
  round r+1's train messages right behind them (both start from the same model); round r
  is then finished (its evaluate replies aggregated, ``after_round``) while the clients
  train for r+1. The central evaluation runs on a thread of its own beside the clients'
  evaluation; ``start`` runs the three phases one after the other.
- **Churn.** After the first round it samples whichever nodes are online instead of
  waiting for all ``cfg.clients`` (``min_available_nodes`` drops to 1): a node that left
  must not stall the run. Each phase waits at most ``cfg.round_timeout`` seconds.
- **SecAgg+.** With ``secagg`` among the defenses each training round is Flower's SecAgg+
  protocol (:func:`~precode_flower.strategies.secagg.secagg_train_round`; every stage
  waits at most ``cfg.round_timeout``), which cannot overlap the previous evaluation.
- **Checkpoints.** ``after_round(round, arrays, result)`` gets each round's final model
  and central evaluation (the run writes its checkpoint and log row there); ``start``
  returns its ``Result`` only at the end.

Where the semantics agree (every node online, a fixed number of rounds from round 1), the
final model is bitwise the one ``start`` gives on the same seed; tests/test_simulation.py
checks that for FedAvg and FedSGD.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

from precode_flower import heap, task
from precode_flower.defenses import dp_defense
from precode_flower.strategies import FedSGD, Observed, ReplyValidator, aggregate_metrics
from precode_flower.strategies.privacy import DP_WEIGHT_KEY, PrivateStrategy
from precode_flower.strategies.replies import collect_replies
from precode_flower.strategies.secagg import secagg_max_weight, secagg_train_round

log = logging.getLogger(__name__)


def make_strategy(cfg: task.RunConfig, param_keys: Sequence[str]) -> Strategy:
    """Flower's FedAvg (mode fedavg) or our FedSGD (mode fedsgd), sampling ``fraction``;
    with ``dp-server`` / ``dp-client``, FedAvg weighting uniformly inside Flower's DP
    wrapper (:class:`~precode_flower.strategies.privacy.PrivateStrategy`)."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction,
        fraction_evaluate=cfg.fraction_evaluate,
        # The fractions decide how many are sampled; wait until all `clients` are connected.
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.clients,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    if cfg.mode == "fedsgd":
        return FedSGD(
            param_keys=param_keys,
            server_lr=cfg.server_lr,
            server_momentum=cfg.server_momentum,
            optimizer=cfg.server_optimizer,
            **common,
        )
    dp = dp_defense(cfg.defenses)
    if dp is not None:  # RunConfig refuses DP with a robust aggregation
        return PrivateStrategy(
            FedAvg(**common, weighted_by_key=DP_WEIGHT_KEY),
            dp,
            cfg.dp_params,
            num_sampled_clients=max(int(cfg.clients * cfg.fraction), 1),  # FedAvg's sample size
            population=cfg.clients,
            secagg="secagg" in cfg.defenses,
        )
    # Robust aggregations are Flower's own strategies (RunConfig refuses them for FedSGD).
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=0.2, **common)  # Flower's default cut: 20% at each end
    if cfg.aggregation == "median":
        return FedMedian(**common)
    if cfg.aggregation == "krum":
        return Krum(**common)
    return FedAvg(**common)


def make_validator(
    cfg: task.RunConfig, strategy: Strategy, *, max_examples: int | None = None
) -> ReplyValidator:
    """The reply checks of ``cfg`` (norm bound, byte limit, quorum, weight bound) for
    ``strategy``. ``max_examples``: the most examples a reply may claim (default:
    :func:`precode_flower.task.max_examples`, which partitions the run's data)."""
    if max_examples is None:
        max_examples = task.max_examples(cfg)
    return ReplyValidator.from_limits(
        getattr(strategy, "reply_keys", None),
        getattr(strategy, "weighted_by_key", "num-examples"),
        max_update_norm=cfg.max_update_norm,
        max_reply_mb=cfg.max_reply_mb,
        min_replies=cfg.min_replies,
        max_examples=max_examples,
    )


#: Ranges of the ClientApp's evaluate metrics (a loss is >= 0, an accuracy a fraction).
EVALUATE_BOUNDS = {"eval-loss": (0.0, float("inf")), "eval-accuracy": (0.0, 1.0)}


def make_evaluate_validator(
    cfg: task.RunConfig, strategy: Strategy, test_examples: int
) -> ReplyValidator:
    """The checks of evaluate replies: their metrics in range, and a weight of at most a
    client's share of the ``test_examples`` (``cfg.max_examples`` where set)."""
    share = cfg.max_examples or -(-test_examples // cfg.clients)
    return ReplyValidator.for_evaluation(
        getattr(strategy, "weighted_by_key", "num-examples"),
        max_examples=share,
        bounds=EVALUATE_BOUNDS,
    )


class PartitionOrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes in partition order.

    Flower samples nodes with ``random.sample`` over ``get_node_ids()``, whose order follows
    the node ids, and these are random per run (simulation) or per registration. Ordered by
    partition id, the same seeded ``random`` state samples the same partitions in every run,
    so a resumed run samples what the uninterrupted one would have. Each node is asked its
    partition id once (a ``query`` message); nodes that do not answer within ``timeout``
    come last, by node id. With ``reseed`` set, ``random`` is seeded with it just before the
    list is returned, i.e. right before Flower samples from it: other threads (Flower's retry
    jitter) also draw from the global ``random``, so a seed set earlier may be disturbed.
    Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, timeout: float, partitions: dict[int, int]) -> None:
        self.grid = grid
        self.timeout = timeout
        self.partitions = partitions  # node id -> partition id (shared with Observed)
        self._asked: set[int] = set()
        self.reseed: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> list[int]:
        nodes = list(self.grid.get_node_ids())
        unknown = [n for n in nodes if n not in self.partitions and n not in self._asked]
        if unknown:
            self._ask(unknown)
        ordered = sorted(
            nodes, key=lambda n: (n not in self.partitions, self.partitions.get(n, 0), n)
        )
        if self.reseed is not None:
            random.seed(self.reseed)
        return ordered

    def _ask(self, nodes: list[int]) -> None:
        self._asked.update(nodes)
        messages = [
            Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        try:
            replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        except Exception:  # ordering is a nicety: never fail the run for it
            log.exception("could not ask %d nodes for their partition ids", len(nodes))
            return
        for reply in replies:
            try:
                pid = reply.content["metrics"]["partition-id"]
            except Exception:  # error replies, old ClientApps: order by node id
                continue
            if isinstance(pid, int) and not isinstance(pid, bool):
                self.partitions[reply.metadata.src_node_id] = pid


def _seed_round(seed: int, server_round: int) -> tuple[int, int]:
    """Seed the server's RNGs from (seed, round) alone, so a resumed run samples the same
    nodes as an uninterrupted one (Flower samples with the ``random`` module); returns the
    seeds of the round's train and evaluate sampling."""
    s, s_train, s_eval = task.derive_seeds(seed, server_round, -1, n=3)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s_train, s_eval


def train_rounds(
    observed: Observed,
    grid: Grid,
    arrays: ArrayRecord,
    cfg: task.RunConfig,
    *,
    first_round: int = 1,
    evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    after_round: Callable[[int, ArrayRecord, Any], None] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round..cfg.rounds`` as Flower's ``Strategy.start`` runs them (train,
    client evaluation, central evaluation), then ``after_round(round, arrays, result)``
    with the central evaluation's result (None without ``evaluate_fn``).

    Unlike ``start``, it can begin at any round (resume), seeds each round from
    (seed, round), and after the first round samples whichever nodes are online instead of
    waiting for all ``cfg.clients``: a node that left must not stall the run. And it does
    not wait for a round's evaluation before sending the next round's training, which
    starts from the same model: round r's evaluate messages are pushed right after its
    aggregation, round r+1's train messages right behind them, and round r ends (its
    replies aggregated, then ``after_round``) while the clients train for r+1. The central
    evaluation, ``evaluate_fn(round, arrays)``, runs on a thread of its own meanwhile, and
    ``after_round`` waits for it (and gets its error). Each phase may take up to
    ``cfg.round_timeout`` seconds; a round's training is timed from when its clients'
    evaluation of the previous model is in. Returns the final global arrays.
    """
    train_config = ConfigRecord(cfg.to_config())
    evaluate_config = ConfigRecord(cfg.to_config())
    inner = observed.strategy
    secagg = "secagg" in cfg.defenses
    max_weight = secagg_max_weight(cfg) if secagg else 0
    reorder = grid if isinstance(grid, PartitionOrderedGrid) else None
    with ThreadPoolExecutor(1, thread_name_prefix="central-evaluation") as central:

        def start_evaluation(
            server_round: int, arrays: ArrayRecord, s_eval: int
        ) -> tuple[int, ArrayRecord, list[str], Any]:
            if reorder is not None:
                reorder.reseed = s_eval
            result = None
            if evaluate_fn is not None:  # beside the clients' evaluation of the same model
                result = central.submit(evaluate_fn, server_round, arrays)
            messages = observed.configure_evaluate(server_round, arrays, evaluate_config, grid)
            return server_round, arrays, list(grid.push_messages(messages)), result

        def finish_evaluation(
            server_round: int, arrays: ArrayRecord, ids: list[str], result: Any
        ) -> None:
            replies = collect_replies(grid, ids, cfg.round_timeout)
            observed.aggregate_evaluate(server_round, replies)
            del replies
            stats = None if result is None else result.result()
            if after_round is not None:
                after_round(server_round, arrays, stats)

        evaluation = None  # the previous round's, in flight
        for server_round in range(first_round, cfg.rounds + 1):
            s_train, s_eval = _seed_round(cfg.seed, server_round)
            if reorder is not None:
                reorder.reseed = s_train
            if secagg:  # SecAgg+'s four stages, one after the other: nothing to overlap
                if evaluation is not None:
                    finish_evaluation(*evaluation)
                new = secagg_train_round(
                    observed,
                    grid,
                    arrays,
                    train_config,
                    server_round,
                    timeout=cfg.round_timeout,
                    max_weight=max_weight,
                )
            else:
                messages = observed.configure_train(server_round, arrays, train_config, grid)
                train_ids = list(grid.push_messages(messages))
                del messages
                if evaluation is not None:
                    finish_evaluation(*evaluation)
                replies = collect_replies(grid, train_ids, cfg.round_timeout)
                new, _ = observed.aggregate_train(server_round, replies)
                del replies  # the round's model-sized messages (emptied by Observed)
            heap.release_freed_memory(min_free=heap.TRIM_MIN_FREE)
            if new is not None:
                arrays = new
            if hasattr(inner, "min_available_nodes"):
                inner.min_available_nodes = 1
            evaluation = start_evaluation(server_round, arrays, s_eval)
        if evaluation is not None:
            finish_evaluation(*evaluation)
    return arrays
