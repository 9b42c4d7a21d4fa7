"""dp-server / dp-client: Flower's DP wrappers and mods, uniform weights, and the epsilon."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from precode_flower import defenses as d
from precode_flower import task
from precode_flower.strategies import privacy
from tests.conftest import make_message

GLOBAL = {"w": np.zeros(4, np.float32)}


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def _fedavg() -> FedAvg:
    return FedAvg(weighted_by_key=privacy.DP_WEIGHT_KEY, min_available_nodes=1)


def _reply(to: Message, values: list[float], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": _record({"w": np.asarray(values, np.float32)}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, reply_to=to)


class _Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _round(strategy, server_round: int, updates: list[list[float]], examples: list[int]):
    arrays = _record(GLOBAL)
    sent = list(
        strategy.configure_train(server_round, arrays, ConfigRecord({}), _Grid(len(updates)))
    )
    replies = [_reply(m, u, n) for m, u, n in zip(sent, updates, examples, strict=True)]
    return sent, strategy.aggregate_train(server_round, replies)


@pytest.mark.parametrize(
    ("defense", "clipping", "cls"),
    [
        ("dp-server", "fixed", DifferentialPrivacyServerSideFixedClipping),
        ("dp-client", "fixed", DifferentialPrivacyClientSideFixedClipping),
        ("dp-server", "adaptive", DifferentialPrivacyServerSideAdaptiveClipping),
        ("dp-client", "adaptive", DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_each_defense_is_flowers_wrapper(defense, clipping, cls, task_identity) -> None:
    params = d.DpParams(dp_noise=0.5, dp_clipping=clipping, dp_count_stddev=1.0)
    s = privacy.PrivateStrategy(_fedavg(), defense, params, num_sampled_clients=2, population=2)
    assert type(s.dp) is cls and s.dp.strategy is s.base


def test_server_side_clips_weights_uniformly_and_accounts_like_flowers_accountant(
    task_identity,
) -> None:
    params = d.DpParams(dp_noise=0.8, dp_clip=1.0, dp_delta=1e-5)
    s = privacy.PrivateStrategy(_fedavg(), "dp-server", params, num_sampled_clients=2, population=2)
    np.random.seed(0)
    epsilons = []
    for r in (1, 2, 3):
        # Client 2 claims 1000x the examples: the weight stays the server's 1.
        _, (arrays, _) = _round(s, r, [[3.0, 4.0, 0, 0], [0, 0, 0, 0.5]], [1, 1000])
        epsilons.append(s.privacy_row(r)["dp_epsilon"])
    np.random.seed(0)
    _, (noisy, _) = _round(
        privacy.PrivateStrategy(
            _fedavg(), "dp-server", params, num_sampled_clients=2, population=2
        ),
        1,
        [[3.0, 4.0, 0, 0], [0, 0, 0, 0.5]],
        [1, 1000],
    )
    # The first update is clipped to norm 1 (0.6, 0.8), then the unweighted mean.
    np.random.seed(0)
    noise = np.random.normal(0, 0.8 * 1.0 / 2, 4).astype(np.float32)
    expected = np.array([0.3, 0.4, 0, 0.25], np.float32) + noise
    assert np.allclose(noisy["w"].numpy(), expected, atol=1e-6)
    # Epsilon: Flower's accountant, called directly with the same parameters.
    reference = privacy.make_accountant(1e-5, 2)
    from flwr.serverapp import GaussianPrivacyEvent

    for r, eps in enumerate(epsilons, start=1):
        reference.compose(GaussianPrivacyEvent(0.8, 2, 2))
        assert eps == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
        assert s.reports[r].releases == r
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert s.privacy_summary()["epsilon"] == epsilons[-1]


def test_fewer_replies_than_sampled_are_accounted_with_less_noise() -> None:
    assert privacy.round_noise_multiplier(1.0, 4, 2) == 0.5
    assert privacy.round_noise_multiplier(1.0, 4, 4) == 1.0
    # The adaptive count composes as a Gaussian of multiplier sigma_b.
    assert privacy.round_noise_multiplier(1.0, 2, 2, 1.0) == pytest.approx(2**-0.5)


def test_adaptive_epsilon_covers_the_count_release(task_identity) -> None:
    params = d.DpParams(dp_noise=1.0, dp_clipping="adaptive", dp_count_stddev=2.0)
    s = privacy.PrivateStrategy(_fedavg(), "dp-server", params, num_sampled_clients=2, population=2)
    _round(s, 1, [[3.0, 4.0, 0, 0], [0, 0, 0, 0.5]], [1, 1])
    z_u = s.dp.noise_multiplier  # Flower's: (1^-2 - 4^-2)^-1/2
    assert z_u == pytest.approx((1 - 1 / 16) ** -0.5)
    reference = privacy.make_accountant(1e-5, 2)
    from flwr.serverapp import GaussianPrivacyEvent

    reference.compose(GaussianPrivacyEvent((z_u**-2 + 2.0**-2) ** -0.5, 2, 2))
    assert s.privacy_row(1)["dp_epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


def test_client_mod_runs_flowers_clipping_mod_only_in_dp_client_runs() -> None:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    assert privacy.CLIPPING_NORM_KEY == KEY_CLIPPING_NORM

    def app(msg: Message, ctx: Context) -> Message:
        return _reply(msg, [3.0, 4.0, 0, 0], 1)

    def train(config: dict) -> Message:
        content = RecordDict({"arrays": _record(GLOBAL), "config": ConfigRecord(config)})
        msg = make_message(content, "train")
        ctx = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})
        return privacy.dp_client_mod(msg, ctx, app)

    clipped = train({"defenses": "dp-client", "clipping_norm": 1.0})
    assert np.allclose(clipped.content["arrays"]["w"].numpy(), [0.6, 0.8, 0, 0])
    adaptive = train({"defenses": "dp-client", "clipping_norm": 1.0, "dp-clipping": "adaptive"})
    assert adaptive.content["metrics"]["norm_bit"] == 1
    plain = train({"defenses": "none", "clipping_norm": 1.0})
    assert np.allclose(plain.content["arrays"]["w"].numpy(), [3.0, 4.0, 0, 0])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(mode="fedsgd", defenses="dp-server"), "mode fedavg"),
        (dict(model="resnet18", defenses="dp-client"), "BatchNorm"),
        (dict(defenses="dp-server,secagg"), "dp-client"),
        (dict(defenses="dp-server,dp-client"), "not both"),
        (dict(defenses="dp-client", dp_noise=-1.0), "dp-noise"),
        (dict(defenses="dp-client", dp_clipping="median"), "dp-clipping"),
        (dict(defenses="dp-client", dp_delta=1.0), "dp-delta"),
    ],
)
def test_senseless_dp_configs_are_refused(kwargs, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        task.RunConfig(**kwargs)


def test_dp_settings_reach_the_clients_config() -> None:
    cfg = task.RunConfig(defenses="dp-client", dp_noise=0.7, dp_clipping="adaptive")
    again = task.RunConfig.from_mapping(cfg.to_config())
    assert again.dp_params == cfg.dp_params and again.defenses == ("dp-client",)


def _rows(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("defense", ["dp-server", "dp-client"])
def test_a_dp_run_reports_the_epsilon_of_flowers_accountant(
    defense, tmp_path, task_identity, inprocess_grid
) -> None:
    import json

    from flwr.serverapp import GaussianPrivacyEvent

    from precode_flower.clients.client_app import app as client_app
    from precode_flower.federation import run_federation

    cfg = task.RunConfig(
        defenses=defense, clients=3, rounds=2, batch_size=16, local_steps=2, dp_noise=1.3
    )
    summary = run_federation(inprocess_grid(client_app, 3), cfg, tmp_path, progress=False)
    rows = _rows(tmp_path)
    reference = privacy.make_accountant(cfg.dp_delta, 3)
    for row in rows:
        reference.compose(GaussianPrivacyEvent(1.3, 3, 3))
        assert row["dp_released"] and row["clients"] == 3
        assert row["dp_epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert summary["privacy"]["epsilon"] == rows[-1]["dp_epsilon"]
    assert json.loads((tmp_path / "summary.json").read_text())["privacy"]["releases"] == 2


def test_an_exactly_zero_update_does_not_end_the_run(task_identity) -> None:
    """Flower's clipping divides by the update's norm; a zero update (the model sent back
    unchanged) raised ZeroDivisionError in both the server wrapper and the client mod."""
    params = d.DpParams(dp_noise=0.5)
    s = privacy.PrivateStrategy(_fedavg(), "dp-server", params, num_sampled_clients=2, population=2)
    np.random.seed(0)
    _, (arrays, _) = _round(s, 1, [[0.0, 0, 0, 0], [0, 0, 0.5, 0]], [1, 1])
    assert arrays is not None
    # One reply was left out: the round is accounted as a mean of 1 (multiplier z / 2).
    assert s.reports[1].noise_multiplier == pytest.approx(0.25)

    def unchanged(msg: Message, ctx: Context) -> Message:
        return _reply(msg, [0.0, 0, 0, 0], 1)

    for clipping in ("fixed", "adaptive"):
        config = {"defenses": "dp-client", "clipping_norm": 1.0, "dp-clipping": clipping}
        msg = make_message(
            RecordDict({"arrays": _record(GLOBAL), "config": ConfigRecord(config)}), "train"
        )
        ctx = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})
        reply = privacy.dp_client_mod(msg, ctx, unchanged)
        assert not reply.has_error() and np.all(reply.content["arrays"]["w"].numpy() == 0)
        if clipping == "adaptive":
            assert reply.content["metrics"]["norm_bit"] == 0


def test_a_resumed_dp_run_keeps_counting_epsilon(tmp_path, task_identity, inprocess_grid) -> None:
    from flwr.serverapp import GaussianPrivacyEvent

    from precode_flower.clients.client_app import app as client_app
    from precode_flower.federation import run_federation

    cfg = task.RunConfig(defenses="dp-server", clients=2, rounds=1, batch_size=16, local_steps=1)
    run_federation(inprocess_grid(client_app, 2), cfg, tmp_path, progress=False)
    more = task.RunConfig.from_mapping(cfg.to_config(), rounds=2)
    run_federation(inprocess_grid(client_app, 2), more, tmp_path, progress=False, resume=True)
    rows = _rows(tmp_path)
    reference = privacy.make_accountant(cfg.dp_delta, 2)
    reference.compose(GaussianPrivacyEvent(1.0, 2, 2), count=2)
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["dp_releases"] == 2
    assert rows[1]["dp_epsilon"] == pytest.approx(reference.get_epsilon(cfg.dp_delta))
