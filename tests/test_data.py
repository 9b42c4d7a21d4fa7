"""Tests for precode_flower.data on the real offline data pack (../shared/data)."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from precode_flower import data

PACK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_pack = pytest.mark.skipif(not PACK.is_dir(), reason=f"offline data pack not at {PACK}")

EXPECTED = {  # name: (input_shape, train size, test size, classes)
    "mnist": ((1, 28, 28), 60000, 10000, 10),
    "fashion-mnist": ((1, 28, 28), 60000, 10000, 10),
    "cifar10": ((3, 32, 32), 10000, 5000, 10),
    "cifar100": ((3, 32, 32), 10000, 2000, 100),
    "breastmnist": ((1, 28, 28), 546, 156, 2),
}


@pytest.fixture
def pack_env(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the loader at the data pack regardless of the working directory."""
    if not PACK.is_dir():
        pytest.skip(f"offline data pack not at {PACK}")
    monkeypatch.setenv("PRECODE_FLOWER_DATA", str(PACK))
    return PACK


@pytest.fixture
def no_pack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty data-pack location, so only the embedded default is left."""
    empty = tmp_path / "empty-pack"
    monkeypatch.setenv("PRECODE_FLOWER_DATA", str(empty))
    return empty


def read_idx_gz(path: Path) -> np.ndarray:
    """Independent minimal IDX reader, to check the loader against."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else {3: 2051, 1: 2049}[arr.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_mnist_raw(raw_dir: Path, n_train: int = 60, n_test: int = 30, gz: bool = False) -> dict:
    """MNIST IDX files holding the first examples of the real data, torchvision's file names."""
    src = {
        f.name.removesuffix(".gz"): read_idx_gz(f) for f in sorted((PACK / "mnist").glob("*.gz"))
    }
    out = {}
    for name, arr in src.items():
        arr = arr[: n_train if name.startswith("train") else n_test]
        write_idx(raw_dir / (name + (".gz" if gz else "")), arr)
        out[name] = arr
    return out


@pytest.fixture(scope="module")
def cifar10_pack() -> dict[str, np.ndarray]:
    if not PACK.is_dir():
        pytest.skip(f"offline data pack not at {PACK}")
    with np.load(PACK / "cifar10" / "cifar10_subset.npz") as z:
        return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}


def as_tensor01(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).float() / 255


# --------------------------------------------------------------------------------------------
# The data pack


@pytest.mark.parametrize("name", data.DATASETS)
def test_every_dataset_loads_from_pack(pack_env: Path, name: str) -> None:
    shape, n_train, n_test, n_classes = EXPECTED[name]
    b = data.load(name, source="pack")
    assert b.name == name
    assert b.input_shape == shape
    assert b.num_classes == n_classes == len(b.classes) == len(set(b.classes))
    assert len(b.mean) == len(b.std) == shape[0]
    assert str(pack_env.resolve()) in b.source
    for split, n in ((b.train, n_train), (b.test, n_test)):
        x, y = split.tensors
        assert x.shape == (n, *shape) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < n_classes
        assert len(torch.unique(y)) == n_classes


@needs_pack
def test_auto_prefers_pack_and_cache_returns_same_bundle(pack_env: Path) -> None:
    b = data.load("cifar10")
    assert "offline data pack" in b.source
    assert data.load("CIFAR-10") is b
    assert data.load("cifar10", source="pack") is b
    assert data.load("FMNIST") is data.load("fashion_mnist") is data.load("Fashion-MNIST")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.name = "other"  # type: ignore[misc]


@needs_pack
def test_class_names(pack_env: Path, cifar10_pack: dict) -> None:
    assert data.load("mnist").classes == tuple("0123456789")
    assert data.load("fashion-mnist").classes[0] == "T-shirt/top"
    assert data.load("fashion-mnist").classes[-1] == "Ankle boot"
    assert data.load("cifar10").classes == tuple(cifar10_pack["classes"].tolist())
    assert data.load("cifar100").classes[:2] == ("apple", "aquarium_fish")
    assert data.load("breastmnist").classes == ("malignant", "normal/benign")


@needs_pack
def test_normalisation_round_trips_to_pack_pixels(pack_env: Path, cifar10_pack: dict) -> None:
    b = data.load("cifar10")
    x01 = data.denormalize(b.train.tensors[0], b.mean, b.std)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    pack_mean = cifar10_pack["x_train"].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(x01.mean(dim=(0, 2, 3)).numpy(), pack_mean, atol=1e-4)
    # Exact pixel values survive, and normalize inverts denormalize.
    np.testing.assert_allclose(x01[:8].numpy(), as_tensor01(cifar10_pack["x_train"][:8]), atol=1e-6)
    torch.testing.assert_close(data.normalize(x01[:8], b.mean, b.std), b.train.tensors[0][:8])
    # A single (C, H, W) image works too.
    assert data.denormalize(b.train.tensors[0][0], b.mean, b.std).shape == (3, 32, 32)


@needs_pack
@pytest.mark.parametrize("name", ["mnist", "breastmnist"])
def test_grey_normalisation(pack_env: Path, name: str) -> None:
    b = data.load(name)
    x01 = data.denormalize(b.train.tensors[0], b.mean, b.std)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    if name == "mnist":
        pixels = read_idx_gz(PACK / "mnist" / "train-images-idx3-ubyte.gz")
    else:
        pixels = np.load(PACK / "medmnist" / "breastmnist.npz")["train_images"]
    assert abs(float(x01.mean()) - pixels.mean() / 255) < 1e-4
    # The constants are the training set's statistics, so normalised data is ~N(0, 1).
    assert abs(float(b.train.tensors[0].mean())) < 0.01
    assert abs(float(b.train.tensors[0].std()) - 1) < 0.01


# --------------------------------------------------------------------------------------------
# The embedded default


def test_embedded_default_is_balanced(no_pack: Path) -> None:
    b = data.load("cifar10", source="embedded")
    assert "embedded default" in b.source
    assert (len(b.train), len(b.test)) == (2000, 500)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert torch.bincount(b.train.tensors[1]).tolist() == [200] * 10
    assert torch.bincount(b.test.tensors[1]).tolist() == [50] * 10
    assert data.load("cifar10") is b  # auto falls back to it when there is no pack
    size = (Path(data.__file__).parent / "embedded" / "cifar10_default.npz").stat().st_size
    assert size < 8e6


@needs_pack
def test_embedded_default_is_first_per_class_of_pack(pack_env: Path) -> None:
    emb = data.load("cifar10", source="embedded")
    pack = data.load("cifar10", source="pack")
    for split, n in ((emb.train, 200), (emb.test, 50)):
        full = pack.train if split is emb.train else pack.test
        y = full.tensors[1]
        idx = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(10)]).sort().values
        assert torch.equal(split.tensors[0], full.tensors[0][idx])
        assert torch.equal(split.tensors[1], y[idx])
    assert emb.classes == pack.classes


def test_embedded_only_for_cifar10(no_pack: Path) -> None:
    with pytest.raises(ValueError, match="no embedded default for 'mnist'"):
        data.load("mnist", source="embedded")


def test_nothing_found_lists_places_and_files(no_pack: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        data.load("mnist")
    msg = str(err.value)
    assert str(no_pack / "mnist") in msg and "train-images-idx3-ubyte" in msg
    assert "PRECODE_FLOWER_DATA" in msg
    with pytest.raises(FileNotFoundError, match="cifar10_subset.npz"):
        data.load("cifar10", source="pack")


# --------------------------------------------------------------------------------------------
# User data directories


@needs_pack
def test_data_dir_torchvision_mnist(tmp_path: Path, pack_env: Path) -> None:
    arrays = write_mnist_raw(tmp_path / "MNIST" / "raw")
    b = data.load("mnist", data_dir=tmp_path)
    assert b.source.startswith("data_dir (torchvision layout)")
    assert (len(b.train), len(b.test)) == (60, 30)
    full = data.load("mnist", source="pack")
    torch.testing.assert_close(b.train.tensors[0], full.train.tensors[0][:60])
    torch.testing.assert_close(b.test.tensors[1], full.test.tensors[1][:30])
    assert b.train.tensors[1].tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # torchvision reads the same files identically (checks the test's IDX writer).
    from torchvision.datasets import MNIST

    tv = MNIST(str(tmp_path), train=True, download=False)
    assert torch.equal(tv.data, torch.tensor(arrays["train-images-idx3-ubyte"]))


@needs_pack
def test_data_dir_gzipped_fashion_and_pack_layout(tmp_path: Path, pack_env: Path) -> None:
    write_mnist_raw(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True)  # any IDX payload
    b = data.load("fmnist", data_dir=tmp_path / "tv")
    assert (len(b.train), len(b.test)) == (60, 30) and b.classes[-1] == "Ankle boot"
    write_mnist_raw(tmp_path / "packlike" / "mnist", n_train=10, n_test=5, gz=True)
    b = data.load("mnist", data_dir=tmp_path / "packlike")
    assert b.source.startswith("data_dir (data-pack layout)")
    assert (len(b.train), len(b.test)) == (10, 5)


def write_cifar_batch(path: Path, x_nhwc: np.ndarray, labels: np.ndarray, key: str) -> None:
    """A batch in the official format: a dict with CHW-major uint8 rows and a label list."""
    batch = {
        "batch_label": "testing batch",
        key: labels.astype(int).tolist(),
        "data": x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1).copy(),
        "filenames": [f"img_{i}.png" for i in range(len(x_nhwc))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def test_data_dir_torchvision_cifar10(tmp_path: Path, cifar10_pack: dict) -> None:
    root = tmp_path / "cifar-10-batches-py"
    x, y = cifar10_pack["x_train"], cifar10_pack["y_train"]
    picks = np.arange(0, 10000, 250)  # 40 images, 4 per class
    for i, chunk in enumerate(np.array_split(picks, 5), start=1):
        write_cifar_batch(root / f"data_batch_{i}", x[chunk], y[chunk], "labels")
    write_cifar_batch(
        root / "test_batch", cifar10_pack["x_test"][:7], cifar10_pack["y_test"][:7], "labels"
    )
    with (root / "batches.meta").open("wb") as f:
        pickle.dump(
            {"label_names": cifar10_pack["classes"].tolist(), "num_vis": 3072}, f, protocol=2
        )

    b = data.load("cifar10", data_dir=tmp_path)
    assert b.source.startswith("data_dir (torchvision layout)") and str(root) in b.source
    assert (len(b.train), len(b.test)) == (40, 7)
    assert b.classes == tuple(cifar10_pack["classes"].tolist())
    assert torch.equal(b.train.tensors[1], torch.from_numpy(y[picks].astype(np.int64)))
    x01 = data.denormalize(b.train.tensors[0], b.mean, b.std)
    torch.testing.assert_close(x01, as_tensor01(x[picks]), atol=1e-6, rtol=0)


def test_data_dir_torchvision_cifar100(tmp_path: Path) -> None:
    if not PACK.is_dir():
        pytest.skip(f"offline data pack not at {PACK}")
    with np.load(PACK / "cifar100" / "cifar100_subset.npz") as z:
        x, y, classes = z["x_train"][::500], z["y_train"][::500], z["classes"].tolist()
    root = tmp_path / "cifar-100-python"
    write_cifar_batch(root / "train", x, y, "fine_labels")
    write_cifar_batch(root / "test", x[:3], y[:3], "fine_labels")
    with (root / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": classes, "coarse_label_names": ["c"] * 20}, f)
    b = data.load("cifar-100", data_dir=tmp_path)
    assert (len(b.train), len(b.test), b.num_classes) == (20, 3, 100)
    assert b.classes == tuple(classes)
    assert b.train.tensors[1].tolist() == y.tolist()


def test_data_dir_breastmnist_layouts_and_column_labels(tmp_path: Path) -> None:
    src = PACK / "medmnist" / "breastmnist.npz"
    if not src.is_file():
        pytest.skip(f"{src} missing")
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    # MedMNIST's own layout, with its (N, 1) label arrays.
    column = {k: (v.reshape(-1, 1) if k.endswith("labels") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "breastmnist.npz", **column)
    b = data.load("breastmnist", data_dir=tmp_path)
    assert b.source.startswith("data_dir (MedMNIST layout)")
    assert (len(b.train), len(b.test)) == (546, 156)
    assert b.train.tensors[1].tolist() == arrays["train_labels"].ravel().tolist()
    (tmp_path / "p" / "medmnist").mkdir(parents=True)
    shutil.copy(src, tmp_path / "p" / "medmnist" / "breastmnist.npz")
    b = data.load("breastmnist", data_dir=tmp_path / "p")
    assert b.source.startswith("data_dir (data-pack layout)")


def test_data_dir_without_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "cifar10_subset.npz" in msg


# --------------------------------------------------------------------------------------------
# Bad input


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as err:
        data.load("imagenet")
    for name in data.DATASETS:
        assert name in str(err.value)


def test_bad_source_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source must be"):
        data.load("cifar10", source="web")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_dir cannot be combined"):
        data.load("cifar10", data_dir=tmp_path, source="pack")


def _mnist_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 12, dtype=np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 4, dtype=np.uint8))
    return raw


def test_rows_are_the_split_at_those_indices_without_normalising_it(tmp_path: Path) -> None:
    _mnist_dir(tmp_path)
    split = data.load("mnist", data_dir=tmp_path).train_split
    picked = np.array([11, 0, 0, 5])
    x, y = split.rows(picked)
    assert split._dataset is None  # only the rows were normalised
    full_x, full_y = split.get().tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, full_x[picked]) and torch.equal(y, full_y[picked])
    after = split.rows(picked)  # from the normalised tensors now: the same values
    assert torch.equal(after[0], x) and torch.equal(after[1], y)


def test_synthetic_idx_dir_loads(tmp_path: Path) -> None:
    _mnist_dir(tmp_path)
    assert len(data.load("mnist", data_dir=tmp_path).train) == 12


@pytest.mark.parametrize(
    ("corrupt", "file", "match"),
    [
        ("truncate_gz", "train-images-idx3-ubyte.gz", "cannot read/decompress"),
        ("not_gz", "train-images-idx3-ubyte.gz", "cannot read/decompress"),
        ("magic", "train-labels-idx1-ubyte", "magic number 2051, expected 2049"),
        ("short_payload", "t10k-images-idx3-ubyte", "payload bytes, header says 4x28x28"),
        ("count", "train-labels-idx1-ubyte", "11 train labels for 12 train images"),
        ("label_range", "t10k-labels-idx1-ubyte", r"labels span \[0, 10\]; expected \[0, 10\)"),
        ("image_size", "train-images-idx3-ubyte", r"expected \(N, 28, 28\) uint8"),
    ],
)
def test_corrupt_idx_files(tmp_path: Path, corrupt: str, file: str, match: str) -> None:
    raw = _mnist_dir(tmp_path)
    target = raw / file
    if corrupt == "truncate_gz":
        payload = (raw / "train-images-idx3-ubyte").read_bytes()
        (raw / "train-images-idx3-ubyte").unlink()
        target.write_bytes(gzip.compress(payload)[:500])
    elif corrupt == "not_gz":
        (raw / "train-images-idx3-ubyte").rename(target)
    elif corrupt == "magic":
        write_idx(target, np.zeros(12, np.uint8), magic=2051)
    elif corrupt == "short_payload":
        target.write_bytes(target.read_bytes()[:-10])
    elif corrupt == "count":
        write_idx(target, np.zeros(11, np.uint8))
    elif corrupt == "label_range":
        write_idx(target, np.array([0, 1, 2, 10], np.uint8))
    elif corrupt == "image_size":
        write_idx(target, np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=match) as err:
        data.load("mnist", data_dir=tmp_path)
    assert str(target) in str(err.value)


def _subset_npz(path: Path, **overrides: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(20, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(10, dtype=np.uint8),
        "classes": np.array([f"c{i}" for i in range(10)]),
    }
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({}, None),
        ({"classes": None}, r"missing keys \['classes'\]"),
        ({"x_train": np.zeros((20, 32, 32, 3), np.float32)}, "train images have shape"),
        ({"x_test": np.zeros((10, 3, 32, 32), np.uint8)}, r"expected \(N, 32, 32, 3\) uint8"),
        ({"y_train": np.zeros(19, np.uint8)}, "19 train labels for 20 train images"),
        ({"y_test": np.zeros((10, 2), np.uint8)}, r"expected \(N,\) integers"),
        ({"classes": np.array(["a", "b"])}, "2 class names, expected 10"),
    ],
)
def test_corrupt_subset_npz(tmp_path: Path, overrides: dict, match: str | None) -> None:
    path = tmp_path / "cifar10" / "cifar10_subset.npz"
    _subset_npz(path, **overrides)
    if match is None:
        assert len(data.load("cifar10", data_dir=tmp_path).train) == 20
        return
    with pytest.raises(ValueError, match=match) as err:
        data.load("cifar10", data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_unreadable_npz_and_pickle(tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(ValueError, match="not a readable .npz file") as err:
        data.load("breastmnist", data_dir=tmp_path)
    assert str(bad) in str(err.value)

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (root / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle") as err:
        data.load("cifar10", data_dir=tmp_path)
    assert str(root / "data_batch_1") in str(err.value)
