"""The auditor on a quickstart-style Flower app: per attack success and time, stated vs guessed.

The app (``tests/quickstart_app.py``) is written like Flower's ``quickstart-pytorch``: its own
LeNet-style CNN, ``torch.optim.SGD(lr=0.1, momentum=0.9)``, one local epoch in shuffled
``DataLoader`` batches of 32 (the last one ragged), cross-entropy, synthetic CIFAR-sized
images. One federated round (3 clients, in-process messaging) is audited twice through the
three-line attach, with ground truth from ``ground_truth=partition_fn``:

* **stated**: ``local=LocalTraining(batch_size=32, epochs=1, lr=0.1, momentum=0.9)``;
* **guessed**: no ``local=`` and an empty train config (the auditor guesses one full-batch
  plain-SGD step at lr 0.01, warns, and says so).

Per attack and setting it reports success (mean SSIM >= 0.6 against the best matches in the
client's partition; labels: label accuracy), mean SSIM / PSNR, and the attack's seconds per
update. It also measures how close each assumed training is to the client's real update:
the training unrolled on the client's true data in its real order, versus the update the
server received (cosine, norm ratio).

    python benchmarks/auditor_quickstart.py             # writes its section of docs/AUDITOR.md
    python benchmarks/auditor_quickstart.py --smoke --out /tmp/qs   # seconds, writes no docs
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import quickstart_app as qs  # noqa: E402  (tests/: the app the tests audit too)
import torch  # noqa: E402
from conftest import InProcessGrid, _fixed_task_identity  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from report import provenance, write_section  # noqa: E402

from precode_flower.local_training import LocalTraining, unrolled_update  # noqa: E402
from precode_flower.strategies import Auditor  # noqa: E402

STATED = LocalTraining(batch_size=qs.BATCH_SIZE, epochs=1, lr=qs.LR, momentum=qs.MOMENTUM)
SECTION = "Benchmark: a quickstart-style Flower app"


def audit(setting: str, out: Path, args: argparse.Namespace) -> tuple[list[dict], list]:
    """One audited round; the rows and the jobs the auditor built."""
    local = STATED if setting == "stated" else None
    options = {a: {"iterations": args.iterations} for a in args.attacks if a != "labels"}
    strategy = Auditor(
        FedAvg(min_available_nodes=args.clients, fraction_train=1.0, fraction_evaluate=0.0),
        model=qs.Net,
        input_shape=qs.SHAPE,
        mean=qs.MEAN,
        std=qs.STD,
        local=local,
        attacks=args.attacks,
        ground_truth=qs.load_partition,
        clients=1,
        time_limit=args.time_limit,
        attack_options=options,
        out_dir=out / setting,
        progress=False,
    )
    jobs: list = []
    submit = strategy.audit.auditor.submit_many
    strategy.audit.auditor.submit_many = lambda js: (jobs.extend(js), submit(js))[1]
    random.seed(0)
    torch.manual_seed(0)
    with _fixed_task_identity(), strategy:
        strategy.start(
            grid=InProcessGrid(qs.app, args.clients),
            initial_arrays=ArrayRecord(qs.Net().state_dict()),
            num_rounds=1,
            train_config=ConfigRecord({}),
        )
    rows = [json.loads(line) for line in (out / setting / "leakage.jsonl").read_text().splitlines()]
    return rows, jobs


def closeness(job, training: LocalTraining) -> dict:  # noqa: ANN001
    """Cosine and norm ratio of ``training`` replayed on the true data vs the real update."""
    model = qs.Net()
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in job.global_state.items()})
    x, y = qs.load_partition(int(job.client))
    order = qs.visit_order(int(job.client), job.round)
    n = len(y)
    resolved, guessed = training.resolve(n)
    ours = unrolled_update(model, x[order], y[order], resolved, create_graph=False)
    a = torch.cat([ours[k].flatten().double() for k in ours])
    b = torch.cat([torch.as_tensor(np.asarray(job.update[k])).flatten().double() for k in ours])
    return {
        "training": resolved.describe(n, guessed),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "norm_ratio": float(a.norm() / b.norm()),
        "max_abs_error": float((a - b).abs().max()),
    }


def summarise(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out[r["attack"]] = {
            "status": r["status"],
            "error": r.get("error"),
            "seconds": r.get("seconds"),
            "ssim": r.get("ssim"),
            "psnr": r.get("psnr"),
            "label_accuracy": r.get("label_accuracy"),
            "label_baseline": r.get("label_baseline"),
            "success": r.get("success"),
            "match_method": r.get("match_method"),
            "training": r.get("training"),
            "assumed": r.get("assumed"),
        }
    return out


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"The quickstart-style app of `tests/quickstart_app.py`: LeNet-style CNN, "
        f"{a['clients']} clients of {a['examples']} synthetic 3x32x32 examples, SGD lr 0.1 "
        f"momentum 0.9, one epoch in shuffled batches of 32 (the last ragged); one round, one "
        f"client audited, {a['iterations']} iterations per optimisation attack, scored with "
        "`ground_truth=partition_fn` (each reconstruction against its best match in the "
        "client's partition; success = mean SSIM >= 0.6; labels: multiset label accuracy, a leak "
        "only above the even-count guess, the accuracy of spreading the batch evenly over the "
        "classes).",
        "",
        "| setting | attack | status | success | mean SSIM | mean PSNR (dB) | label acc. "
        "| even-count guess | s / update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in ("stated", "guessed"):
        for attack, r in result[setting]["attacks"].items():
            lines.append(
                f"| {setting} | {attack} | {r['status']} | {r['success']} | "
                f"{fmt(r['ssim'], '.3f') if attack != 'labels' else '-'} | "
                f"{fmt(r['psnr'], '.1f') if attack != 'labels' else '-'} | "
                f"{fmt(r['label_accuracy'], '.2f')} | {fmt(r.get('label_baseline'), '.2f')} | "
                f"{fmt(r['seconds'], '.1f')} |"
            )
    lines += [
        "",
        "Training the attacks assumed, replayed on the client's true data in its real order, "
        "against the update the server received:",
        "",
        "| setting | training assumed | cosine | norm ratio |",
        "|---|---|---|---|",
    ]
    for setting in ("stated", "guessed"):
        c = result[setting]["closeness"]
        lines.append(f"| {setting} | {c['training']} | {c['cosine']:.4f} | {c['norm_ratio']:.3g} |")
    lines += [
        "",
        f"Wall time of the whole benchmark: {result['seconds']:.0f} s.",
        "",
        provenance(),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples per client")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--attacks", default="labels,ig,fedavg")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: temp)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; writes no docs")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/AUDITOR.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.iterations, args.clients = 40, 1, 2
    if args.examples < 1 or args.clients < 1 or args.iterations < 1:
        parser.error("--examples, --clients and --iterations must be >= 1")
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    out = args.out or Path(tempfile.mkdtemp(prefix="auditor-quickstart-"))
    qs.EXAMPLES = args.examples
    started = time.perf_counter()
    result: dict = {"args": {k: v for k, v in vars(args).items() if k != "out"}}
    for setting in ("stated", "guessed"):
        rows, jobs = audit(setting, out, args)
        if not jobs:
            raise RuntimeError(f"{setting}: the auditor built no job")
        # As the auditor holds them: local= with torch's defaults, or nothing at all.
        training = STATED.with_defaults() if setting == "stated" else LocalTraining()
        result[setting] = {"attacks": summarise(rows), "closeness": closeness(jobs[0], training)}
    result["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "auditor_quickstart.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    print(text)
    if not (args.smoke or args.no_write):
        write_section(ROOT / "docs" / "AUDITOR.md", SECTION, text, title="# The leakage auditor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
