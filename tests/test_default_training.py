"""The default training settings train every registered defense without diverging.

Plain SGD on the paper's MLP diverged at batch 1-2 with the old lr 0.05 (CIFAR-10's 3,072
inputs make each single-example step large): NaN weights within 30 steps with PRECODE,
within 300 without; FedSGD with the old server-lr 0.1 diverged at batch 1-3 within 20 rounds.
These checks run the clients' own computation (:func:`task.compute_update`) in-process on
the embedded CIFAR-10 with the default ``lr`` and ``server-lr``, per defense and batch size,
for more steps than the old defaults survived with PRECODE. The federation-level defenses
(``dp-server``, ``dp-client``, ``secagg``: Flower wrappers and mods) change nothing in this
computation and are left out of the grid (their runs: test_privacy, test_secagg).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precode_flower import data, task
from precode_flower.defenses import DEFENSES

DEFAULTS = task.RunConfig()
#: Defenses that act in the aggregation (DP wrappers, SecAgg+): they do not change the
#: clients' training, which is what this file checks (their runs: test_privacy, test_secagg).
FEDERATION = {name for name, d in DEFENSES.items() if d.federation}
#: (model, defense): every registered defense of the clients' training, on its models.
CASES = [
    (model, name)
    for name in DEFENSES
    if name not in FEDERATION
    for model in ("mlp", "convnet")
    if not (name == "precode-early" and model == "mlp")
]
#: batch size -> FedAvg local steps / FedSGD rounds. The MLP is where the old defaults
#: diverged (FedAvg within 30 steps, FedSGD by round 13 with PRECODE at batch 1); the ConvNet
#: (seconds per step on 2 cores) gets a shorter check that its defaults stay finite too.
STEPS = {"mlp": {1: 60, 8: 10, 64: 2}, "convnet": {1: 10, 64: 1}}
ROUNDS = {"mlp": {1: 20, 64: 1}, "convnet": {1: 4, 64: 1}}


@pytest.fixture(scope="module")
def clients() -> list[task.ClientData]:
    """Two clients of 128 embedded CIFAR-10 images each, all classes mixed (as IID)."""
    bundle = data.load("cifar10", source="embedded")
    perm = np.random.default_rng(0).permutation(len(bundle.train))[:256]
    out = []
    for pid, idx in enumerate(np.array_split(perm, 2)):
        x, y = bundle.train_split.rows(idx)
        xt, yt = bundle.test_split.rows(np.arange(8))
        shape = tuple(bundle.input_shape)
        out.append(task.ClientData(pid, 2, idx, idx[:8], x, y, xt, yt, 10, shape))
    return out


def _non_finite(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]


@pytest.mark.parametrize(("model", "defense"), CASES)
def test_fedavg_defaults_stay_finite(clients, model: str, defense: str) -> None:
    shape = clients[0].input_shape
    for batch, steps in STEPS[model].items():
        cfg = task.RunConfig(model=model, defenses=defense, batch_size=batch, local_steps=steps)
        assert (cfg.lr, cfg.momentum) == (DEFAULTS.lr, DEFAULTS.momentum)
        net = task.build_model(cfg, 10, shape, seed=0)
        update = task.compute_update(net, task.initial_state(cfg, 10, shape), clients[0], cfg, 1)
        assert not _non_finite(update.arrays), (batch, _non_finite(update.arrays))
        assert update.loss < 5, (batch, update.loss)  # chance is ln 10 = 2.3


@pytest.mark.parametrize(("model", "defense"), CASES)
def test_fedsgd_defaults_stay_finite(clients, model: str, defense: str) -> None:
    # The server's step with its default optimiser (plain SGD, no momentum): the mean of the
    # clients' gradients times server-lr.
    assert (DEFAULTS.server_optimizer, DEFAULTS.server_momentum) == ("sgd", 0.0)
    shape = clients[0].input_shape
    for batch, rounds in ROUNDS[model].items():
        cfg = task.RunConfig(mode="fedsgd", model=model, defenses=defense, batch_size=batch)
        net = task.build_model(cfg, 10, shape, seed=0)
        state = dict(task.initial_state(cfg, 10, shape))
        names = [n for n, _ in net.named_parameters()]
        for rnd in range(1, rounds + 1):
            grads = [task.compute_update(net, state, c, cfg, rnd).arrays for c in clients]
            for name in names:
                mean = torch.as_tensor(np.mean([g[name] for g in grads], axis=0))
                state[name] = state[name] - cfg.server_lr * mean
            bad = [n for n in names if not torch.isfinite(state[n]).all()]
            assert not bad, (batch, rnd, bad)


def test_the_grid_covers_every_registered_defense() -> None:
    assert {d for _, d in CASES} == set(DEFENSES) - FEDERATION
    assert FEDERATION == {"dp-server", "dp-client", "secagg"}


def test_non_finite_replies_are_named_per_round_and_counted(tmp_path, capsys) -> None:
    # A user's own diverging choice: the round line says so and suggests the cause, and the
    # rows (from which the run summary counts them) keep the number.
    from precode_flower.federation.runlog import RoundLog
    from precode_flower.strategies.observed import RoundRecord

    records = {
        1: RoundRecord(1, sent=3, clients=1, rejected=2),
        2: RoundRecord(2, sent=3, clients=2, rejected=1),
    }
    records[1].rejections = [
        {"node_id": 1, "partition_id": 0, "reason": "array '1.weight' contains NaN"},
        {"node_id": 2, "partition_id": 2, "reason": "metric 'train-loss' is not finite"},
    ]
    records[2].rejections = [{"node_id": 1, "partition_id": 0, "reason": "too large"}]

    class Stub:  # the parts of Observed that RoundLog reads
        observers: list = []
        strategy = None

        def record(self, server_round: int) -> RoundRecord:
            return records[server_round]

    log = RoundLog(tmp_path, Stub(), rounds=2, progress=False)  # type: ignore[arg-type]
    for rnd in (0, 1, 2):
        log.on_evaluation(rnd, 2.3, 0.1)
    lines = capsys.readouterr().out.splitlines()
    assert "2 client(s) sent non-finite (NaN/Inf) updates" in lines[0] and "--lr" in lines[0]
    assert "non-finite" not in lines[1] and "rejected 1" in lines[1]
    assert [r["non_finite"] for r in log.rows] == [2, 0] and log.non_finite == 2
