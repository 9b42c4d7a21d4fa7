"""The PRECODE cells of ``benchmarks/attacks.py`` alone, at a chosen budget (no speed section).

For re-measuring the PRECODE rows of ``docs/ATTACKS.md`` when the full run (about 76 min on
2 quiet cores) does not fit: the same models, seeds, client updates and scoring, via that
module's ``run_cell_image`` and ``noise_effect``; prints the table rows and writes the raw
scores as JSON. Times are wall times, meaningful only on a quiet machine.

    PYTHONPATH=. python benchmarks/attacks_precode_cells.py --images 4 --iterations 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from attacks import noise_effect, run_cell_image  # benchmarks/ is on sys.path

from precode_flower import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="test images, one per class")
    parser.add_argument("--iterations", type=int, default=2000, help="ig iterations")
    parser.add_argument("--models", default="mlp,convnet")
    parser.add_argument("--out", default="runs/attacks_precode_cells.json")
    args = parser.parse_args()
    if not 1 <= args.images <= 10:
        parser.error("--images must be between 1 and 10 (one image per class)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    x_all, y_all = data.load("cifar10").test.tensors
    indices = [int((y_all == c).nonzero()[0]) for c in range(args.images)]
    result = {"noise": noise_effect(x_all, y_all, indices), "indices": indices, "rows": []}
    print(f"gradient cosine under two draws, initial std: {result['noise']}", flush=True)
    iterations = {"mlp": args.iterations, "convnet": args.iterations}
    for arch in args.models.split(","):
        for i in indices:
            job = {"arch": arch, "precode": True, "index": i, "iterations": iterations}
            out = run_cell_image(job | {"threads": 1})
            scores = {a: r["score"] for a, r in out["results"].items()}
            result["rows"].append({"arch": arch, "index": i, **scores})
    for arch in args.models.split(","):
        rows = [r for r in result["rows"] if r["arch"] == arch]
        for attack in [a for a in rows[0] if a not in ("arch", "index")]:
            s = [r[attack] for r in rows]
            ssim = [v["ssim"] for v in s]
            print(
                f"| {arch} | PRECODE | `{attack}` | {statistics.mean(v['psnr'] for v in s):.2f} "
                f"| {statistics.mean(ssim):.3f} ± {statistics.pstdev(ssim):.3f} "
                f"| {sum(v['success'] for v in s)}/{len(s)} |"
            )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
