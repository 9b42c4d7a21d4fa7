"""Gradient inversion on plain and PRECODE models, and the speed of the ig objective.

On CIFAR-10 test images (batch 1, untrained seeded models, labels recovered from the
gradient), for ``mlp`` and ``convnet``, plain and PRECODE: PSNR/SSIM/success of
``analytic`` (MLP only: it needs a Linear layer that sees the image), ``ig`` (the PRECODE
paper's configuration) and ``ignore-bottleneck`` (PRECODE models), scored with
:func:`precode_flower.metrics.score`; plus a grid of the reconstructions. The speed
section times one ig iteration against one forward+backward of the paper's MLP (batch 1),
the straightforward double-backpropagation objective for comparison, and the wall time ig
needs to reach SSIM >= 0.99 on the plain MLP.

    python benchmarks/attacks.py                 # full run: writes docs/ATTACKS.md + grid
    python benchmarks/attacks.py --quick         # smoke test, writes under runs/
    python benchmarks/attacks.py --batch-grid    # batch attacks (MLP): its own docs section

``--device cuda`` runs models, updates and attacks on the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from report import load_note, provenance, write_section  # noqa: I001  (benchmarks/ is on sys.path)

import precode_flower as pf
from precode_flower import data, metrics
from precode_flower.attacks import reconstruct
from precode_flower.attacks.base import spec as attack_spec
from precode_flower.models import build
from precode_flower.plotting import image_grid
from precode_flower.training import compute_gradients

SHAPE = (3, 32, 32)
ROOT = Path(__file__).resolve().parent.parent
#: Where models, updates and attacks run (``--device``); workers get it in their job.
DEVICE = torch.device("cpu")


def make(arch: str, precode: bool) -> torch.nn.Module:
    """The attacked model: seeded, untrained; PRECODE shares the plain model's weights."""
    torch.manual_seed(0)
    model = build(arch, 10, SHAPE)
    model = pf.extend(model, input_shape=SHAPE) if precode else model
    return model.to(DEVICE)


def attacks_for(arch: str, precode: bool) -> list[str]:
    names = ["analytic"] if arch == "mlp" else []
    names.append("ig")
    if precode:
        names.append("ignore-bottleneck")
    return names


def client_update(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, index: int):
    torch.manual_seed(1000 + index)  # the client's own PRECODE draw, unknown to the server
    device = next(model.parameters()).device
    grads, _ = compute_gradients(model, x.to(device), y.to(device))
    return grads


def run_cell_image(job: dict[str, Any]) -> dict[str, Any]:
    """All attacks of one (model, defence) cell on one image; runs in a worker process."""
    global DEVICE
    DEVICE = torch.device(job.get("device", "cpu"))
    torch.set_num_threads(job["threads"])
    bundle = data.load("cifar10")
    x_all, y_all = bundle.test.tensors
    i = job["index"]
    x, y = x_all[i : i + 1], y_all[i : i + 1]
    model = make(job["arch"], job["precode"])
    grads = client_update(model, x, y, i)
    out = {"arch": job["arch"], "precode": job["precode"], "index": i, "results": {}}
    for attack in attacks_for(job["arch"], job["precode"]):
        options: dict[str, Any] = {}
        if attack != "analytic":
            options["iterations"] = job["iterations"][job["arch"]]
        result = reconstruct(
            attack,
            model,
            grads,
            labels=None,
            input_shape=SHAPE,
            mean=bundle.mean,
            std=bundle.std,
            seed=i,
            **options,
        )
        scores = metrics.score(result, x, y, bundle.mean, bundle.std)
        scores["iterations"] = result.info.get("iterations")
        out["results"][attack] = {"score": scores, "images": result.images}
        print(
            f"  {job['arch']:8s} {'precode' if job['precode'] else 'plain':8s} img {i} "
            f"{attack:18s} ssim {scores['ssim']:.3f} psnr {scores['psnr']:6.2f} "
            f"{result.seconds:6.1f}s",
            flush=True,
        )
    return out


# -- speed ----------------------------------------------------------------------------------


def _median_block(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def ig_seconds_per_iteration(model, grads, y, fast: bool, short: int, long: int) -> float:
    """Per-iteration time of the whole ig loop; the difference of two runs cancels setup."""
    times = []
    for n in (short, long):
        result = reconstruct(
            "ig",
            model,
            grads,
            labels=y,
            input_shape=SHAPE,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            iterations=n,
            fast=fast,
        )
        times.append(result.seconds)
    return (times[1] - times[0]) / (long - short)


def speed(x: torch.Tensor, y: torch.Tensor, rounds: int, quick: bool) -> dict[str, Any]:
    """Interleaved timings on the paper's MLP, batch 1 (medians over ``rounds``)."""
    model = make("mlp", False)
    x, y = x.to(DEVICE), y.to(DEVICE)
    grads, _ = compute_gradients(model, x, y)
    params = list(model.parameters())

    def fwd_bwd() -> None:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    for _ in range(10):
        fwd_bwd()
    fb, fast, naive = [], [], []
    short, long = (20, 120) if quick else (50, 550)
    naive_short, naive_long = (5, 15) if quick else (10, 60)
    for _ in range(rounds):
        fb.append(_median_block(fwd_bwd, 50 if quick else 200))
        fast.append(ig_seconds_per_iteration(model, grads, y, True, short, long))
        naive.append(ig_seconds_per_iteration(model, grads, y, False, naive_short, naive_long))
    out = {
        "threads": torch.get_num_threads(),
        "fwd_bwd_ms": 1e3 * statistics.median(fb),
        "ig_fast_ms": 1e3 * statistics.median(fast),
        "ig_naive_ms": 1e3 * statistics.median(naive),
    }
    out["fast_ratio"] = out["ig_fast_ms"] / out["fwd_bwd_ms"]
    out["naive_ratio"] = out["ig_naive_ms"] / out["fwd_bwd_ms"]
    return out


def time_to_ssim(x_all, y_all, mean, std, indices: list[int], target: float) -> list[dict]:
    """Wall time of ig (paper's configuration, labels known) until SSIM >= target."""
    model = make("mlp", False)
    rows = []
    for i in indices:
        x, y = x_all[i : i + 1], y_all[i : i + 1]
        grads = client_update(model, x, y, i)

        def reached(_iteration: int, images: torch.Tensor, x: torch.Tensor = x) -> bool:
            return float(metrics.ssim(images.cpu(), x, mean, std).mean()) >= target

        result = reconstruct(
            "ig",
            model,
            grads,
            labels=y,
            input_shape=SHAPE,
            mean=mean,
            std=std,
            seed=i,
            stop_when=reached,
            check_every=10,
        )
        ssim = float(metrics.ssim(result.images, x, mean, std).mean())
        rows.append(
            {
                "index": i,
                "seconds": result.seconds,
                "iterations": result.info["iterations"],
                "ssim": ssim,
                "reached": ssim >= target,
            }
        )
        print(f"  time to SSIM {target}: img {i} {result.seconds:.1f}s", flush=True)
    return rows


def noise_effect(x_all, y_all, indices: list[int]) -> dict[str, float]:
    """Cosine similarity of one image's gradients under two PRECODE draws (mean over images).

    How much the bottleneck's noise changes the update the server sees: the attacker can
    only match the gradient up to this.
    """
    out = {}
    for arch in ("mlp", "convnet"):
        model = make(arch, True)
        (_, vb), stds = pf.bottlenecks(model)[0], []
        # The posterior std the images get (the bottleneck's own posterior of its input).
        hook = vb.register_forward_pre_hook(
            lambda m, args, out=stds: out.append(m.posterior(args[0])[1].mean().item())
        )
        sims = []
        for i in indices:
            x, y = x_all[i : i + 1], y_all[i : i + 1]
            a = torch.cat([g.flatten() for g in client_update(model, x, y, i)])
            b = torch.cat([g.flatten() for g in client_update(model, x, y, i + 10_000)])
            sims.append(float(F.cosine_similarity(a, b, dim=0)))
        hook.remove()
        out[arch] = statistics.mean(sims)
        out[f"initial_std_{arch}"] = statistics.mean(stds)
    return out


# -- report ---------------------------------------------------------------------------------


def summarise(outs: list[dict[str, Any]], cells, iterations) -> tuple[str, list[dict]]:
    lines = [
        "| model | defence | attack | iterations | PSNR (dB) | SSIM | success | labels | "
        "time/image |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    table = []
    for arch, precode in cells:
        for attack in attacks_for(arch, precode):
            scores = [
                o["results"][attack]["score"]
                for o in outs
                if o["arch"] == arch and o["precode"] == precode
            ]
            n = len(scores)
            row = {
                "model": arch,
                "defence": "PRECODE" if precode else "none",
                "attack": attack,
                "iterations": None if attack == "analytic" else iterations[arch],
                "psnr": statistics.mean(s["psnr"] for s in scores),
                "psnr_sd": statistics.pstdev(s["psnr"] for s in scores),
                "ssim": statistics.mean(s["ssim"] for s in scores),
                "ssim_sd": statistics.pstdev(s["ssim"] for s in scores),
                "success": sum(s["success"] for s in scores),
                "n": n,
                "label_accuracy": statistics.mean(s["label_accuracy"] for s in scores),
                "seconds": statistics.mean(s["seconds"] for s in scores),
            }
            table.append(row)
            its = "-" if row["iterations"] is None else str(row["iterations"])
            psnr = (
                "exact (capped)"
                if row["psnr"] > 100
                else f"{row['psnr']:.2f} ± {row['psnr_sd']:.2f}"
            )
            lines.append(
                f"| {arch} | {row['defence']} | `{attack}` | {its} | {psnr} | "
                f"{row['ssim']:.3f} ± {row['ssim_sd']:.3f} | {row['success']}/{n} | "
                f"{row['label_accuracy']:.2f} | {row['seconds']:.1f} s |"
            )
    return "\n".join(lines), table


# -- batch grid (label counts, exact batch recovery, BatchNorm prior) --------------------------

#: Beyond this batch, ``spear``'s random subsets (success ~2^-(B-1) each) are not run.
SPEAR_MAX_BATCH = 16
#: Batch-1 attacks the batch grid runs when ``--attacks`` names them (where they apply).
CLASSIC_ATTACKS = ("analytic", "ig", "ignore-bottleneck", "dlg")


def batch_attacks(arch: str, precode: bool, batch: int) -> list[str]:
    """Attacks of the batch grid that apply to a cell."""
    names = ["label-counts"]
    if batch % 4 == 0:
        names.append("label-counts-fedavg4")
    if arch == "mlp":
        if batch <= SPEAR_MAX_BATCH:
            names.append("spear")
        names.append("cocktail")
    if arch == "resnet18" and not precode:
        names += ["ig", "ig+bn"]
    return names


def count_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of the batch whose label is counted right: sum_c min(n_c, n_c*) / B."""
    p = torch.bincount(predicted.cpu(), minlength=10)
    t = torch.bincount(true.cpu(), minlength=10)
    return float(torch.minimum(p, t).sum()) / len(true)


def run_batch_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Every applicable attack on one batch of one (model, defence, batch size) cell."""
    import copy

    from precode_flower.attacks.gradient_matching import bn_stats_from_buffers
    from precode_flower.training import train

    global DEVICE
    DEVICE = torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    bundle = data.load("cifar10")
    x_all, y_all = bundle.test.tensors
    b, trial = job["batch"], job["trial"]
    gen = torch.Generator().manual_seed(10_000 * b + trial)
    idx = torch.randperm(len(y_all), generator=gen)[:b]
    x, y = x_all[idx], y_all[idx]
    model = make(job["arch"], job["precode"])
    client = copy.deepcopy(model)  # its train-mode pass updates BatchNorm buffers
    grads = client_update(client, x, y, trial)
    common = {"input_shape": SHAPE, "mean": bundle.mean, "std": bundle.std, "seed": trial}
    rows = []
    grid = batch_attacks(job["arch"], job["precode"], b)
    # The batch-1 attacks run here only when asked for, on the models their declarations
    # say they apply to (e.g. analytic at batch 4 on the MLP, dlg anywhere).
    grid += [
        a
        for a in job["attacks"]
        if a in CLASSIC_ATTACKS and a not in grid and attack_spec(a).why_not(model, SHAPE) is None
    ]
    for attack in grid:
        if job["attacks"] and attack not in job["attacks"]:
            continue
        name, update, options = attack, grads, {}
        if attack == "label-counts-fedavg4":
            fed = copy.deepcopy(model)
            train(fed, (x, y), epochs=1, batch_size=b // 4, lr=0.01, seed=trial)
            update = [
                n.detach() - o.detach()
                for n, o in zip(fed.parameters(), model.parameters(), strict=True)
            ]
            name = "label-counts"
            options = {"update": True, "local_steps": 4, "local_lr": 0.01}
        elif attack == "ignore-bottleneck":
            options = {"iterations": job["ig_iterations"]}
        elif attack in ("ig", "ig+bn"):
            name = "ig"
            options = {"iterations": job["ig_iterations"], "lr": 0.1}
            if attack == "ig+bn":
                options["bn_prior"] = 0.03
                options["bn_stats"] = bn_stats_from_buffers(model, client.state_dict())
        result = reconstruct(name, model, update, labels=None, batch_size=b, **common, **options)
        row: dict[str, Any] = {
            "arch": job["arch"],
            "precode": job["precode"],
            "batch": b,
            "trial": trial,
            "attack": attack,
            "seconds": result.seconds,
            "label_count_accuracy": count_accuracy(result.labels, y),
        }
        if not attack.startswith("label-counts"):
            score = metrics.score(result, x, y, bundle.mean, bundle.std)
            ssims = score["per_image"]["ssim"]
            row["recognisable"] = sum(v >= 0.6 for v in ssims)
            row["ssim"] = statistics.mean(ssims)
            row["claimed"] = result.recovered
            # Claimed slots are the first ones: each must equal some original.
            claimed = result.images[: result.recovered or 0].flatten(1)
            err = (claimed[:, None] - x.flatten(1)[None]).abs().amax(2) if len(claimed) else None
            row["claimed_exact"] = 0 if err is None else int((err.min(1).values < 1e-3).sum())
        rows.append(row)
        print(
            f"  {job['arch']:8s} {'precode' if job['precode'] else 'plain':7s} B={b:<3d} "
            f"t{trial} {attack:21s} {row.get('claimed', '-')!s:>3s} claimed, "
            f"{row.get('recognisable', '-')!s:>3s} ssim>=0.6, counts "
            f"{row['label_count_accuracy']:.3f}, {result.seconds:6.1f}s",
            flush=True,
        )
    return {"rows": rows}


def summarise_batch(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    keys = sorted(
        {(r["arch"], r["precode"], r["attack"], r["batch"]) for r in rows},
        key=lambda k: (k[0], k[1], k[2], k[3]),
    )
    lines = [
        "| model | defence | attack | batch | images | claimed exact (verified / claimed) | "
        "SSIM >= 0.6 | mean SSIM | label counts | s / batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = []
    for arch, precode, attack, b in keys:
        cell = [
            r
            for r in rows
            if (r["arch"], r["precode"], r["attack"], r["batch"]) == (arch, precode, attack, b)
        ]
        n = b * len(cell)
        entry = {
            "model": arch,
            "defence": "PRECODE" if precode else "none",
            "attack": attack,
            "batch": b,
            "images": n,
            "label_count_accuracy": statistics.mean(r["label_count_accuracy"] for r in cell),
            "seconds": statistics.mean(r["seconds"] for r in cell),
        }
        if "claimed" in cell[0]:
            entry["claimed"] = sum(r["claimed"] or 0 for r in cell)
            entry["claimed_exact"] = sum(r["claimed_exact"] for r in cell)
            entry["recognisable"] = sum(r["recognisable"] for r in cell)
            claims = any(r["claimed"] is not None for r in cell)
            claimed = f"{entry['claimed_exact']} / {entry['claimed']}" if claims else "-"
            recog = f"{entry['recognisable']}/{n}"
            entry["ssim"] = statistics.mean(r["ssim"] for r in cell)
            ssim = f"{entry['ssim']:.3f}"
        else:
            claimed = recog = ssim = "-"
        table.append(entry)
        lines.append(
            f"| {arch} | {entry['defence']} | `{attack}` | {b} | {n} | {claimed} | {recog} | "
            f"{ssim} | {entry['label_count_accuracy']:.3f} | {entry['seconds']:.1f} |"
        )
    return "\n".join(lines), table


def batch_grid(args: argparse.Namespace) -> None:
    """Run the batch grid and write its section of docs/ATTACKS.md (or ``--out``)."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    jobs = []
    for arch in archs:
        for precode in (False, True):
            for b in batches:
                trials = args.trials or max(1, -(-8 // b))  # at least 8 images per cell
                for t in range(trials):
                    jobs.append(
                        {
                            "arch": arch,
                            "precode": precode,
                            "batch": b,
                            "trial": t,
                            "device": str(DEVICE),
                            "threads": args.threads,
                            "ig_iterations": args.ig_iterations,
                            "attacks": [a for a in args.attacks.split(",") if a],
                        }
                    )
    print(f"{len(jobs)} batch jobs on {args.workers} worker(s), device {DEVICE}", flush=True)
    if args.workers > 1:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
            outs = list(pool.map(run_batch_cell, jobs))
    else:
        outs = [run_batch_cell(job) for job in jobs]
    rows = [r for o in outs for r in o["rows"]]
    table, summary = summarise_batch(rows)
    minutes = (time.perf_counter() - started) / 60
    out_dir = Path(args.out).parent if args.out else ROOT / "docs"
    report = Path(args.out) if args.out else out_dir / "ATTACKS.md"
    suffix = "".join(
        "_" + a.replace(",", "_")
        for a in (args.archs if args.archs != "mlp" else "", args.attacks)
        if a
    )
    raw = out_dir / f"attacks_batch{suffix}.json"
    raw.write_text(
        json.dumps(
            {
                "date": dt.date.today().isoformat(),
                "command": "python " + " ".join(sys.argv),
                "device": str(DEVICE),
                "table": summary,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    try:
        raw_name = raw.relative_to(ROOT)
    except ValueError:
        raw_name = raw
    body = f"""{provenance()}Device: {DEVICE}; {load_note(load_before)};
workers: {args.workers}; total {minutes:.1f} min.
Raw numbers: `{raw_name}`.

CIFAR-10 test images, untrained seeded models, FedSGD gradients of one batch (labels not
given to any attack). `label-counts-fedavg4`: the update of 4 local SGD steps (lr 0.01) over
the same batch. *claimed exact*: images an attack claims (verified against the gradient),
and how many of them equal an original to 1e-3; *SSIM >= 0.6*: images recognisable after
matching (claimed or not); *label counts*: fraction of the batch whose label is counted
right, `sum_c min(n_c, n_c*) / B`. `spear` runs up to batch {SPEAR_MAX_BATCH} (its cost grows
as 2^B).

{table}
"""
    scope = [a for a in (args.archs if args.archs != "mlp" else "", args.attacks) if a]
    heading = "Batch attacks: benchmark results" + (f" ({'; '.join(scope)})" if scope else "")
    write_section(report, heading, body, title="# Attacks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke configuration")
    parser.add_argument("--images", type=int, default=None, help="test images (default 8)")
    parser.add_argument("--iterations", type=int, default=None, help="ig iterations (7000)")
    parser.add_argument(
        "--convnet-iterations", type=int, default=None, help="ig iterations on convnet"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="attack processes in parallel")
    parser.add_argument("--rounds", type=int, default=None, help="speed timing rounds (5)")
    parser.add_argument("--out", default=None, help="report (docs/ATTACKS.md)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--batch-grid",
        action="store_true",
        help="run the batch grid (label-counts, spear, cocktail, ig + BN prior) instead",
    )
    parser.add_argument("--archs", default="mlp", help="batch grid: models (mlp,convnet,resnet18)")
    parser.add_argument("--batches", default="1,8,16,32,64", help="batch grid: batch sizes")
    parser.add_argument("--trials", type=int, default=None, help="batch grid: batches per cell")
    parser.add_argument(
        "--attacks", default="", help="batch grid: only these attacks (comma-separated)"
    )
    parser.add_argument(
        "--ig-iterations",
        type=int,
        default=2000,
        help="batch grid: ig and ignore-bottleneck iterations",
    )
    args = parser.parse_args()

    global DEVICE
    try:
        DEVICE = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.batch_grid:
        unknown = [
            a for a in args.archs.split(",") if a.strip() not in ("mlp", "convnet", "resnet18")
        ]
        if unknown:
            parser.error(f"--archs: unknown model {unknown[0]!r}")
        try:
            sizes = [int(b) for b in args.batches.split(",")]
        except ValueError:
            parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
        if any(b < 1 for b in sizes):
            parser.error("--batches must be >= 1")
        torch.set_num_threads(args.threads)
        batch_grid(args)
        return

    quick = args.quick
    n_images = args.images or (2 if quick else 8)
    if not 1 <= n_images <= 10:
        parser.error("--images must be between 1 and 10 (one image per class)")
    its = args.iterations or (100 if quick else 7000)
    iterations = {"mlp": its, "convnet": args.convnet_iterations or its}
    rounds = args.rounds or (1 if quick else 5)
    out_dir = (
        Path(args.out).parent if args.out else (ROOT / ("runs/bench_attacks" if quick else "docs"))
    )
    report = Path(args.out) if args.out else out_dir / "ATTACKS.md"
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    bundle = data.load("cifar10")
    x_all, y_all = bundle.test.tensors
    mean, std = bundle.mean, bundle.std

    print("speed (paper's MLP, batch 1)", flush=True)
    # One image per class (the test split is sorted by class): the first of classes 0, 1, ...
    indices = [int((y_all == c).nonzero()[0]) for c in range(n_images)]
    spd = speed(x_all[:1], y_all[:1], rounds, quick)
    print(f"  {spd}", flush=True)
    ttss = time_to_ssim(x_all, y_all, mean, std, indices, 0.99)
    noise = noise_effect(x_all, y_all, indices)
    print(f"  gradient cosine under two PRECODE draws: {noise}", flush=True)

    cells = [("mlp", False), ("mlp", True), ("convnet", False), ("convnet", True)]
    jobs = [
        {
            "arch": a,
            "precode": p,
            "index": i,
            "iterations": iterations,
            "threads": args.threads,
            "device": str(DEVICE),
        }
        for a, p in cells
        for i in indices
    ]
    print(f"{len(jobs)} attack jobs on {args.workers} worker(s)", flush=True)
    if args.workers > 1:
        # spawn: forking a process that already ran torch's thread pools can deadlock.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
            outs = list(pool.map(run_cell_image, jobs))
    else:
        outs = [run_cell_image(job) for job in jobs]
    total_minutes = (time.perf_counter() - started) / 60

    grid_rows = {"original": x_all[indices]}
    for arch, precode in cells:
        for attack in attacks_for(arch, precode):
            key = f"{arch} {'PRECODE' if precode else 'plain'}\n{attack}"
            grid_rows[key] = torch.cat(
                [
                    o["results"][attack]["images"]
                    for o in sorted(outs, key=lambda o: o["index"])
                    if o["arch"] == arch and o["precode"] == precode
                ]
            )
    grid = out_dir / "attacks_grid.png"
    image_grid(grid_rows, mean, std, grid, title="CIFAR-10 test images, batch 1, untrained models")

    table, rows = summarise(outs, cells, iterations)
    results = {
        "date": dt.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "speed": spd,
        "time_to_ssim_0.99": ttss,
        "precode_noise_gradient_cosine": noise,
        "table": rows,
        "per_image": [
            {k: v for k, v in o.items() if k != "results"}
            | {a: r["score"] for a, r in o["results"].items()}
            for o in outs
        ],
    }
    (out_dir / "attacks_benchmark.json").write_text(json.dumps(results, indent=1) + "\n")

    reached = [r for r in ttss if r["reached"]]
    secs = [r["seconds"] for r in ttss]
    iters = [r["iterations"] for r in ttss]
    fb, fast = f"{spd['fwd_bwd_ms']:.2f}", f"{spd['ig_fast_ms']:.2f}"
    naive, fast_x = f"{spd['ig_naive_ms']:.2f}", f"{spd['fast_ratio']:.2f}"
    naive_x = f"{spd['naive_ratio']:.2f}"
    budget_note = (
        ""
        if iterations["mlp"] == iterations["convnet"]
        else f" ({iterations['convnet']} on convnet, to fit the time budget)"
    )
    body = f"""{provenance()}{load_note(load_before)};
attack processes in parallel: {args.workers}; total wall time {total_minutes:.1f} min.
Raw numbers: `{(out_dir / "attacks_benchmark.json").relative_to(ROOT)}`.

### Speed of one `ig` iteration (paper's MLP, CIFAR-10 3x32x32, batch 1)

Medians over {rounds} interleaved rounds, {spd["threads"]} torch thread(s). An ig iteration is
the whole loop step (objective, backward to the image, signed Adam step, boxing), timed as
the difference of two runs of different lengths so that setup cancels.

| | ms | x forward+backward |
|---|---:|---:|
| forward + backward (loss, gradients of all parameters) | {fb} | 1.0 |
| `ig` iteration, Gram-route objective (`fast=True`, default) | {fast} | **{fast_x}** |
| `ig` iteration, materialised gradients (`fast=False`) | {naive} | {naive_x} |

Target: <= 5x. The Gram route is {spd["ig_naive_ms"] / spd["ig_fast_ms"]:.1f}x faster than the
straightforward double-backpropagation objective.

### Wall time to SSIM >= 0.99 (plain MLP, batch 1, labels known)

`ig` with the paper's configuration and `stop_when` checking SSIM every 10 iterations
(the checks are included in the time), one run per test image:
reached on {len(reached)}/{len(ttss)} images; wall time median {statistics.median(secs):.1f} s,
max {max(secs):.1f} s; iterations median {statistics.median(iters):.0f}, max {max(iters)}.
Target: <= 60 s.

### Reconstruction quality (batch 1, untrained models, labels recovered)

{n_images} CIFAR-10 test images (the first test image of each of the classes
{", ".join(bundle.classes[:n_images])}), one client update
each (the client's PRECODE draw seeded differently from the attacker's). Means ± standard
deviations over the images; success = SSIM >= {metrics.SUCCESS_SSIM}. `iterations` is the ig
iteration budget{budget_note};
the paper's configuration is 7000.

{table}

How much PRECODE's noise changes an update: the cosine similarity between the gradients of
the same image under two different bottleneck draws is {noise["mlp"]:.4f} (mlp) and
{noise["convnet"]:.4f} (convnet) on these untrained models, whose posterior std (the paper's
softplus of the encoder output) is {noise["initial_std_mlp"]:.3f} (mlp) and
{noise["initial_std_convnet"]:.3f} (convnet) on average over these images.

![reconstructions]({grid.name})
"""
    write_section(report, "Benchmark results", body, title="# Gradient inversion attacks")
    print(f"wrote {report}, {grid} in {total_minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
