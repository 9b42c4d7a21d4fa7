"""Client-side defenses: the registry, clipping + noise, pruning, and their use in updates."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from precode_flower import defenses as d
from precode_flower import task
from precode_flower.precode import bottlenecks


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(20, 30, generator=g) * 3,
        "a.bias": torch.randn(20, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
    }


def _norm(u: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(t.double().pow(2).sum()) for t in u.values() if t.is_floating_point())
    )


def test_parse_defenses_canonical_order_dedup_case() -> None:
    assert d.parse_defenses("Prune,noise") == ("noise", "prune")
    assert d.parse_defenses(["precode", "prune,precode"]) == ("precode", "prune")
    assert d.parse_defenses("none") == ()
    assert d.parse_defenses("") == ()
    assert d.parse_defenses(None) == ()


@pytest.mark.parametrize("spec", ["foo", "precode,bar", ["noise", "dp"]])
def test_unknown_defense_names_the_valid_choices(spec) -> None:
    with pytest.raises(ValueError, match=r"choose from: none, precode, noise, prune"):
        d.parse_defenses(spec)


def test_none_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        d.parse_defenses("none,noise")


def test_registry_is_the_only_place_to_add_a_defense(monkeypatch) -> None:
    early = d.Defense("precode-early", "test preset", model=lambda m, p, s: m)
    monkeypatch.setitem(d.DEFENSES, "precode-early", early)
    assert d.parse_defenses("precode-early") == ("precode-early",)
    cfg = task.RunConfig(defenses=("precode-early",))
    assert cfg.to_config()["defenses"] == "precode-early"


@pytest.mark.parametrize(
    "kwargs",
    [{"latent_dim": 0}, {"beta": -1.0}, {"clip": 0.0}, {"sigma": -0.1}, {"prune_rate": 1.0}],
)
def test_defense_params_are_validated(kwargs) -> None:
    with pytest.raises(ValueError):
        d.DefenseParams(**kwargs)


def test_each_defense_names_the_parameters_it_reads() -> None:
    fields = [f.name for f in dataclasses.fields(d.DefenseParams)]
    read = [p for defense in d.DEFENSES.values() for p in defense.params]
    assert set(read) <= set(fields), "Defense.params names a field DefenseParams lacks"
    assert set(fields) <= set(read), "a DefenseParams field that no defense reads"


def test_clip_scales_to_the_bound_and_leaves_small_updates() -> None:
    u = _update()
    floats = {k: v for k, v in u.items() if v.is_floating_point()}
    big = d.clip_and_noise(floats, clip=1.0, sigma=0.0, generator=torch.Generator())
    assert _norm(big) == pytest.approx(1.0, rel=1e-5)
    # Direction is kept.
    ratio = big["a.weight"] / floats["a.weight"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    small = d.clip_and_noise(floats, clip=1e6, sigma=0.0, generator=torch.Generator())
    for k in floats:
        assert torch.equal(small[k], floats[k])


def test_noise_std_is_sigma_times_clip_and_seeded() -> None:
    zeros = {"w": torch.zeros(200_000)}
    out = d.clip_and_noise(zeros, clip=2.0, sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert float(out["w"].std()) == pytest.approx(1.0, rel=0.02)
    again = d.clip_and_noise(zeros, clip=2.0, sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["w"], again["w"])


def test_prune_zeroes_exactly_the_smallest_fraction() -> None:
    u = {k: v for k, v in _update().items() if v.is_floating_point()}
    out = d.prune_smallest(u, 0.7)
    flat_in = torch.cat([t.flatten() for t in u.values()])
    flat_out = torch.cat([t.flatten() for t in out.values()])
    k = round(0.7 * flat_in.numel())
    assert int((flat_out == 0).sum()) == k
    kept = flat_in[flat_out != 0].abs()
    dropped = flat_in[flat_out == 0].abs()
    assert float(kept.min()) >= float(dropped.max())
    assert torch.equal(flat_out[flat_out != 0], flat_in[flat_out != 0])
    same = d.prune_smallest(u, 0.0)
    assert all(torch.equal(same[n], u[n]) for n in u)


def test_update_defenses_run_in_registry_order_and_skip_integer_tensors() -> None:
    u = _update()
    params = d.DefenseParams(clip=1.0, sigma=0.1, prune_rate=0.5)
    a = d.apply_update_defenses(u, ("prune", "noise"), params, torch.Generator().manual_seed(3))
    b = d.apply_update_defenses(u, ("noise", "prune"), params, torch.Generator().manual_seed(3))
    for k in u:
        assert torch.equal(a[k], b[k])
    # Pruning runs after the noise: the update stays sparse.
    floats = torch.cat([a[k].flatten() for k in ("a.weight", "a.bias")])
    assert int((floats == 0).sum()) == round(0.5 * floats.numel())
    assert torch.equal(a["bn.num_batches_tracked"], u["bn.num_batches_tracked"])
    assert list(a) == list(u)


def test_model_defenses_precode_and_noop() -> None:
    from precode_flower.models import build

    params = d.DefenseParams(latent_dim=16, beta=0.01)
    model = d.apply_model_defenses(build("mlp", 10, (1, 28, 28)), ("precode",), params, (1, 28, 28))
    ((name, bottleneck),) = bottlenecks(model)
    assert bottleneck.latent_dim == 16 and bottleneck.beta == 0.01
    plain = build("mlp", 10, (1, 28, 28))
    assert d.apply_model_defenses(plain, ("noise", "prune"), params, (1, 28, 28)) is plain
    assert not d.has_update_defense(("precode",))
    assert d.has_update_defense(("precode", "prune"))


def _toy_client(cfg: task.RunConfig) -> tuple[torch.nn.Module, dict, task.ClientData]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 28, 28, generator=g)
    y = torch.arange(40) % 10
    data = task.ClientData(
        0, 1, np.arange(40), np.arange(10), x, y, x[:10], y[:10], 10, (1, 28, 28)
    )
    model = task.build_model(cfg, 10, (1, 28, 28), seed=0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, data


def test_fedavg_noise_bounds_the_weight_difference() -> None:
    cfg = task.RunConfig(defenses=("noise",), clip=0.05, sigma=0.0, local_steps=3, lr=0.5)
    model, start, data = _toy_client(cfg)
    update = task.compute_update(model, start, data, cfg, server_round=1)
    diff = {k: torch.from_numpy(update.arrays[k]) - start[k] for k in start}
    assert _norm(diff) == pytest.approx(0.05, rel=1e-3)


def test_fedsgd_prune_sparsifies_the_gradient() -> None:
    cfg = task.RunConfig(mode="fedsgd", defenses=("prune",), prune_rate=0.8, batch_size=8)
    model, start, data = _toy_client(cfg)
    update = task.compute_update(model, start, data, cfg, server_round=1)
    flat = np.concatenate([a.ravel() for a in update.arrays.values()])
    assert (flat == 0).sum() >= round(0.8 * flat.size)
