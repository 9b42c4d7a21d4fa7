"""Build ``precode_flower/embedded/cifar10_default.npz``, the CIFAR-10 default in the package.

Source: the offline data pack's ``cifar10/cifar10_subset.npz`` (itself 1,000 train / 500 test
images per class from the official CIFAR-10 train / test splits). Selection is deterministic:
the first 200 train and the first 50 test images of each class, in the pack's order, kept in
that order. The output has the pack's keys (``x_train`` (2000, 32, 32, 3) uint8 NHWC,
``y_train``, ``x_test`` (500, 32, 32, 3), ``y_test``, ``classes``) and is written with
``np.savez_compressed``.

Licence: CIFAR-10 has no published licence; cite A. Krizhevsky, "Learning Multiple Layers of
Features from Tiny Images", 2009.

Usage: ``python tools/make_embedded_data.py [--pack DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50


def first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` examples of every class, in their original order."""
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has only {len(idx)} examples, need {n}")
        picked.append(idx[:n])
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, default=ROOT / ".." / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "precode_flower" / "embedded" / "cifar10_default.npz"
    )
    args = parser.parse_args()

    with np.load(args.pack / "cifar10" / "cifar10_subset.npz", allow_pickle=False) as z:
        pack = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
    train = first_per_class(pack["y_train"], TRAIN_PER_CLASS)
    test = first_per_class(pack["y_test"], TEST_PER_CLASS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        x_train=pack["x_train"][train],
        y_train=pack["y_train"][train],
        x_test=pack["x_test"][test],
        y_test=pack["y_test"][test],
        classes=pack["classes"],
    )
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB): {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
