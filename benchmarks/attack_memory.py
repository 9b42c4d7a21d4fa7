"""Peak memory of one attack run as an audit worker runs it, against its registered estimate.

One run per process (a fresh heap), printed as one JSON line::

    python benchmarks/attack_memory.py analytic --batch 64
    python benchmarks/attack_memory.py analytic --batch 200 --steps 200   # a FedAvg update

The update is a client's FedSGD gradient on ``--batch`` random CIFAR-10-shaped images, or with
``--steps`` > 1 the weight update of that many SGD steps (lr 0.05) over them; the attack runs
through the worker's own path (``_run_attack``: model copy, pseudo-gradient, scoring against
the images). Peaks are above the idle worker (torch and the scoring libraries imported):
``anon_peak_mb`` is anonymous resident memory, sampled every 2 ms (what the OOM killer and the
hard limit see), ``estimate_mb`` the auditor's estimate. Written up by hand in
docs/BENCHMARKS.md ("Attack memory").
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from precode_flower import metrics, models, training
from precode_flower.attacks.base import spec
from precode_flower.attacks.memory import MemoryCase, estimate_memory, footprint
from precode_flower.audit.worker import _run_attack
from precode_flower.defenses import DefenseParams, apply_model_defenses
from precode_flower.heap import release_freed_memory

SHAPE = (3, 32, 32)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _model(name: str, defense: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build(name, 10, SHAPE)
    return apply_model_defenses(model, [defense], DefenseParams(), SHAPE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attack")
    p.add_argument("--model", default="mlp", choices=models.MODELS)
    p.add_argument("--defense", default="precode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="> 1: a FedAvg weight update")
    p.add_argument("--iterations", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    metrics.preload()
    anon0 = _status("RssAnon")
    model = _model(args.model, args.defense)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.batch, *SHAPE, generator=gen), torch.randint(0, 10, (args.batch,))
    names = [n for n, _ in model.named_parameters()]
    b = args.batch // args.steps
    if args.steps > 1:
        client = _model(args.model, args.defense)
        for t in range(args.steps):
            grads, _ = training.compute_gradients(
                client, x[t * b : (t + 1) * b], y[t * b : (t + 1) * b]
            )
            with torch.no_grad():
                for param, g in zip(client.parameters(), grads, strict=True):
                    param -= 0.05 * g
        start = dict(model.named_parameters())
        update = {n: q.detach() - start[n].detach() for n, q in client.named_parameters()}
        kind = "weights"
        del client
    else:
        grads, _ = training.compute_gradients(model, x, y)
        update, kind = dict(zip(names, grads, strict=True)), "gradients"
    payload = {
        "update": update, "kind": kind, "input_shape": SHAPE, "mean": (0.0,) * 3,
        "std": (1.0,) * 3, "batch_size": args.batch, "local_steps": args.steps, "lr": 0.05,
        "local_batch_size": b, "ground_truth": (x, y),
    }  # fmt: skip
    options = {} if args.attack in ("analytic", "labels") else {"iterations": args.iterations}
    case = MemoryCase(
        footprint(model, SHAPE), args.batch, SHAPE, kind, args.steps, b, options, True
    )
    est = estimate_memory(spec(args.attack).memory, case)
    release_freed_memory()
    peak, stop = [_status("RssAnon")], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    row, _ = _run_attack(payload, model, args.attack, options, 0, 0.6)
    stop.set()
    sampler.join()
    info = row.get("info") or {}
    print(json.dumps({
        "attack": args.attack, "model": args.model, "defense": args.defense,
        "batch": args.batch, "steps": args.steps, "status": row["status"],
        "seconds": row.get("seconds"), "anon_peak_mb": (peak[0] - anon0) >> 20,
        "estimate_mb": est >> 20, "claimed": info.get("claimed"), "recovered": row.get("recovered"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
