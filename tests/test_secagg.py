"""--secagg: Flower's SecAgg+ workflow and mod; the server and its observers see only the sum."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from precode_flower import data as data_mod
from precode_flower import task
from precode_flower.clients.client_app import app as client_app
from precode_flower.strategies import Observed
from precode_flower.strategies.arrays import arrays_view
from precode_flower.strategies.replies import collect_replies
from precode_flower.strategies.secagg import (
    AGGREGATE_KEY,
    secagg_max_weight,
    secagg_train_round,
)
from tests.conftest import InProcessGrid


class CopyingGrid(InProcessGrid):
    """Each node gets its own copy of a message, as over a real transport (Flower's SecAgg+
    stages send one shared content to every node, and its client mod edits what it gets)."""

    def push_messages(self, messages):
        from flwr.app import Message

        # The copies share the originals' metadata, so the originals get the ids too.
        copies = [Message(content=copy.deepcopy(m.content), metadata=m.metadata) for m in messages]
        return super().push_messages(copies)


CFG = task.RunConfig(clients=3, rounds=2, batch_size=16, local_steps=2, audit_ground_truth=True)


class _Seen:
    def __init__(self) -> None:
        self.rounds: list = []

    def observe(self, context, replies) -> None:
        self.rounds.append((context, replies))

    def close(self) -> None:
        pass


def _global(cfg: task.RunConfig) -> ArrayRecord:
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    return ArrayRecord(model.state_dict())


def _plain_round(grid, arrays, cfg, server_round):
    observed = Observed(FedAvg(min_available_nodes=cfg.clients), sort_replies=True)
    messages = observed.configure_train(server_round, arrays, ConfigRecord(cfg.to_config()), grid)
    replies = collect_replies(grid, list(grid.push_messages(messages)), 30.0)
    new, _ = observed.aggregate_train(server_round, replies)
    return new


@pytest.mark.usefixtures("task_identity")
def test_secagg_sum_equals_fedavg_and_observers_see_only_the_aggregate(inprocess_grid) -> None:
    seen = _Seen()
    observed = Observed(FedAvg(min_available_nodes=CFG.clients), [seen])
    grid = CopyingGrid(client_app, 3)
    plain_grid = CopyingGrid(client_app, 3)
    arrays = _global(CFG)
    step = 16 / 2**22  # SecAgg+'s quantisation step over [-8, 8]
    for server_round in (1, 2):
        expected = _plain_round(plain_grid, arrays, CFG, server_round)
        new = secagg_train_round(
            observed,
            grid,
            arrays,
            ConfigRecord(CFG.to_config()),
            server_round,
            timeout=30.0,
            max_weight=secagg_max_weight(CFG),
        )
        assert new is not None and list(new.keys()) == list(expected.keys())
        got, want = arrays_view(new), arrays_view(expected)
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert 0 < worst < 3 * step  # quantised, and within the quantisation
        rec = observed.record(server_round)
        assert (rec.sent, rec.clients, rec.dropped) == (3, 3, 0)
        arrays = new
    # The SecAgg+ stages ran: the clients never got a plain train message.
    stages = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(stages) == 2 * 4 * 3 and all("arrays" not in m.content for m in stages)
    # Observers got one reply per round: the aggregate of all three clients' examples.
    for _, replies in seen.rounds:
        [reply] = replies
        assert reply.metrics[AGGREGATE_KEY] == 1 and reply.metrics["clients"] == 3
        sizes = [len(task.train_indices(CFG, p, 3)) for p in range(3)]
        assert reply.num_examples == sum(sizes)
        assert len(reply.metrics["batch-indices"]) == CFG.local_steps * CFG.batch_size * 3


@pytest.mark.usefixtures("task_identity")
def test_a_silent_client_costs_its_reply_not_the_round(inprocess_grid) -> None:
    """Node 103 never answers the masked-vector stage: SecAgg+ unmasks the other two."""
    state = {"n": 0}

    def silent_in_stage_2(reply):
        state["n"] += 1
        return None if state["n"] == 3 else reply  # its 3rd train message is stage 2

    seen = _Seen()
    observed = Observed(FedAvg(min_available_nodes=3), [seen])
    grid = CopyingGrid(client_app, 3, faulty={103: silent_in_stage_2})
    new = secagg_train_round(
        observed,
        grid,
        _global(CFG),
        ConfigRecord(CFG.to_config()),
        1,
        timeout=5.0,
        max_weight=secagg_max_weight(CFG),
    )
    assert new is not None
    rec = observed.record(1)
    assert (rec.clients, rec.dropped) == (2, 1)
    assert rec.dropped_nodes == [{"node_id": 103, "stage": 2}]
    assert seen.rounds[0][1][0].metrics["clients"] == 2
    # With a quorum of 3 the round is skipped; the auditor still saw the sum (the server did).
    from precode_flower.strategies import ReplyValidator

    state["n"] = 0
    strict = Observed(
        FedAvg(min_available_nodes=3), [seen], ReplyValidator.from_limits(min_replies=3)
    )
    grid = CopyingGrid(client_app, 3, faulty={103: silent_in_stage_2})
    args = (grid, _global(CFG), ConfigRecord(CFG.to_config()), 1)
    assert secagg_train_round(strict, *args, timeout=5.0, max_weight=10**5) is None
    assert "at least 3 needed" in strict.record(1).skipped and len(seen.rounds) == 2


@pytest.mark.usefixtures("task_identity")
def test_the_auditor_attacks_only_the_aggregate_and_says_so(tmp_path) -> None:
    from precode_flower.audit import LeakageAuditor
    from precode_flower.strategies.auditor import AuditObserver

    cfg = task.RunConfig(mode="fedsgd", batch_size=1, rounds=1, clients=3, audit_ground_truth=True)
    auditor = LeakageAuditor(tmp_path, ["analytic"], progress=False)
    observer = AuditObserver(auditor, ground_truth=True)
    observed = Observed(FedAvg(min_available_nodes=3), [observer])
    new = secagg_train_round(
        observed,
        CopyingGrid(client_app, 3),
        _global(cfg),
        ConfigRecord(cfg.to_config()),
        1,
        timeout=30.0,
        max_weight=secagg_max_weight(cfg),
    )
    observer.close()
    assert new is not None
    rows = [json.loads(line) for line in (tmp_path / "leakage.jsonl").read_text().splitlines()]
    # One update per round: the sum of three batch-1 gradients, a batch of 3.
    [row] = rows
    assert row["aggregate_only"] is True and row["client"] == "aggregate"
    assert row["batch_size"] == 3 and row["status"] == "ok"
    assert "individual updates were never visible" in observer.summary


@pytest.mark.usefixtures("task_identity")
def test_dp_secagg_run_noises_the_sum_and_accounts_every_client_behind_it(tmp_path) -> None:
    from flwr.serverapp import GaussianPrivacyEvent

    from precode_flower.federation import run_federation
    from precode_flower.strategies import privacy

    cfg = task.RunConfig(
        defenses="dp-secagg", clients=3, rounds=2, batch_size=16, local_steps=2, dp_noise=1.3
    )
    grid = CopyingGrid(client_app, 3)
    summary = run_federation(grid, cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    reference = privacy.make_accountant(cfg.dp_delta, 3)
    for row in rows:
        # The sum of 3 clients: the noise z C / 3 on it is a multiplier z (not z / 3).
        reference.compose(GaussianPrivacyEvent(1.3, 3, 3))
        assert row["clients"] == 3 and row["dp_noise_multiplier"] == pytest.approx(1.3)
        assert row["dp_epsilon"] == pytest.approx(reference.get_epsilon(cfg.dp_delta))
    assert summary["privacy"]["defense"] == "dp-client"
    # Only SecAgg+ stage messages trained; the clients clipped (Flower's fixedclipping_mod
    # ran inside the SecAgg+ mod, so the config carried the norm).
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all("arrays" not in m.content for m in train)
    stage2 = [m for m in train if "fitins.config" in m.content]
    assert stage2 and all(m.content["fitins.config"]["clipping_norm"] == 1.0 for m in stage2)


def test_the_secagg_record_name_is_flowers() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from precode_flower.strategies import secagg

    assert secagg._RECORD_KEY_CONFIGS == RECORD_KEY_CONFIGS
