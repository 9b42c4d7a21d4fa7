"""Audit one model against gradient inversion: ``python -m precode_flower.attack``.

Takes test images, computes a client's FedSGD update on each batch (exactly as a client
would: :func:`precode_flower.training.compute_gradients`), runs the chosen attacks on it
as an honest-but-curious server would, and prints one JSON line per image and attack::

    python -m precode_flower.attack --model mlp --defense precode --attack analytic,dlg
    python -m precode_flower.attack --dataset mnist --model convnet --defense precode-early \
        --weights runs/a/model.pt --attack ig,ignore-bottleneck,dlg   # a model a run trained

Fields: dataset, model, defense, attack, batch, index (test-set index), label, psnr, ssim,
mse, label_correct, success (this image's SSIM >= --success-ssim), recovered, seconds,
loss. A failing attack prints ``{"error": ...}`` for that batch instead and the others go
on; the exit status is then 1. ``grid.png`` (owner-only permissions: reconstructions are
private data) in ``--out`` shows the originals and each attack's matched reconstructions.
Labels are recovered from the gradient unless ``--known-labels``.

Memory: each attack's registered estimate (:mod:`precode_flower.attacks.memory`) is checked
against ``--memory-gb`` (default: half the memory available at start) before it runs on a
batch; one above it prints ``{"skipped": ...}`` with both numbers instead (exit status 1).
The attacks then run under that budget as a hard limit (``RLIMIT_DATA`` above the size
reached once the data and model are loaded), so an underestimate fails that attack with an
out-of-memory error instead of the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import data, metrics, models, plotting, settings, training
from .attacks import ATTACKS, reconstruct
from .attacks import memory as attack_memory
from .attacks.base import reconstructs_images, spec
from .audit import budget
from .defenses import DEFENSES, DefenseParams, apply_model_defenses
from .private import private_dir

#: Defenses that change the model (the others act on updates, which this tool does not send).
MODEL_DEFENSES = ("none", *(n for n, d in DEFENSES.items() if d.model is not None))
#: Their parameters (DefenseParams fields), each a flag declared where the field is.
MODEL_DEFENSE_PARAMS = tuple(
    dict.fromkeys(p for d in DEFENSES.values() if d.model is not None for p in d.params)
)

DEFAULT_ATTACKS = ("analytic", "ig")


def _split_attacks(values: Sequence[str] | None) -> list[str]:
    names: list[str] = []
    for value in values or [",".join(DEFAULT_ATTACKS)]:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


class _OneLineParser(argparse.ArgumentParser):
    """Errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m precode_flower.attack",
        description="Run gradient inversion attacks on client updates and score them.",
    )
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--data-dir", default=None, help="read the dataset from here only")
    p.add_argument("--model", default="mlp", choices=models.MODELS)
    p.add_argument("--defense", default="none", choices=MODEL_DEFENSES)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="state dict to attack (e.g. a run's model.pt; same --model/--defense/--dataset)",
    )
    p.add_argument(
        "--attack",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"attack(s), repeatable or comma-separated (default: {','.join(DEFAULT_ATTACKS)})",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--images", type=int, default=4, help="random test images (seeded)")
    which.add_argument("--index", type=int, nargs="+", help="test-set indices to attack")
    p.add_argument("--batch-size", type=int, default=1, help="examples per client update")
    p.add_argument("--iterations", type=int, default=None, help="for iterative attacks")
    p.add_argument("--known-labels", action="store_true", help="give attacks the true labels")
    p.add_argument("--train-steps", type=int, default=0, help="SGD steps before attacking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("runs/attack"))
    p.add_argument("--success-ssim", type=float, default=metrics.SUCCESS_SSIM)
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="memory the attacks may use, in GB (default: half the memory available at start)",
    )
    settings.add_arguments(
        p, DefenseParams, only=MODEL_DEFENSE_PARAMS, titles={"training": "model defenses"}
    )
    return p


def _accepts(attack: Any, option: str) -> bool:
    """Whether an attack takes keyword ``option`` (explicitly or through ``**options``)."""
    params = inspect.signature(attack).parameters.values()
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.attacks = _split_attacks(args.attack)
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {unknown[0]!r}; choose from: {', '.join(sorted(ATTACKS))}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.index is None and args.images < 1:
        parser.error("--images must be >= 1")
    if args.iterations is not None and args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if args.memory_gb is not None and not (0 < args.memory_gb < float("inf")):
        parser.error("--memory-gb must be a positive number of GB")
    if not 0 <= args.seed <= 2**63 - 1:
        parser.error(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.train_steps < 0:
        parser.error(f"--train-steps must be >= 0, got {args.train_steps}")
    # Checked before any attack runs: a bad --device or --out would lose their results.
    problem = _device_problem(args.device) or _out_problem(args.out)
    if problem:
        parser.error(problem)
    return args


def _device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used here, or None."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device (cpu, cuda, cuda:N)"
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            return f"--device {device}: this machine has {count} CUDA device(s)"
    elif dev.type != "cpu":
        return f"--device {device}: only cpu and cuda devices are supported"
    return None


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot hold the results, or None (it is then an owner-only directory)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory"
    try:
        private_dir(out)
    except OSError as err:
        return f"--out {out}: cannot create it ({err.strerror or err})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out}: not writable"
    return None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a saved state dict into ``model``; a mismatch names the file and the keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise SystemExit(
            f"--weights {path}: cannot read a state dict ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict):
        raise SystemExit(f"--weights {path}: expected a state dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise SystemExit(
            f"--weights {path} does not fit this --model/--defense/--dataset: {' '.join(first)}"
        ) from None


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the audit; returns the exit status (0 ok, 1 some attack failed, 2 usage)."""
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        bundle = data.load(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as err:  # one line, not a traceback
        build_parser().error("; ".join(line.strip() for line in str(err).splitlines()))
    x_test, y_test = training.as_tensors(bundle.test)
    if args.index is not None:
        bad = [i for i in args.index if not 0 <= i < len(y_test)]
        if bad:
            build_parser().error(f"--index {bad[0]} is outside the test set (0..{len(y_test) - 1})")
        indices = list(args.index)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        indices = torch.randperm(len(y_test), generator=gen)[: args.images].tolist()

    torch.manual_seed(args.seed)
    model = models.build(args.model, bundle.num_classes, bundle.input_shape)
    params = settings.from_namespace(DefenseParams, args)
    model = apply_model_defenses(model, [args.defense], params, bundle.input_shape)
    if args.weights is not None:
        load_weights(model, args.weights)
    model.to(device)
    if args.train_steps:
        training.train(model, bundle.train, steps=args.train_steps, seed=args.seed, progress=True)

    common = {"dataset": args.dataset, "model": args.model, "defense": args.defense}
    limit = (
        budget.default_memory_budget()
        if args.memory_gb is None
        else int(args.memory_gb * budget.GB)
    )
    fp = attack_memory.footprint(model, bundle.input_shape)
    batches = [indices[i : i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    originals = [x_test[idx] for idx in batches]
    # Re-identification candidates: other test images, none of those attacked.
    pool = data.reference_pool(bundle, exclude=indices)
    grid: dict[str, list[torch.Tensor]] = {a: [] for a in args.attacks}
    failed = 0
    for b, idx in enumerate(tqdm(batches, desc="batches", file=sys.stderr)):
        x, y = x_test[idx].to(device), y_test[idx].to(device)
        grads, _ = training.compute_gradients(model, x, y)
        for name in args.attacks:
            options: dict[str, Any] = {}
            if args.iterations is not None and _accepts(ATTACKS[name], "iterations"):
                options["iterations"] = args.iterations
            case = attack_memory.MemoryCase(
                fp, len(idx), tuple(bundle.input_shape), options=options, scored=True
            )
            need = attack_memory.estimate_memory(spec(name).memory, case)
            if limit is not None and need > limit:
                failed += 1
                why = (
                    f"estimated peak memory {budget.gb(need)} GB exceeds the budget of "
                    f"{budget.gb(limit)} GB (--memory-gb)"
                )
                _emit({**common, "attack": name, "batch": b, "indices": idx, "skipped": why})
                grid[name].append(torch.zeros_like(originals[b]))
                continue
            try:
                # The attack (and its scoring) under the budget as a hard limit (CPU),
                # restored after: main() may run in-process.
                with budget.hard_limit(limit if device.type == "cpu" else None):
                    result = reconstruct(
                        name,
                        model,
                        grads,
                        labels=y if args.known_labels else None,
                        input_shape=bundle.input_shape,
                        mean=bundle.mean,
                        std=bundle.std,
                        batch_size=len(idx),
                        seed=args.seed,
                        **options,
                    )
                    scores = metrics.score(
                        result,
                        x.cpu(),
                        y.cpu(),
                        bundle.mean,
                        bundle.std,
                        success_ssim=args.success_ssim,
                    )
            except Exception as err:  # noqa: BLE001 - report and go on with the other attacks
                failed += 1
                error = f"{type(err).__name__}: {err}"
                if budget.is_out_of_memory(err):
                    error = f"out of memory (--memory-gb {budget.gb(limit)}): {error[:300]}"
                _emit({**common, "attack": name, "batch": b, "indices": idx, "error": error})
                grid[name].append(torch.zeros_like(originals[b]))
                continue
            matched = result.images[torch.as_tensor(scores["match"])]
            grid[name].append(matched)
            linked = metrics.identified(matched, x.cpu(), pool, bundle.mean, bundle.std)
            per = scores["per_image"]
            for i, index in enumerate(idx):
                correct = per["label_correct"]
                _emit(
                    {
                        **common,
                        "attack": name,
                        "batch": b,
                        "index": index,
                        "label": int(y_test[index]),
                        "psnr": per["psnr"][i],
                        "ssim": per["ssim"][i],
                        "mse": per["mse"][i],
                        "label_correct": None if correct is None else correct[i],
                        "success": per["ssim"][i] >= args.success_ssim,
                        # Re-identified: some reconstruction resembles this image more
                        # than any reconstruction resembles a pool image.
                        "linked": bool(linked[i]) if reconstructs_images(name) else None,
                        "recovered": scores["recovered"],
                        "seconds": scores["seconds"],
                        "loss": scores["loss"],
                    }
                )
    rows = {"original": torch.cat(originals)}
    rows.update({name: torch.cat(imgs) for name, imgs in grid.items()})
    title = f"{args.dataset} / {args.model} / defense: {args.defense} / batch {args.batch_size}"
    path = plotting.image_grid(rows, bundle.mean, bundle.std, args.out / "grid.png", title=title)
    print(f"grid: {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
