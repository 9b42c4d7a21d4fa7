"""Tests for precode_flower.partition on real labels."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from precode_flower import data
from precode_flower.partition import SCHEMES, partition

PACK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """The embedded CIFAR-10 training labels: 2,000, 200 per class; ships with the package."""
    return data.load("cifar10", source="embedded").train.tensors[1].numpy()


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    path = PACK / "mnist" / "train-labels-idx1-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=8).copy()


def assert_exact_cover(parts: list[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and len(p) > 0
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


def classes_of(labels: np.ndarray, parts: list[np.ndarray]) -> list[set[int]]:
    return [set(np.unique(labels[p]).tolist()) for p in parts]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_cover_without_overlap(labels: np.ndarray, scheme: str) -> None:
    parts = partition(labels, 10, scheme, alpha=0.5, classes_per_client=2, seed=3)
    assert_exact_cover(parts, len(labels), 10)


def test_full_mnist_into_100_clients(mnist_labels: np.ndarray) -> None:
    for scheme in SCHEMES:
        parts = partition(mnist_labels, 100, scheme, seed=1)
        assert_exact_cover(parts, len(mnist_labels), 100)


def test_iid_is_balanced(labels: np.ndarray) -> None:
    parts = partition(labels, 7, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Each client sees every class, in roughly the global proportion.
    assert all(len(c) == 10 for c in classes_of(labels, parts))


@pytest.mark.parametrize(("n", "clients", "seed"), [(2000, 7, 0), (2000, 10, 3), (13, 13, 1)])
def test_iid_is_flowers_iid_partitioner(n: int, clients: int, seed: int) -> None:
    """IID is cut with NumPy; it must stay what Flower Datasets' IidPartitioner gives."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = np.arange(n) % 10
    order = np.random.default_rng(seed).permutation(n)
    flowers = IidPartitioner(num_partitions=clients)
    flowers.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    expected = [np.sort(flowers.load_partition(i)["index"]) for i in range(clients)]
    got = partition(labels, clients, "iid", seed=seed)
    assert len(got) == clients
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_iid_does_not_import_hugging_face_datasets() -> None:
    code = (
        "import sys, numpy as np; from precode_flower.partition import partition; "
        "partition(np.arange(100) % 10, 4, 'iid'); print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded(labels: np.ndarray, scheme: str) -> None:
    a = partition(labels, 8, scheme, seed=7)
    b = partition(labels, 8, scheme, seed=7)
    c = partition(labels, 8, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_input_types_agree(labels: np.ndarray) -> None:
    ref = partition(labels, 4, "dirichlet", seed=2)
    for variant in (torch.from_numpy(labels), labels.tolist(), labels.astype(np.uint8)):
        got = partition(variant, 4, "dirichlet", seed=2)
        assert all(np.array_equal(x, y) for x, y in zip(ref, got, strict=True))


@pytest.mark.parametrize(("num_partitions", "k"), [(20, 2), (5, 2), (3, 4), (10, 1), (7, 10)])
def test_pathological_k_classes_and_every_class_used(
    labels: np.ndarray, num_partitions: int, k: int
) -> None:
    parts = partition(labels, num_partitions, "pathological", classes_per_client=k)
    per_client = classes_of(labels, parts)
    assert all(len(c) == k for c in per_client)
    assert set().union(*per_client) == set(range(10))
    assert_exact_cover(parts, len(labels), num_partitions)


def test_pathological_consecutive_class_blocks(labels: np.ndarray) -> None:
    parts = partition(labels, 5, "pathological", classes_per_client=2)
    assert classes_of(labels, parts) == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
    # Each class is split evenly among the clients holding it.
    parts = partition(labels, 20, "pathological", classes_per_client=2)
    assert {len(p) for p in parts} == {100}  # 4 clients per class, 50 of its 200 each


def test_pathological_too_few_clients_warns(labels: np.ndarray) -> None:
    with pytest.warns(UserWarning, match="the examples of 4 classes are left out"):
        parts = partition(labels, 3, "pathological", classes_per_client=2)
    assert set().union(*classes_of(labels, parts)) == set(range(6))


def test_dirichlet_alpha_controls_skew(labels: np.ndarray) -> None:
    def majority_shares(alpha: float) -> np.ndarray:
        parts = partition(labels, 10, "dirichlet", alpha=alpha, seed=0)
        assert all(len(p) >= 1 for p in parts)
        return np.array([np.bincount(labels[p]).max() / len(p) for p in parts])

    assert majority_shares(0.1).max() > 0.5
    assert majority_shares(1000.0).max() < 0.25


def test_validation(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="iid, dirichlet, pathological"):
        partition(labels, 2, "shards")
    for bad in (0, -1, len(labels) + 1):
        with pytest.raises(ValueError, match="num_partitions must be in"):
            partition(labels, bad)
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="num_partitions must be an int"):
            partition(labels, bad)  # type: ignore[arg-type]
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            partition(labels, 2, "dirichlet", alpha=bad)
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 10\]"):
            partition(labels, 2, "pathological", classes_per_client=bad)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        partition(labels.reshape(40, 50), 2)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        partition([], 1)
    with pytest.raises(ValueError, match="must be integers"):
        partition(labels.astype(np.float32), 2)


def test_unsatisfiable_requests_explain_themselves() -> None:
    tiny = np.repeat(np.arange(10), 2)
    with pytest.raises(ValueError, match="use a larger alpha or fewer clients"):
        partition(tiny, 20, "dirichlet", alpha=0.01)
    with pytest.raises(ValueError, match="need more examples of some class"):
        partition([0, 1, 1, 1, 1, 1], 4, "pathological", classes_per_client=2)


def test_single_partition_is_everything(labels: np.ndarray) -> None:
    for scheme in ("iid", "dirichlet"):
        (only,) = partition(labels, 1, scheme)
        assert np.array_equal(only, np.arange(len(labels)))


def test_never_imports_flower_framework() -> None:
    code = (
        "import sys; import precode_flower.data, precode_flower.partition as p\n"
        "assert 'datasets' not in sys.modules and 'flwr_datasets' not in sys.modules\n"
        "p.partition([0, 1, 0, 1], 2, 'dirichlet')\n"
        "assert 'flwr_datasets' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
