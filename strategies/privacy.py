"""Central differential privacy with Flower's own wrappers and mods, and its epsilon per round.

The defenses ``dp-server`` and ``dp-client`` (:mod:`precode_flower.defenses`, parameters
:class:`~precode_flower.defenses.DpParams`) wrap the run's FedAvg in one of Flower's
Message-API DP strategies (``flwr.serverapp.strategy``)::

    dp-server, fixed     DifferentialPrivacyServerSideFixedClipping
    dp-server, adaptive  DifferentialPrivacyServerSideAdaptiveClipping
    dp-client, fixed     DifferentialPrivacyClientSideFixedClipping   + fixedclipping_mod
    dp-client, adaptive  DifferentialPrivacyClientSideAdaptiveClipping + adaptiveclipping_mod

The wrapper clips each update (w_local - w_global) to L2 norm C (server side, or on the
client by Flower's mod, :func:`dp_client_mod`) and adds N(0, (z C / n)^2) to every entry of
the average of the n sampled clients' updates. This is client-level DP (McMahan et al.
2018, DP-FedAvg): neighbouring datasets differ by one client's data, and it protects the
*released model* from whoever receives it. It does not hide an update from the server,
which receives every update before any noise (dp-client: clipped, still un-noised); the
auditor therefore still attacks the updates as received and reports what they leak.

Two things around Flower's wrappers, each for the guarantee to hold as stated:

- Uniform weights. The noise z C / n is calibrated to the *unweighted* mean (one client
  moves it by at most C / n); FedAvg's weighting by ``num-examples`` would let a client
  with many examples move it further. The run's FedAvg therefore weights by
  :data:`DP_WEIGHT_KEY`, which :class:`PrivateStrategy` sets to 1 on every reply on the
  server (a client cannot choose its weight).
- Accounting. Every released aggregate is one Gaussian event composed in Flower's
  ``RdpAccountant`` (``flwr.serverapp.RdpAccountant``, Google's dp-accounting RDP backend,
  ``flwr[dp]``), no amplification by sampling (the server knows whom it sampled), at the
  run's population size; epsilon at ``dp-delta`` goes into each round's row. We compose
  the event ourselves instead of passing ``accountant=`` to the fixed-clipping wrappers:
  those raise, and so end the run, when a round samples a different number of clients
  than configured (a node left), and the adaptive wrappers take no accountant at all. The
  event's noise multiplier is what the round really added: with m < n replies aggregated
  (rejected or missing ones), the mean moves by C / m, so the multiplier is z m / n; the
  adaptive wrappers also release a noisy count of clipped updates, composed as a second
  Gaussian (see :func:`round_noise_multiplier`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from precode_flower.defenses import DpParams, parse_defenses

log = logging.getLogger(__name__)

__all__ = [
    "DP_WEIGHT_KEY",
    "PrivacyReport",
    "PrivateStrategy",
    "dp_client_mod",
    "make_accountant",
    "round_noise_multiplier",
]

#: The metric FedAvg weights by in a DP run; the server sets it to 1 on every reply.
DP_WEIGHT_KEY = "dp-weight"
#: Where Flower's client-side wrappers put the clipping norm in the train config (its
#: ``flwr.supercore.differential_privacy.KEY_CLIPPING_NORM``, which Flower does not export).
CLIPPING_NORM_KEY = "clipping_norm"
#: The adaptive mod's reply metric: 1 when it clipped (Flower's ``KEY_NORM_BIT``).
NORM_BIT_KEY = "norm_bit"
#: Train-config key that tells the client which of Flower's clipping mods to run.
CLIPPING_KEY = "dp-clipping"


def make_accountant(delta: float, population: int) -> Any:
    """Flower's RDP accountant for ``population`` clients, epsilon reported at ``delta``."""
    from flwr.serverapp import RdpAccountant  # lazy: needs dp-accounting (flwr[dp])

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def round_noise_multiplier(
    update_multiplier: float, sampled: int, aggregated: int, count_stddev: float | None = None
) -> float:
    """The noise multiplier of one release, as added: ``update_multiplier`` z_u scaled by
    ``aggregated / sampled`` (the wrapper calibrates to ``sampled``; the mean of
    ``aggregated`` updates has sensitivity C / aggregated), composed, for adaptive clipping,
    with the clipped-count release.

    The count: Flower adds N(0, sigma_b^2) to the *raw* count of clipped updates, which one
    client changes by 1 (Andrew et al. count centred bits, which change it by 1/2, and
    Flower sizes z_u from that: z_u = (z^-2 - (2 sigma_b)^-2)^-1/2). As a Gaussian of
    sensitivity 1 it has multiplier sigma_b, and two Gaussian releases compose in RDP like
    one of multiplier (z_u^-2 + sigma_b^-2)^-1/2; this is what we account.
    """
    z = update_multiplier * aggregated / sampled
    if count_stddev is None:
        return z
    if z <= 0 or count_stddev <= 0:
        return 0.0
    return (z**-2 + count_stddev**-2) ** -0.5


@dataclass(frozen=True)
class PrivacyReport:
    """One round's privacy for ``rounds.jsonl``: the release's noise multiplier and the
    cumulative epsilon at ``delta`` (None: no noise, no guarantee), and the clipping norm
    used."""

    epsilon: float | None
    delta: float
    noise_multiplier: float
    clipping_norm: float
    releases: int
    next_clipping_norm: float  # adaptive clipping: the bound of the next round

    def row(self) -> dict[str, Any]:
        return {
            "dp_epsilon": self.epsilon,
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clipping_norm": self.clipping_norm,
            "dp_next_clipping_norm": self.next_clipping_norm,
            "dp_releases": self.releases,
        }


class PrivateStrategy(Strategy):
    """Flower's DP wrapper (chosen by ``defense`` and ``params.dp_clipping``) around ``strategy``
    (a FedAvg weighting by :data:`DP_WEIGHT_KEY`), with uniform weights and accounting.

    ``num_sampled_clients``: the clients each round samples (the wrappers calibrate to it);
    ``population``: all clients (the accountant's population). ``secagg``: each round
    aggregates one reply, the SecAgg+ sum built by the server
    (:func:`~strategies.secagg.secagg_train_round`), whose ``clients`` metric counts the
    clients behind it. :attr:`reports` holds each round's :class:`PrivacyReport`.
    """

    def __init__(
        self,
        strategy: Strategy,
        defense: str,
        params: DpParams,
        *,
        num_sampled_clients: int,
        population: int,
        secagg: bool = False,
    ) -> None:
        if defense not in ("dp-server", "dp-client"):
            raise ValueError(f"not a DP defense: {defense!r}")
        if getattr(strategy, "weighted_by_key", None) != DP_WEIGHT_KEY:
            raise ValueError(f"the wrapped strategy must weight by {DP_WEIGHT_KEY!r}")
        self.base = strategy
        self.defense = defense
        self.params = params
        self.num_sampled_clients = num_sampled_clients
        self.secagg = secagg
        server_side = defense == "dp-server"
        z, n = params.dp_noise, num_sampled_clients
        if params.dp_clipping == "fixed":
            cls = (
                DifferentialPrivacyServerSideFixedClipping
                if server_side
                else DifferentialPrivacyClientSideFixedClipping
            )
            self.dp: Strategy = cls(strategy, z, params.dp_clip, n)
        else:
            cls = (
                DifferentialPrivacyServerSideAdaptiveClipping
                if server_side
                else DifferentialPrivacyClientSideAdaptiveClipping
            )
            self.dp = cls(
                strategy,
                z,
                n,
                initial_clipping_norm=params.dp_clip,
                target_clipped_quantile=params.dp_quantile,
                clip_norm_lr=params.dp_clip_lr,
                clipped_count_stddev=params.dp_count_stddev or None,
            )
        self.accountant = make_accountant(params.dp_delta, population) if z > 0 else None
        self.reports: dict[int, PrivacyReport] = {}

    # What the reply validator and the round loop read from the strategy: the clients still
    # report num-examples (validated as usual); sampling is the base FedAvg's.
    weighted_by_key = "num-examples"

    @property
    def min_available_nodes(self) -> int:
        return int(getattr(self.base, "min_available_nodes", 1))

    @min_available_nodes.setter
    def min_available_nodes(self, value: int) -> None:
        self.base.min_available_nodes = value  # type: ignore[attr-defined]

    def summary(self) -> None:
        self.dp.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[CLIPPING_KEY] = self.params.dp_clipping  # which mod the client runs (dp-client)
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                for record in msg.content.metric_records.values():
                    record[DP_WEIGHT_KEY] = 1  # the server's choice, whatever a client sent
        if self.defense == "dp-server" and not self.secagg:
            replies = self._without_zero_updates(server_round, replies)
        clipping_norm = float(self.dp.clipping_norm)  # before the adaptive update
        update_multiplier = float(self.dp.noise_multiplier)
        aggregated = len(replies)
        if self.secagg and len(replies) == 1:
            aggregated = int(replies[0].content["metrics"].get("clients", 1))
        arrays, metrics = self.dp.aggregate_train(server_round, replies)
        if arrays is not None:
            self._account(server_round, update_multiplier, clipping_norm, aggregated)
        return arrays, metrics

    def _without_zero_updates(self, server_round: int, replies: list[Message]) -> list[Message]:
        """``replies`` less those whose update (reply - global) is exactly zero: Flower's
        server-side clipping divides by the update's norm and would raise (and end the
        run). Left out, they are not in the mean, and the accounting counts one reply fewer."""
        current = getattr(self.dp, "current_arrays", None)
        if not current:
            return replies
        base = [np.asarray(a.numpy()) for a in current.values()]
        kept = []
        for msg in replies:
            record = (
                next(iter(msg.content.array_records.values()), None)
                if not msg.has_error()
                else None
            )
            if (
                record is not None
                and len(record) == len(base)
                and all(
                    np.array_equal(np.asarray(a.numpy()), b)
                    for a, b in zip(record.values(), base, strict=True)
                )
            ):
                log.warning(
                    "round %d: dp-server: node %d's update is exactly zero; left out of the DP "
                    "mean (Flower's clipping divides by its norm)",
                    server_round,
                    msg.metadata.src_node_id,
                )
                continue
            kept.append(msg)
        return kept

    def _account(self, server_round: int, z_update: float, clip: float, aggregated: int) -> None:
        count = (
            float(self.dp.clipped_count_stddev)  # type: ignore[attr-defined]
            if self.params.dp_clipping == "adaptive"
            else None
        )
        z = round_noise_multiplier(z_update, self.num_sampled_clients, aggregated, count)
        epsilon = None
        if self.accountant is not None and z > 0:
            pop = self.accountant.config.population_size
            self.accountant.compose(GaussianPrivacyEvent(z, min(aggregated, pop), pop))
            epsilon = float(self.accountant.get_epsilon(self.params.dp_delta))
        elif self.accountant is not None:
            epsilon = math.inf
        releases = self.accountant.num_releases if self.accountant is not None else 0
        report = PrivacyReport(
            epsilon=None if epsilon is None or math.isinf(epsilon) else epsilon,
            delta=self.params.dp_delta,
            noise_multiplier=z,
            clipping_norm=clip,
            releases=releases,
            next_clipping_norm=float(self.dp.clipping_norm),
        )
        self.reports[server_round] = report
        log.info("round %d: %s", server_round, report)

    def restore_privacy(self, rows: Iterable[dict[str, Any]]) -> None:
        """Compose again the releases of a resumed run's ``rounds.jsonl`` rows (and take up
        the adaptive bound where it was), so that epsilon counts the rounds before."""
        for row in sorted(rows, key=lambda r: r.get("round", 0)):
            if not row.get("dp_released"):
                continue
            z = float(row["dp_noise_multiplier"])
            if self.accountant is not None and z > 0:
                pop = self.accountant.config.population_size
                self.accountant.compose(GaussianPrivacyEvent(z, pop, pop))
            self.dp.clipping_norm = float(row["dp_next_clipping_norm"])
            self.reports[int(row["round"])] = PrivacyReport(
                epsilon=row.get("dp_epsilon"),
                delta=self.params.dp_delta,
                noise_multiplier=z,
                clipping_norm=float(row["dp_clipping_norm"]),
                releases=int(row["dp_releases"]),
                next_clipping_norm=self.dp.clipping_norm,
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:  # evaluation releases no model: weighted by examples as usual
            if not msg.has_error():
                for record in msg.content.metric_records.values():
                    record[DP_WEIGHT_KEY] = record.get("num-examples", 1)
        return self.dp.aggregate_evaluate(server_round, replies)

    def privacy_row(self, server_round: int) -> dict[str, Any]:
        """The round's ``rounds.jsonl`` fields (epsilon so far if the round released none)."""
        report = self.reports.get(server_round)
        if report is None:
            done = [r for k, r in sorted(self.reports.items()) if k < server_round]
            epsilon = done[-1].epsilon if done else None
            return {"dp_epsilon": epsilon, "dp_delta": self.params.dp_delta, "dp_released": False}
        return {**report.row(), "dp_released": True}

    def privacy_summary(self) -> dict[str, Any]:
        """The run's privacy for ``summary.json``."""
        last = self.reports[max(self.reports)] if self.reports else None
        return {
            "defense": self.defense,
            "clipping": self.params.dp_clipping,
            "noise_multiplier": self.params.dp_noise,
            "clipping_norm": self.params.dp_clip,
            "delta": self.params.dp_delta,
            "epsilon": last.epsilon if last else None,
            "releases": last.releases if last else 0,
            "accountant": "Flower RdpAccountant (dp-accounting RDP), client level, "
            "add/remove one client, no sampling amplification",
            "protects": "the released model against its recipients; not the updates "
            "against the server, which receives them before any noise",
        }


def dp_client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` or ``adaptiveclipping_mod`` on train messages of a
    ``dp-client`` run (the server's wrapper sent a clipping norm), otherwise nothing.

    The mods need the client's reply to be weights named as the received record (FedAvg);
    a FedSGD run never gets here (the run config refuses DP with FedSGD).
    """
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    configs = list(msg.content.config_records.values())
    config = configs[0] if len(configs) == 1 else None
    if config is None or CLIPPING_NORM_KEY not in config:
        return call_next(msg, context)
    if "dp-client" not in parse_defenses(str(config.get("defenses", ""))):
        return call_next(msg, context)
    adaptive = config.get(CLIPPING_KEY) == "adaptive"
    mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    replied: list[Message] = []

    def app(m: Message, c: Context) -> Message:
        replied.append(call_next(m, c))
        return replied[-1]

    try:
        return mod(msg, context, app)
    except ZeroDivisionError:
        # Flower's clipping divides by the update's norm: an update of exactly zero (the
        # model returned unchanged, e.g. every ReLU dead) raises. It needs no clipping.
        if not replied:
            raise
        log.warning("dp-client: the update is exactly zero; sent unclipped (nothing to clip)")
        reply = replied[-1]
        if adaptive:
            for record in reply.content.metric_records.values():
                record[NORM_BIT_KEY] = 0  # not clipped
        return reply
