"""PRECODE's cost: training step time and accuracy, with and without the bottleneck.

Measured side by side in one run: the step time (forward, backward, SGD step) of
``mlp`` and ``convnet`` on CIFAR-10-shaped batches of 64, plain and PRECODE,
interleaved so that machine noise hits every configuration alike; then the test
accuracy of each after the same short training budget on the CIFAR-10 data pack.

    python benchmarks/precode_overhead.py            # writes docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import provenance, write_section  # noqa: I001  (benchmarks/ is on sys.path)

import precode_flower as pf
from precode_flower import data
from precode_flower.models import build
from precode_flower.training import evaluate, loss_fn, train

SHAPE = (3, 32, 32)


def make(model_name: str, precode: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(model_name, 10, SHAPE)
    return pf.extend(model) if precode else model


def multiply_adds(model: torch.nn.Module) -> int:
    """Multiply-adds of one forward pass of one example through the Linear and Conv2d layers."""
    total = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
        else:  # Conv2d: every output entry is a dot product over in_channels/groups x kernel
            per_output = module.weight[0].numel()
            total += output[0].numel() * per_output

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total


def step_times(configs: list[tuple[str, bool]], steps: int, repeats: int) -> dict:
    x, y = torch.randn(64, *SHAPE), torch.randint(0, 10, (64,))
    models = {c: make(*c, seed=0) for c in configs}
    opts = {c: torch.optim.SGD(m.parameters(), lr=0.01) for c, m in models.items()}
    times: dict = {c: [] for c in configs}

    def step(c):
        opts[c].zero_grad(set_to_none=True)
        loss, _ = loss_fn(models[c], x, y)
        loss.backward()
        opts[c].step()

    for c in configs:  # warm-up
        for _ in range(5):
            step(c)
    for _ in range(repeats):
        for c in configs:
            start = time.perf_counter()
            for _ in range(steps):
                step(c)
            times[c].append((time.perf_counter() - start) / steps)
    return {c: statistics.median(t) for c, t in times.items()}


def reading(timing: dict, macs: dict, accuracy: dict) -> str:
    """How to read the step times: what the bottleneck adds in arithmetic, and what not."""
    extra = {m: macs[(m, True)] / macs[(m, False)] - 1 for m in ("mlp", "convnet")}
    ratio = {m: timing[(m, True)] / timing[(m, False)] for m in ("mlp", "convnet")}
    return (
        "How to read it: on a CPU the step time follows the arithmetic. The MLP's bottleneck "
        f"(a 1024 -> 512 encoder and a 256 -> 1024 decoder) adds {extra['mlp']:.0%} to its "
        "forward multiply-adds and more to the backward pass (the bottleneck's input gradient "
        "is computed, the first layer's is not), hence a step-time ratio of "
        f"{ratio['mlp']:.2f}: the 1.10 target cannot be met on this model without changing "
        "PRECODE's K=256 itself. In the ConvNet, where the convolutions dominate, the same "
        f"bottleneck adds {extra['convnet']:.1%} and the ratio ({ratio['convnet']:.2f}) is "
        "within the timing noise. The paper's 'almost no cost' was measured on a GPU, where "
        "batches of 64 leave such small layers latency-bound; no GPU was available for this "
        "run. Accuracy after the same budget, PRECODE minus plain: "
        + ", ".join(
            f"{m} {100 * (accuracy[(m, True)] - accuracy[(m, False)]):+.1f} points"
            for m in ("mlp", "convnet")
        )
        + " (target: at most 2 points below)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-steps", type=int, default=2400, help="training budget per model")
    parser.add_argument("--seeds", type=int, default=3, help="training runs averaged per model")
    parser.add_argument("--out", default="docs/BENCHMARKS.md")
    args = parser.parse_args()

    configs = [(m, p) for m in ("mlp", "convnet") for p in (False, True)]
    timing = step_times(configs, args.steps, args.repeats)

    macs = {c: multiply_adds(make(*c, seed=0)) for c in configs}
    bundle = data.load("cifar10")
    accuracy, spread = {}, {}
    for c in configs:
        accs = []
        for seed in range(args.seeds):
            model = make(*c, seed=seed)
            train(
                model,
                bundle.train,
                steps=args.train_steps,
                batch_size=64,
                lr=0.01,
                momentum=0.9,
                seed=seed,
            )
            accs.append(evaluate(model, bundle.test).accuracy)
        accuracy[c] = statistics.mean(accs)
        spread[c] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(c, f"step {timing[c] * 1e3:.2f} ms", f"acc {accuracy[c]:.4f}", flush=True)

    rows = [
        "| model | multiply-adds (PRECODE / plain) | step plain (ms) | step PRECODE (ms) "
        "| ratio (target <= 1.10) | acc plain | acc PRECODE | diff (points, target <= 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("mlp", "convnet"):
        tp, tq = timing[(m, False)], timing[(m, True)]
        ap, aq = accuracy[(m, False)], accuracy[(m, True)]
        sp, sq = spread[(m, False)], spread[(m, True)]
        mac_ratio = macs[(m, True)] / macs[(m, False)]
        rows.append(
            f"| {m} | {mac_ratio:.3f} | {tp * 1e3:.2f} | {tq * 1e3:.2f} | {tq / tp:.3f} "
            f"| {ap:.4f} ± {sp:.4f} | {aq:.4f} ± {sq:.4f} | {100 * (aq - ap):+.2f} |"
        )
    body = (
        f"{provenance()}\n"
        f"Step = forward + backward + SGD step on one CIFAR-10-shaped batch of 64 (median of "
        f"{args.repeats} interleaved repeats of {args.steps} steps). Accuracy on the CIFAR-10 "
        f"pack's {len(bundle.test)} test images after {args.train_steps} steps (batch 64, "
        f"SGD lr 0.01, momentum 0.9), mean ± standard deviation over {args.seeds} seeds; data "
        f"source: {bundle.source}. PRECODE: K=256, beta=1e-3, before the classifier. "
        "Multiply-adds: one forward pass of one example through the Linear and Conv2d layers "
        "(the backward pass costs about twice as many).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + reading(timing, macs, accuracy)
    )
    write_section(args.out, "PRECODE overhead (step time and accuracy)", body)
    print(body)


if __name__ == "__main__":
    main()
