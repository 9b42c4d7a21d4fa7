"""Defenses compared in real federated runs: accuracy, training time and leakage per config.

    python benchmarks/defenses.py --quick      # < 15 min on 2 cores: docs/RESULTS.md + figures
    python benchmarks/defenses.py --full       # hours; the attacks use a GPU when there is one
    python benchmarks/defenses.py --quick --datasets mnist --models convnet --dry-run

Every configuration (dataset, model, defense, mode, batch size, and the profile's budget) is
one ``simulate.py`` run (Flower + Ray) with the leakage auditor on and the evaluation
channel open, so the server's attacks are scored against the clients' true examples. From
each run the runner keeps the final test accuracy, the accuracy per round, the wall time per
round, and per attack the success rate (SSIM >= 0.6), mean PSNR and mean SSIM over the
audited updates. Results go to ``<results-dir>/<config hash>/result.json`` (the run's own
files next to it, in ``run/``); a configuration whose ``result.json`` exists is not run
again, so an interrupted grid resumes where it stopped. The hash covers every setting that
changes the numbers (not the device).

Attacks per configuration: ``analytic`` where a Linear layer sees the raw image (``mlp``),
``ig`` (the PRECODE paper's configuration at the profile's iteration budget),
``ignore-bottleneck`` on models with a PRECODE bottleneck, and ``fedavg`` in FedAvg mode.
Under SecAgg+ (``secagg`` and its presets) they attack the round's sum, the only update
the server sees, as one batch of all its clients' examples; DP configurations report the
run's epsilon (docs/PRIVACY.md).

The report (``--doc``) gets one generated section (``## Generated results``, or the heading
given with ``--section``) with the exact command and date; other sections of the file are
left as they are. Figures next to it: a privacy-utility plot and, per batch-1 setting, a grid
of the audited examples and their reconstructions (the runs train on public datasets only).

Accuracy: the grid's budgets are chosen for the audit (FedSGD/FedAvg updates of 1 or 8
examples); they train little. For an accuracy comparison at a real budget run the models
without audit, e.g. ``--settings fedavg:32 --local-steps 150 --attacks none``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from report import write_section  # benchmarks/ is on sys.path when run as a script

from precode_flower.attacks.base import reconstructs_images
from precode_flower.data import REFERENCE_POOL

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Generated results"
SUCCESS_SSIM = 0.6
#: Target accuracy: the initial accuracy plus this fraction of what the undefended run gained.
TARGET_FRACTION = 0.9
#: Below this gain (accuracy points / 100) the undefended run did not learn: no target.
MIN_GAIN = 0.05


# --------------------------------------------------------------------------------------------
# What a configuration is


@dataclass(frozen=True)
class DefenseSpec:
    """One defense setting of the grid: registry names plus the parameters they read."""

    names: str  # comma list for simulate.py --defense
    sigma: float | None = None
    prune_rate: float | None = None
    models: tuple[str, ...] | None = None  # None: every model
    dp_noise: float | None = None  # dp-server / dp-client: noise multiplier z
    dp_clip: float | None = None  # dp: clipping norm C
    modes: tuple[str, ...] | None = None  # None: every mode


_DP_ONLY: dict[str, Any] = {"models": ("mlp", "convnet"), "modes": ("fedavg",)}

#: Grid defenses by id (the id is the label in tables and the value of --defenses).
DEFENSES: dict[str, DefenseSpec] = {
    "none": DefenseSpec("none"),
    "precode": DefenseSpec("precode"),
    "noise-1e-3": DefenseSpec("noise", sigma=1e-3),
    "noise-1e-2": DefenseSpec("noise", sigma=1e-2),
    "noise-1e-1": DefenseSpec("noise", sigma=1e-1),
    "prune-50": DefenseSpec("prune", prune_rate=0.5),
    "prune-90": DefenseSpec("prune", prune_rate=0.9),
    "prune-99": DefenseSpec("prune", prune_rate=0.99),
    "precode+noise-1e-2": DefenseSpec("precode,noise", sigma=1e-2),
    "precode+prune-90": DefenseSpec("precode,prune", prune_rate=0.9),
    "noise-1e-2+prune-90": DefenseSpec("noise,prune", sigma=1e-2, prune_rate=0.9),
    "precode-early": DefenseSpec("precode-early", models=("convnet", "resnet18")),
    # Central DP through Flower's wrappers (FedAvg weight replies, models without BatchNorm),
    # secure aggregation (the audit sees only the sum), and the combinations.
    "dp-server": DefenseSpec("dp-server", dp_noise=1.0, dp_clip=1.0, **_DP_ONLY),
    "dp-client": DefenseSpec("dp-client", dp_noise=1.0, dp_clip=1.0, **_DP_ONLY),
    "dp-precode-early": DefenseSpec(
        "dp-precode-early", dp_noise=1.0, dp_clip=1.0, models=("convnet",), modes=("fedavg",)
    ),
    "secagg": DefenseSpec("secagg"),
    "dp-secagg": DefenseSpec("dp-secagg", dp_noise=1.0, dp_clip=1.0, **_DP_ONLY),
    "precode-early-secagg": DefenseSpec("precode-early-secagg", models=("convnet", "resnet18")),
}


@dataclass(frozen=True)
class Budget:
    """Training and audit budget shared by every configuration of a profile."""

    clients: int
    rounds: int
    lr: float  # FedAvg client learning rate
    server_lr: float  # FedSGD server learning rate
    local_steps: int  # FedAvg local steps per round
    fraction_evaluate: float
    audit_every: int
    audit_clients: int
    audit_iterations: int
    audit_time_limit: float
    audit_wait: float
    seed: int = 0
    #: Attacks to run where they apply; None: every applicable one; (): no audit.
    attack_filter: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Profile:
    """A named grid (datasets x models x defenses x settings, or a fixed slice) and budget."""

    name: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    defenses: tuple[str, ...]
    settings: tuple[tuple[str, int], ...]  # (mode, batch size)
    budget: Budget
    timeout: float  # seconds per configuration
    #: (dataset, model, defense, mode, batch) cells to run; None: the full product.
    cells: tuple[tuple[str, str, str, str, int], ...] | None = None


_QUICK_BUDGET = Budget(
    clients=2,
    rounds=10,
    lr=0.05,
    server_lr=0.1,
    local_steps=2,
    fraction_evaluate=0.5,
    audit_every=5,
    audit_clients=1,
    audit_iterations=1000,
    audit_time_limit=180.0,
    audit_wait=600.0,
)
_FULL_BUDGET = Budget(
    clients=10,
    rounds=100,
    lr=0.05,
    server_lr=0.1,
    local_steps=2,
    fraction_evaluate=0.2,
    audit_every=25,
    audit_clients=2,
    audit_iterations=7000,
    audit_time_limit=3600.0,
    audit_wait=7200.0,
)

PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        datasets=("mnist", "cifar10"),
        models=("mlp", "convnet"),
        defenses=tuple(DEFENSES),
        settings=(("fedsgd", 1), ("fedsgd", 8), ("fedavg", 1), ("fedavg", 8)),
        budget=_QUICK_BUDGET,
        timeout=900.0,
        # A representative slice: the paper's claim on its MLP, PRECODE on a CNN, the
        # preset, and one gradient perturbation; everything else needs --full (or filters).
        cells=(
            ("mnist", "mlp", "none", "fedsgd", 1),
            ("mnist", "mlp", "precode", "fedsgd", 1),
            ("mnist", "mlp", "noise-1e-2", "fedsgd", 1),
            ("mnist", "mlp", "none", "fedavg", 1),
            ("mnist", "convnet", "none", "fedsgd", 1),
            ("mnist", "convnet", "precode", "fedsgd", 1),
            ("mnist", "convnet", "precode-early", "fedsgd", 1),
            ("cifar10", "convnet", "none", "fedsgd", 1),
            ("cifar10", "convnet", "precode-early", "fedsgd", 1),
            # Secure aggregation (the audit sees only the sum) and DP with it.
            ("mnist", "mlp", "secagg", "fedsgd", 1),
            ("mnist", "mlp", "dp-secagg", "fedavg", 1),
        ),
    ),
    "full": Profile(
        name="full",
        datasets=("mnist", "cifar10", "cifar100", "breastmnist"),
        models=("mlp", "convnet"),
        defenses=tuple(DEFENSES),
        settings=(("fedsgd", 1), ("fedsgd", 8), ("fedavg", 1), ("fedavg", 8)),
        budget=_FULL_BUDGET,
        timeout=6 * 3600.0,
    ),
}


@dataclass(frozen=True)
class Experiment:
    """One configuration of the grid."""

    dataset: str
    model: str
    defense: str  # id in DEFENSES
    mode: str
    batch_size: int
    budget: Budget

    @property
    def spec(self) -> DefenseSpec:
        return DEFENSES[self.defense]

    def settings(self) -> dict[str, Any]:
        """Everything that changes the numbers, as plain JSON (what the hash covers)."""
        spec = self.spec
        out = {
            "dataset": self.dataset,
            "model": self.model,
            "defense": self.defense,
            "defenses": spec.names,
            "sigma": spec.sigma,
            "prune_rate": spec.prune_rate,
            # Only DP settings carry these: other configurations keep their hashes.
            **({"dp_noise": spec.dp_noise, "dp_clip": spec.dp_clip} if spec.dp_noise else {}),
            "mode": self.mode,
            "batch_size": self.batch_size,
            "attacks": list(self.attacks()),
            # A preset's description names its parameters: changing them changes the hash.
            "described": [registry_description(n) for n in _parts(spec.names)],
            # The filter's effect is the attack list above; unset it leaves old hashes alone.
            **{k: v for k, v in asdict(self.budget).items() if k != "attack_filter"},
        }
        if self.mode == "fedsgd":
            out.pop("lr")
            out.pop("local_steps")
        else:
            out.pop("server_lr")
        if not out["attacks"]:
            for k in [k for k in out if k.startswith("audit_")]:
                out.pop(k)
        return out

    def key(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def group(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.model, self.mode, self.batch_size)

    def attacks(self) -> tuple[str, ...]:
        """The attacks of this configuration: :data:`DEFAULT_ATTACKS`, or the budget's
        filter, kept where the registry says they apply (in :func:`attack_order`)."""
        allowed = self.budget.attack_filter
        wanted = DEFAULT_ATTACKS if allowed is None else allowed
        return tuple(
            n
            for n in attack_order(wanted)
            if why_not(n, self.spec.names, self.model, self.dataset, self.mode) is None
        )

    def simulate_args(self, out: Path, device: str) -> list[str]:
        b, spec = self.budget, self.spec
        args = [
            "--no-progress",
            "--dataset", self.dataset,
            "--model", self.model,
            "--defense", spec.names,
            "--mode", self.mode,
            "--batch-size", str(self.batch_size),
            "--clients", str(b.clients),
            "--rounds", str(b.rounds),
            "--fraction-evaluate", str(b.fraction_evaluate),
            "--seed", str(b.seed),
            "--out", str(out),
        ]  # fmt: skip
        if self.attacks():
            args += [
                "--audit", ",".join(self.attacks()),
                "--audit-every", str(b.audit_every),
                "--audit-clients", str(b.audit_clients),
                "--audit-iterations", str(b.audit_iterations),
                "--audit-time-limit", str(b.audit_time_limit),
                "--audit-wait", str(b.audit_wait),
                "--audit-device", device,
            ]  # fmt: skip
        if self.mode == "fedsgd":
            args += ["--server-lr", str(b.server_lr)]
        else:
            args += ["--lr", str(b.lr), "--local-steps", str(b.local_steps)]
        if spec.sigma is not None:
            args += ["--sigma", str(spec.sigma)]
        if spec.prune_rate is not None:
            args += ["--prune-rate", str(spec.prune_rate)]
        if spec.dp_noise is not None:
            args += ["--dp-noise", str(spec.dp_noise)]
        if spec.dp_clip is not None:
            args += ["--dp-clip", str(spec.dp_clip)]
        return args


def _parts(names: str) -> list[str]:
    """Registry names of a comma list, presets expanded (their parts are described)."""
    from precode_flower.defenses import PRESETS

    return [m for n in names.split(",") for m in PRESETS.get(n, (n,))]


def registry_description(name: str) -> str:
    """The defense registry's description of ``name``."""
    from precode_flower.defenses import DEFENSES as REGISTRY

    return REGISTRY[name].description


#: The attacks of a configuration when ``--attacks`` is not given. Their list is part of the
#: config hash, so it stays as it was before the registry's other attacks could be chosen.
DEFAULT_ATTACKS = ("analytic", "ig", "ignore-bottleneck", "fedavg")


def attack_names() -> tuple[str, ...]:
    """Every registered attack: :data:`DEFAULT_ATTACKS` first, then the registry's order."""
    from precode_flower.attacks import ATTACKS

    return DEFAULT_ATTACKS + tuple(n for n in ATTACKS if n not in DEFAULT_ATTACKS)


def attack_order(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` in :func:`attack_names` order (a filter's order does not change a hash)."""
    wanted = set(names)
    return tuple(n for n in attack_names() if n in wanted)


@functools.cache
def _built(defenses: str, model: str, dataset: str) -> tuple[Any, tuple[int, int, int]]:
    """(the model these defenses build, the input shape), to ask the registry about."""
    from precode_flower import data, task

    bundle = data.load(dataset)
    shape = tuple(bundle.input_shape)
    cfg = task.RunConfig(model=model, dataset=dataset, defenses=defenses)
    return task.build_model(cfg, bundle.num_classes, shape), shape  # type: ignore[return-value]


@functools.cache
def why_not(attack: str, defenses: str, model: str, dataset: str, mode: str) -> str | None:
    """None if ``attack`` applies to this configuration, else why not (one line).

    The registry's declarations decide (``AttackSpec.why_not`` on the model the defenses
    build); an attack on weight updates (``inputs="weights"``) runs in FedAvg mode only, as a
    FedSGD gradient is what the gradient attacks already take.
    """
    from precode_flower.attacks.base import spec

    declared = spec(attack)
    if declared.inputs == "weights" and mode != "fedavg":
        return "inverts FedAvg weight updates (FedAvg mode only)"
    net, shape = _built(defenses, model, dataset)
    return declared.why_not(net, shape)


def grid(
    profile: Profile,
    *,
    datasets: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    defenses: Sequence[str] | None = None,
    settings: Sequence[tuple[str, int]] | None = None,
    budget: Budget | None = None,
) -> list[Experiment]:
    """The profile's configurations, narrowed by the filters (which also lift its slice)."""
    budget = budget or profile.budget
    filtered = any(f is not None for f in (datasets, models, defenses, settings))
    ds = tuple(datasets or profile.datasets)
    ms = tuple(models or profile.models)
    dfs = tuple(defenses or profile.defenses)
    sts = tuple(settings or profile.settings)
    if profile.cells is not None and not filtered:
        cells: Iterable[tuple[str, str, str, str, int]] = profile.cells
    else:
        cells = ((d, m, f, mode, b) for d in ds for m in ms for f in dfs for (mode, b) in sts)
    out = []
    for d, m, f, mode, b in cells:
        spec = DEFENSES[f]
        if spec.models is not None and m not in spec.models:
            continue
        if spec.modes is not None and mode not in spec.modes:
            continue
        out.append(Experiment(d, m, f, mode, b, budget))
    return out


# --------------------------------------------------------------------------------------------
# Running one configuration and reading what it left


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def attack_stats(rows: Sequence[Mapping[str, Any]], attack: str) -> dict[str, Any]:
    """Success rate, mean PSNR/SSIM and failure counts of one attack over the audited updates."""
    mine = [r for r in rows if r.get("attack") == attack]
    scored = [r for r in mine if r.get("status") == "ok" and r.get("scored")]
    images = reconstructs_images(attack)  # a label attack's rows carry no image to score
    out: dict[str, Any] = {
        "runs": len(mine),
        "scored": len(scored),
        "failed": {
            s: sum(r.get("status") == s for r in mine) for s in ("error", "timeout", "dropped")
        },
        "success_rate": None,
        "psnr": _mean(r.get("psnr") for r in scored),
        "ssim": _mean(r.get("ssim") for r in scored),
        "label_accuracy": _mean(r.get("label_accuracy") for r in scored),
        # What a guess of even class counts scores on the same batches (batches of 2+).
        "label_baseline": _mean(r.get("label_baseline") for r in scored),
        "seconds": _mean(r.get("seconds") for r in mine if r.get("status") == "ok"),
        "images": images,
    }
    if not images:
        out["psnr"] = out["ssim"] = None
    elif scored:
        out["success_rate"] = sum(bool(r.get("success")) for r in scored) / len(scored)
    errors = sorted({str(r.get("error"))[:160] for r in mine if r.get("status") == "error"})
    if errors:
        out["errors"] = errors
    return out


def collect(exp: Experiment, run_dir: Path, wall: float) -> dict[str, Any]:
    """The result record of a finished run, from its rounds.jsonl, summary.json, leakage.jsonl."""
    rounds = _read_jsonl(run_dir / "rounds.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    leakage = _read_jsonl(run_dir / "leakage.jsonl")
    if len(rounds) != exp.budget.rounds:
        raise RuntimeError(f"{len(rounds)}/{exp.budget.rounds} rounds finished")
    seconds = [float(r["seconds"]) for r in rounds]
    return {
        "key": exp.key(),
        "config": exp.settings(),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1),
        "initial_accuracy": summary.get("initial", {}).get("test_accuracy"),
        "final_accuracy": summary.get("final_test_accuracy"),
        "accuracy": [r["test_accuracy"] for r in rounds],
        "round_seconds": seconds,
        # Round 1 also pays for starting Ray and the client actors.
        "seconds_per_round": statistics.median(seconds[1:] or seconds),
        "attacks": {a: attack_stats(leakage, a) for a in exp.attacks()},
        "audited": sorted({(int(r["round"]), str(r["client"])) for r in leakage}),
        "aggregate_only": any(r.get("aggregate_only") for r in leakage),
        # DP runs: the epsilon spent over the whole run (at the run's delta), Flower's RDP.
        "epsilon": (summary.get("privacy") or {}).get("epsilon"),
        "delta": (summary.get("privacy") or {}).get("delta"),
        "data_source": summary.get("data_source"),
        **round_health(rounds),
    }


def round_health(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Rounds the server skipped (no valid reply) and replies it rejected as non-finite: a
    run that stopped training must not read like one that trained."""
    return {
        "skipped_rounds": sum(bool(r.get("skipped")) for r in rounds),
        "non_finite_replies": sum(int(r.get("non_finite") or 0) for r in rounds),
    }


def _kill_session(proc: subprocess.Popen) -> None:
    """Stop a run started in its own session: SIGTERM, then SIGKILL what is left of it."""
    from precode_flower.processes import stop_sessions

    stop_sessions([proc.pid], grace=10.0)
    proc.poll()


def run_experiment(
    exp: Experiment,
    results_dir: Path,
    *,
    device: str,
    timeout: float,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run ``exp`` with simulate.py (unless its result.json exists) and return its result."""
    home = results_dir / exp.key()
    done = home / "result.json"
    run_dir = home / "run"
    if done.exists():
        result = json.loads(done.read_text())
        if "skipped_rounds" not in result:  # written before the runner recorded it
            result.update(round_health(_read_jsonl(run_dir / "rounds.jsonl")))
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps(exp.settings(), indent=2) + "\n")
    cmd = [sys.executable, str(ROOT / "simulate.py"), *exp.simulate_args(run_dir, device)]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    with open(home / "log.txt", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        # Its own session, so that on a timeout (or Ctrl-C) the run's Ray processes and
        # audit workers go with it, and nothing else does.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            _kill_session(proc)
            raise RuntimeError(
                f"timed out after {timeout:.0f} s (log: {home / 'log.txt'})"
            ) from err
        except BaseException:
            _kill_session(proc)
            raise
    if proc.returncode != 0:
        tail = (home / "log.txt").read_text()[-1500:]
        raise RuntimeError(f"simulate.py exited with {proc.returncode}; log tail:\n{tail}")
    result = collect(exp, run_dir, time.perf_counter() - started)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(done)  # atomic: a half-written result never counts as done
    return result


# --------------------------------------------------------------------------------------------
# The report


def _group_title(group: tuple[str, str, str, int]) -> str:
    dataset, model, mode, batch = group
    return f"{dataset} {model} {mode} B={batch}"


def strongest(result: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(name, stats) of the attack with the highest success rate (then mean SSIM), if any."""
    scored = [(a, s) for a, s in result["attacks"].items() if s.get("success_rate") is not None]
    if not scored:
        return None
    return max(scored, key=lambda item: (item[1]["success_rate"], item[1].get("ssim") or 0.0))


@functools.cache
def _references(dataset: str) -> Any:
    """The seeded reference pool of ``dataset`` (the auditor's, the same in every report)."""
    from precode_flower import data

    return data.reference_pool(data.load(dataset))


def linkage(result: Mapping[str, Any], results_dir: Path) -> dict[str, list[int]]:
    """Per image attack: [images linked to their original, images scored], over the
    audited updates whose originals and reconstructions the run saved.

    An original is linked when some reconstruction resembles it more than any
    reconstruction resembles an image of the dataset's reference pool
    (:func:`precode_flower.data.reference_pool`; :func:`precode_flower.metrics.identified`).
    Updates without a saved original are left out.
    """
    import torch

    from precode_flower import data, metrics

    config = result["config"]
    bundle = data.load(config["dataset"])
    refs = _references(config["dataset"])
    recon = results_dir / result["key"] / "run" / "reconstructions"
    out: dict[str, list[int]] = {}
    for rnd, client in result.get("audited", []):
        original = recon / f"round{int(rnd):04d}_client{client}_original.pt"
        if not original.exists():
            continue
        truth = torch.load(original, weights_only=True)
        for attack in filter(reconstructs_images, result["attacks"]):
            path = recon / f"round{int(rnd):04d}_client{client}_{attack}.pt"
            if not path.exists():
                continue
            images = torch.load(path, weights_only=True)
            hits = metrics.identified(images, truth, refs, bundle.mean, bundle.std)
            counts = out.setdefault(attack, [0, 0])
            counts[0] += int(hits.sum())
            counts[1] += len(hits)
    return out


def target_progress(result: Mapping[str, Any], target: float | None) -> tuple[int, float] | None:
    """(first round with test accuracy >= target, wall seconds until then) or None."""
    if target is None:
        return None
    elapsed = 0.0
    for i, (acc, sec) in enumerate(zip(result["accuracy"], result["round_seconds"], strict=True)):
        elapsed += sec
        if acc is not None and acc >= target:
            return i + 1, elapsed
    return None


def linked_verdict(result: Mapping[str, Any]) -> str:
    """Attacks whose re-identifications the auditor reports as a possible leak
    (:func:`precode_flower.audit.report.re_identifies`, with the dataset's classes)."""
    from precode_flower.audit.report import class_chance, re_identifies
    from precode_flower.data import shape_and_classes

    linked = result.get("linked") or {}
    chance = class_chance(REFERENCE_POOL, shape_and_classes(result["config"]["dataset"])[1])
    hits = [a for a, (k, n) in linked.items() if re_identifies(k, n, chance)]
    return ", ".join(hits) or ("none" if linked else "-")


def _cell(stats: Mapping[str, Any] | None, linked: Sequence[int] | None = None) -> str:
    if stats is None:
        return "n/a"
    text = _stats_cell(stats)
    if linked is not None and linked[1]:
        text += f" · linked {linked[0]}/{linked[1]}"
    return text


def _stats_cell(stats: Mapping[str, Any]) -> str:
    if not stats.get("scored"):
        failed = ", ".join(f"{n} {s}" for s, n in stats.get("failed", {}).items() if n)
        return f"not scored ({failed})" if failed else "not scored"
    if stats.get("images") is False:
        acc, guess = stats.get("label_accuracy"), stats.get("label_baseline")
        acc_text = "-" if acc is None else f"{acc:.2f}"
        guess_text = "" if guess is None else f" (even guess {guess:.2f})"
        return f"labels {acc_text}{guess_text} over {stats['scored']}"
    hits = round(stats["success_rate"] * stats["scored"])
    psnr = "-" if stats["psnr"] is None else f"{stats['psnr']:.1f}"
    ssim = "-" if stats["ssim"] is None else f"{stats['ssim']:.2f}"
    return f"{hits}/{stats['scored']} · {psnr} · {ssim}"


def group_table(
    group: tuple[str, str, str, int], results: Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown table of one setting (rows: defenses) and its privacy-utility points."""
    attacks = list(dict.fromkeys(a for r in results for a in r["attacks"]))
    base = next((r for r in results if r["config"]["defense"] == "none"), None)
    base_acc = base["final_accuracy"] if base else None
    target = None
    if base is not None and base_acc is not None and base.get("initial_accuracy") is not None:
        gain = base_acc - base["initial_accuracy"]
        if gain >= MIN_GAIN:
            target = base["initial_accuracy"] + TARGET_FRACTION * gain
    head = (
        "| defense | final acc. | vs none (points) | \u03b5 | rounds / s to target | s per round | "
    )
    head += "".join(f"{a} | " for a in attacks) + "broken by |"
    with_links = any(r.get("linked") for r in results)
    if with_links:
        head += " linked by |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    points = []
    for r in results:
        acc = r["final_accuracy"]
        delta = "-" if base_acc is None or acc is None else f"{100 * (acc - base_acc):+.1f}"
        reach = target_progress(r, target)
        reach_text = (
            "-"
            if target is None
            else ("not reached" if reach is None else f"{reach[0]} / {reach[1]:.0f}")
        )
        broken = [a for a, s in r["attacks"].items() if s.get("success_rate")]  # images only
        verdict = ", ".join(broken) or ("none" if r["attacks"] else "not audited")
        linked = r.get("linked") or {}
        cells = [_cell(r["attacks"].get(a), linked.get(a)) for a in attacks]
        acc_text = "-" if acc is None else f"{acc:.3f}"
        if r.get("skipped_rounds"):
            acc_text += (
                f" ({r['skipped_rounds']}/{len(r['accuracy'])} rounds skipped: "
                f"{r.get('non_finite_replies', 0)} non-finite replies)"
            )
        eps = r.get("epsilon")
        eps_text = "-" if eps is None else f"{eps:.3g}"
        if r.get("aggregate_only"):
            eps_text += " (sum only)"
        lines.append(
            f"| {r['config']['defense']} | {acc_text} | {delta} | {eps_text} | {reach_text} | "
            f"{r['seconds_per_round']:.1f} | "
            + "".join(f"{c} | " for c in cells)
            + f"{verdict} |"
            + (f" {linked_verdict(r)} |" if with_links else "")
        )
        best = strongest(r)
        points.append(
            {
                "panel": _group_title(group),
                "label": r["config"]["defense"],
                "accuracy": acc,
                "success": best[1]["success_rate"] if best else None,
                "psnr": best[1]["psnr"] if best else None,
                "attack": best[0] if best else None,
                "epsilon": r.get("epsilon"),
            }
        )
    return lines, points


def image_rows(
    results: Sequence[Mapping[str, Any]], results_dir: Path, columns: int = 4
) -> dict[str, Any]:
    """Grid rows for one setting: the audited originals, then each defense's reconstructions.

    The configurations of a setting share their seed, so round r's audited client trained on
    the same examples whatever the defense; updates audited in every configuration are used.
    """
    import torch

    common = None
    for r in results:
        audited = {tuple(a) for a in r["audited"]}
        common = audited if common is None else common & audited
    picks = sorted(common or ())[:columns]
    if not picks:
        return {}
    rows: dict[str, Any] = {}
    first = results_dir / results[0]["key"] / "run" / "reconstructions"
    originals = [first / f"round{rnd:04d}_client{c}_original.pt" for rnd, c in picks]
    if not all(p.exists() for p in originals):
        return {}
    rows["original"] = torch.cat([torch.load(p, weights_only=True)[:1] for p in originals])
    for r in results:
        recon = results_dir / r["key"] / "run" / "reconstructions"
        for attack in filter(reconstructs_images, r["attacks"]):
            files = [recon / f"round{rnd:04d}_client{c}_{attack}.pt" for rnd, c in picks]
            if all(f.exists() for f in files):
                images = [torch.load(f, weights_only=True)[:1] for f in files]
                rows[f"{r['config']['defense']}: {attack}"] = torch.cat(images)
    return rows


def report(
    results: Sequence[Mapping[str, Any]],
    failures: Sequence[tuple[Experiment, str]],
    profile: Profile,
    *,
    doc: Path,
    figures: Path,
    results_dir: Path,
    command: str,
    wall: float,
    section: str = SECTION,
    reused: int = 0,
) -> str:
    """Write the generated section of ``doc`` and its figures; return the section."""
    from precode_flower import data
    from precode_flower.plotting import image_grid, plot_privacy_utility

    groups: dict[tuple[str, str, str, int], list[Mapping[str, Any]]] = {}
    order = list(DEFENSES)
    for r in sorted(results, key=lambda r: order.index(r["config"]["defense"])):
        r = {**r, "linked": linkage(r, results_dir)}  # from the saved images, not stored
        c = r["config"]
        groups.setdefault((c["dataset"], c["model"], c["mode"], c["batch_size"]), []).append(r)
    b = profile.budget
    body = [
        "<!-- Written by benchmarks/defenses.py; rerunning it replaces this section. -->",
        f"Command: `{command}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {_accelerator()}, "
        f"Python {platform.python_version()}  ",
        f"Profile `{profile.name}`: {b.clients} clients (IID), {b.rounds} rounds; FedSGD server "
        f"lr {b.server_lr}; FedAvg {b.local_steps} local steps at lr {b.lr}; audit every "
        f"{b.audit_every} round(s) from round 1, {b.audit_clients} client(s) per audited round, "
        f"{b.audit_iterations} iterations per iterative attack ({b.audit_time_limit:g} s limit), "
        f"attacks: {_filter_text(b.attack_filter)}; seed {b.seed}. "
        f"Configurations: {len(results)} reported, {len(failures)} failed; "
        f"this invocation took {wall / 60:.1f} min"
        + (f" ({reused} of them run earlier and reused)." if reused else "."),
        "",
        "Cells per attack: updates reconstructed (SSIM >= 0.6) / updates audited · mean PSNR "
        "(dB, 200 = exact) · mean SSIM. `n/a`: the attack does not apply (analytic needs a "
        "Linear layer on the raw image; ignore-bottleneck a PRECODE bottleneck; fedavg FedAvg "
        "mode; spear and cocktail a first Linear layer on the image that feeds a ReLU). "
        "Label attacks (label-counts, labels): `labels` accuracy of the recovered label "
        "multiset over the scored updates, and what a guess of even class counts gets on the "
        "same batches (batches of 2 or more); `broken by` counts image reconstructions only. "
        "\u03b5: the run's client-level epsilon at delta 1e-5 (Flower's RDP accountant; "
        "`-` without DP); `(sum only)`: SecAgg+, the audit saw only each round's aggregate. "
        "Target: "
        f"the initial accuracy plus {TARGET_FRACTION:.0%} of what `none` gained in the same "
        f"setting (`-` when `none` gained less than {100 * MIN_GAIN:.0f} points); its seconds "
        "count from the start of round 1, which includes starting Ray and the clients. Seconds "
        "per round: median wall time of rounds 2.. (training, messaging, evaluation; the "
        "niced audit workers run alongside). `rounds skipped`: rounds in which no reply was "
        "valid, so the global model stayed as it was (the run's log names each rejected reply). "
        f"`linked k/n`: of the n audited examples, k are re-identified: some reconstruction "
        f"resembles the example (pixel correlation) more than any reconstruction resembles "
        f"one of {REFERENCE_POOL} other test images. The test needs no threshold; by chance "
        f"an example links 1 time in {REFERENCE_POOL + 1}, and about 1 in (its class's share "
        "of the pool + 1), 1 in 11 for 10 classes, when the reconstructions carry only its "
        "class (labels leak everywhere). SSIM >= 0.6 misses "
        "recognisable but blurred digits); `linked by`: the attacks that re-identified at "
        "least half of the audited examples and at least twice the class-alone rate (the "
        "auditor's *possible leak*).",
        "",
    ]
    points: list[dict[str, Any]] = []
    grids = []
    for group, rows in groups.items():
        lines, pts = group_table(group, rows)
        points += pts
        body += [f"### {_group_title(group)}", "", *lines, ""]
        if group[3] == 1:
            grid_rows = image_rows(rows, results_dir)
            if len(grid_rows) > 1:
                name = "results_grid_" + "_".join(str(g) for g in group) + _suffix(section) + ".png"
                bundle = data.load(group[0])
                image_grid(
                    grid_rows,
                    bundle.mean,
                    bundle.std,
                    figures / name,
                    title=f"{_group_title(group)}: audited updates (columns) and reconstructions",
                )
                grids.append(name)
    if any(p["success"] is not None for p in points):
        plot = figures / f"results_privacy_utility{_suffix(section)}.png"
        plot_privacy_utility(points, plot, success_ssim=SUCCESS_SSIM)
        body += ["### Privacy-utility", "", f"![privacy-utility]({_rel(plot, doc)})", ""]
    if grids:
        body += ["### Reconstructions", ""]
        body += [f"![{g}]({_rel(figures / g, doc)})" for g in grids] + [""]
    if failures:
        body += ["### Failed configurations", ""]
        body += [
            f"- {e.dataset} {e.model} {e.defense} {e.mode} B={e.batch_size}: " + msg.splitlines()[0]
            for e, msg in failures
        ]
    text = "\n".join(body)
    write_section(doc, section, text, title="# Results")
    return text


def _filter_text(attack_filter: tuple[str, ...] | None) -> str:
    if attack_filter is None:
        return "every applicable one"
    return ", ".join(attack_filter) + " where they apply" if attack_filter else "none (no audit)"


def _suffix(section: str) -> str:
    """File-name suffix of a section's figures ("" for the default section)."""
    if section == SECTION:
        return ""
    return "_" + "".join(c if c.isalnum() else "-" for c in section.lower()).strip("-")


def _rel(path: Path, doc: Path) -> str:
    return os.path.relpath(path.resolve(), doc.resolve().parent)


def _accelerator() -> str:
    import torch

    return f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"


# --------------------------------------------------------------------------------------------
# Command line


def _csv(choices: Sequence[str]) -> Any:
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or 'nothing'} not in: {', '.join(choices)}"
            )
        return items

    return parse


def _attack_filter(value: str) -> tuple[str, ...]:
    """``none`` (no audit), ``all`` (every registered attack) or a comma list of attacks."""
    word = value.strip().lower()
    if word == "none":
        return ()
    if word == "all":
        return attack_names()
    return attack_order(_csv(attack_names())(value))


def _settings(value: str) -> tuple[tuple[str, int], ...]:
    """``fedsgd:1,fedavg:8`` -> (("fedsgd", 1), ("fedavg", 8))."""
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        mode, _, batch = item.partition(":")
        if mode not in ("fedsgd", "fedavg") or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(
                f"expected MODE:BATCH (fedsgd:1, fedavg:8), got {item!r}"
            )
        out.append((mode, int(batch)))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    from precode_flower import data
    from precode_flower.models import MODELS

    p = argparse.ArgumentParser(
        prog="benchmarks/defenses.py",
        description="Compare defenses in federated runs with the leakage auditor on.",
    )
    prof = p.add_mutually_exclusive_group(required=True)
    prof.add_argument("--quick", action="store_true", help="small budget, a representative slice")
    prof.add_argument("--full", action="store_true", help="the whole grid at the paper's budget")
    g = p.add_argument_group("grid filters (any filter replaces the quick profile's slice)")
    g.add_argument("--datasets", type=_csv(data.DATASETS))
    g.add_argument("--models", type=_csv(MODELS))
    g.add_argument("--defenses", type=_csv(list(DEFENSES)))
    g.add_argument("--settings", type=_settings, help="MODE:BATCH list, e.g. fedsgd:1,fedavg:8")
    o = p.add_argument_group("budget overrides (they change the config hashes)")
    for name in (
        "clients",
        "rounds",
        "local-steps",
        "audit-every",
        "audit-clients",
        "audit-iterations",
    ):
        o.add_argument(f"--{name}", type=int)
    o.add_argument("--audit-time-limit", type=float)
    o.add_argument(
        "--attacks",
        type=_attack_filter,
        help=f"run these attacks where they apply (comma list; default "
        f"{','.join(DEFAULT_ATTACKS)}); 'all': every registered one; 'none': no audit",
    )
    r = p.add_argument_group("output")
    r.add_argument("--results-dir", type=Path, default=ROOT / "runs" / "defenses")
    r.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    r.add_argument("--figures", type=Path, default=None, help="default: the doc's folder")
    r.add_argument("--device", default=None, help="attack device (default: cuda if present)")
    r.add_argument("--ray-address", default=None, help="run every config on this Ray cluster")
    r.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    r.add_argument(
        "--section", default=SECTION, help=f"heading of the generated section (default {SECTION!r})"
    )
    r.add_argument("--dry-run", action="store_true", help="list the configurations and stop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    overrides = {
        k: getattr(args, k)
        for k in ("clients", "rounds", "local_steps", "audit_every", "audit_clients",
                  "audit_iterations", "audit_time_limit")
        if getattr(args, k) is not None
    }  # fmt: skip
    if args.attacks is not None:
        overrides["attack_filter"] = args.attacks
    budget = replace(profile.budget, **overrides)
    exps = grid(
        profile,
        datasets=args.datasets,
        models=args.models,
        defenses=args.defenses,
        settings=args.settings,
        budget=budget,
    )
    results_dir: Path = args.results_dir
    if args.dry_run:
        for e in exps:
            state = "done" if (results_dir / e.key() / "result.json").exists() else "to run"
            print(
                f"{e.key()}  {e.dataset} {e.model} {e.defense} {e.mode} B={e.batch_size}  "
                f"attacks {','.join(e.attacks())}  [{state}]"
            )
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    timeout = args.timeout or profile.timeout
    started = time.perf_counter()
    results, failures = [], []
    reused = 0
    for i, e in enumerate(exps, 1):
        label = f"[{i}/{len(exps)}] {e.dataset} {e.model} {e.defense} {e.mode} B={e.batch_size}"
        if (results_dir / e.key() / "result.json").exists():
            print(f"{label}: done earlier, skipped ({e.key()})", flush=True)
            reused += 1
        else:
            print(f"{label}: running ({e.key()})", flush=True)
        t0 = time.perf_counter()
        try:
            res = run_experiment(
                e, results_dir, device=device, timeout=timeout, ray_address=args.ray_address
            )
        except RuntimeError as err:
            print(f"{label}: FAILED: {err}", flush=True)
            failures.append((e, str(err)))
            continue
        results.append(res)
        best = strongest(res)
        leak = f"{best[0]} {best[1]['success_rate']:.0%}" if best else "no scored attack"
        print(
            f"{label}: accuracy {res['final_accuracy']:.3f}, strongest attack {leak} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    if results or failures:
        command = "python " + shlex.join(
            ["benchmarks/defenses.py", *(argv if argv is not None else sys.argv[1:])]
        )
        report(
            results,
            failures,
            replace(profile, budget=budget),  # the header states the budget actually used
            doc=args.doc,
            figures=args.figures or args.doc.parent,
            results_dir=results_dir,
            command=command,
            wall=time.perf_counter() - started,
            section=args.section,
            reused=reused,
        )
        print(
            f"wrote {args.doc} ({len(results)} configurations, {len(failures)} failed) in "
            f"{(time.perf_counter() - started) / 60:.1f} min"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
