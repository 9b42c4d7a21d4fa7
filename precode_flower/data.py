"""Offline image datasets as normalised tensors.

``load(name)`` returns a :class:`DataBundle` for one of :data:`DATASETS`. Nothing is ever
downloaded; the data is read, in this order, from

1. ``data_dir`` when given (and only from there): torchvision's on-disk layouts
   (``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``,
   ``breastmnist.npz``) or the offline data-pack layout (``mnist/*.gz``,
   ``cifar10/cifar10_subset.npz``, ``medmnist/breastmnist.npz``, ...);
2. the offline data pack: ``$PRECODE_FLOWER_DATA`` if set, else ``../shared/data`` relative to
   the working directory, else ``../shared/data`` next to the repository;
3. the default embedded in the package (CIFAR-10 only: 2,000 train / 500 test images).

Every source is normalised with the same fixed per-channel constants (:data:`NORMALIZATION`),
so a model trained on one source sees identically scaled inputs from another.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import threading
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "DataBundle",
    "denormalize",
    "load",
    "normalize",
    "reference_pool",
    "shape_and_classes",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "cifar100", "breastmnist")

# Per-channel (mean, std) of the pixel values in [0, 1] over the full official training sets
# (the commonly published values); BreastMNIST's were computed once from its 546-image train
# split. Fixed constants rather than statistics of whatever subset was loaded, so all sources
# of one dataset normalise identically.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "breastmnist": ((0.3276,), (0.2057,)),
}

_ALIASES = {
    "fmnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "breastmnist": (1, 28, 28),
}
_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "breastmnist": 2}
_FIXED_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    # MedMNIST v2: label 0 = malignant, 1 = normal or benign.
    "breastmnist": ("malignant", "normal/benign"),
}

_ENV_VAR = "PRECODE_FLOWER_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
_EMBEDDED = {"cifar10": "cifar10_default.npz"}

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")

Source = Literal["auto", "pack", "embedded"]


class _Split:
    """One split's uint8 images and labels, normalised to float32 tensors on first use.

    A process that needs only one split (the server evaluates on the test split) then
    never holds the other one in float32, four times the size of its uint8 pixels.
    """

    def __init__(
        self, x_u8: np.ndarray, y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self._raw: tuple[np.ndarray, np.ndarray] | None = (x_u8, y)
        self._norm = (mean, std)
        self._dataset: TensorDataset | None = None
        self._lock = threading.Lock()

    def get(self) -> TensorDataset:
        with self._lock:
            if self._dataset is None:
                assert self._raw is not None
                x_u8, y = self._raw
                self._dataset = TensorDataset(_images(x_u8, *self._norm), _labels(y))
                self._raw = None  # the float32 tensors replace the uint8 arrays
            return self._dataset

    def rows(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """Images and labels at ``indices``, the same values as ``get()`` indexed there;
        before ``get()``, only those rows are normalised (a client needs its partition)."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            dataset, raw = self._dataset, self._raw
        if dataset is not None:
            x, y = dataset.tensors
            picked = torch.from_numpy(indices)
            return x[picked], y[picked]
        assert raw is not None
        x_u8, y = raw
        return _images(x_u8[indices], *self._norm), _labels(y[indices])


@dataclass(frozen=True)
class DataBundle:
    """A dataset ready for training: normalised NCHW float32 images and int64 labels.

    ``train`` and ``test`` are decoded on first access. Bundles are cached and shared
    between callers of :func:`load`: treat the tensors as read-only (copy before modifying
    them in place).
    """

    name: str
    train_split: _Split = field(repr=False)
    test_split: _Split = field(repr=False)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    source: str

    @property
    def train(self) -> TensorDataset:
        return self.train_split.get()

    @property
    def test(self) -> TensorDataset:
        return self.test_split.get()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


#: Test images a reconstruction is compared with to link it to its original.
REFERENCE_POOL = 99


def reference_pool(
    bundle: DataBundle,
    size: int = REFERENCE_POOL,
    seed: int = 0,
    exclude: Sequence[int] = (),
) -> Tensor:
    """``size`` test images of ``bundle``, seeded: the candidates against which a
    reconstruction is linked to its original (:func:`precode_flower.metrics.identified`).
    From the test split, so no training example (an original) is among them; ``exclude``
    leaves out test indices (those being attacked, when the originals are test images)."""
    images = bundle.test.tensors[0]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    if exclude:
        pick = pick[~torch.isin(pick, torch.as_tensor(list(exclude), dtype=pick.dtype))]
    if not 1 <= size <= len(pick):
        raise ValueError(f"reference pool of {size} from {len(pick)} test images")
    return images[pick[:size]].clone()


def _channel_view(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


def normalize(x01: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Map images in [0, 1] pixel space, shaped (..., C, H, W), to normalised space."""
    return (x01 - _channel_view(mean, x01)) / _channel_view(std, x01)


def denormalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Map normalised images, shaped (..., C, H, W), back to [0, 1] pixel space (no clamping)."""
    return x * _channel_view(std, x) + _channel_view(mean, x)


# --------------------------------------------------------------------------------------------
# Locating the data


@dataclass(frozen=True)
class _Layout:
    reader: str  # "idx", "cifar10-pickle", "cifar100-pickle", "subset-npz" or "medmnist-npz"
    path: str  # relative to the searched root: a directory (idx, pickle) or an .npz file
    kind: str  # human-readable description of the layout

    def files(self, root: Path) -> list[Path] | None:
        """The files to read under ``root``, or None when any of them is missing."""
        base = root / self.path
        if self.reader == "idx":
            found = []
            for name in _IDX_FILES:
                # torchvision leaves both the .gz and the decompressed file; the latter is faster.
                candidates = [base / name, base / f"{name}.gz"]
                hit = next((p for p in candidates if p.is_file()), None)
                if hit is None:
                    return None
                found.append(hit)
            return found
        if self.reader in ("cifar10-pickle", "cifar100-pickle"):
            names = _CIFAR10_FILES if self.reader == "cifar10-pickle" else _CIFAR100_FILES
            paths = [base / n for n in names]
            return paths if all(p.is_file() for p in paths) else None
        return [base] if base.is_file() else None

    def expected(self, root: Path) -> str:
        base = root / self.path
        if self.reader == "idx":
            return f"{base}/ with {', '.join(n + '[.gz]' for n in _IDX_FILES)}"
        if self.reader == "cifar10-pickle":
            return f"{base}/ with {', '.join(_CIFAR10_FILES)}"
        if self.reader == "cifar100-pickle":
            return f"{base}/ with {', '.join(_CIFAR100_FILES)}"
        return str(base)


_DATA_DIR_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "mnist": (
        _Layout("idx", "MNIST/raw", "torchvision layout"),
        _Layout("idx", "mnist", "data-pack layout"),
    ),
    "fashion-mnist": (
        _Layout("idx", "FashionMNIST/raw", "torchvision layout"),
        _Layout("idx", "fashion-mnist", "data-pack layout"),
    ),
    "cifar10": (
        _Layout("cifar10-pickle", "cifar-10-batches-py", "torchvision layout"),
        _Layout("subset-npz", "cifar10/cifar10_subset.npz", "data-pack layout"),
    ),
    "cifar100": (
        _Layout("cifar100-pickle", "cifar-100-python", "torchvision layout"),
        _Layout("subset-npz", "cifar100/cifar100_subset.npz", "data-pack layout"),
    ),
    "breastmnist": (
        _Layout("medmnist-npz", "breastmnist.npz", "MedMNIST layout"),
        _Layout("medmnist-npz", "medmnist/breastmnist.npz", "data-pack layout"),
    ),
}


def _pack_layout(name: str) -> _Layout:
    return next(lay for lay in _DATA_DIR_LAYOUTS[name] if lay.kind == "data-pack layout")


def _pack_dirs() -> list[Path]:
    """Candidate offline data-pack directories, in priority order."""
    env = os.environ.get(_ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    dirs: list[Path] = []
    for d in (Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"):
        d = d.resolve()
        if d not in dirs:
            dirs.append(d)
    return dirs


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        aliases = ", ".join(sorted({"fmnist", "fashion_mnist", "cifar-10", "cifar-100"}))
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (aliases: {aliases})"
        )
    return key


def shape_and_classes(name: str) -> tuple[tuple[int, int, int], int]:
    """Dataset ``name``'s input shape (C, H, W) and number of classes, without loading it."""
    key = _canonical(name)
    return _SHAPES[key], _NUM_CLASSES[key]


def load(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, source: Source = "auto"
) -> DataBundle:
    """Load dataset ``name`` (case-insensitive, see :data:`DATASETS`) as a :class:`DataBundle`.

    ``source="auto"`` reads ``data_dir`` if given (raising ``FileNotFoundError`` when the
    dataset is not there), else the offline data pack, else the embedded default.
    ``source="pack"`` and ``source="embedded"`` force one of the latter two.

    Raises ``FileNotFoundError`` listing the places searched and the files expected when no
    source has the dataset, and ``ValueError`` naming the file when a file is malformed.
    Decoded datasets are cached in-process, so repeated calls return the same bundle.
    """
    key = _canonical(name)
    if source not in ("auto", "pack", "embedded"):
        raise ValueError(f"source must be 'auto', 'pack' or 'embedded', not {source!r}")
    if data_dir is not None and source != "auto":
        raise ValueError(f"data_dir cannot be combined with source={source!r}")

    tried: list[str] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser().resolve()
        for layout in _DATA_DIR_LAYOUTS[key]:
            files = layout.files(root)
            if files is not None:
                return _cached(key, layout.reader, _signature(files), f"data_dir ({layout.kind})")
            tried.append(f"{layout.expected(root)} ({layout.kind})")
        raise FileNotFoundError(
            f"no {key!r} data in data_dir {root}; expected one of:\n  " + "\n  ".join(tried)
        )

    if source in ("auto", "pack"):
        layout = _pack_layout(key)
        dirs = _pack_dirs()
        for root in dirs:
            files = layout.files(root)
            if files is not None:
                return _cached(key, layout.reader, _signature(files), "offline data pack")
            tried.append(f"{layout.expected(root)} (offline data pack)")
        if os.environ.get(_ENV_VAR):
            tried[-1] += f" (from ${_ENV_VAR})"

    if source in ("auto", "embedded"):
        if key not in _EMBEDDED:
            if source == "embedded":
                raise ValueError(
                    f"no embedded default for {key!r}; only for {', '.join(sorted(_EMBEDDED))}"
                )
        else:
            path = _EMBEDDED_DIR / _EMBEDDED[key]
            if path.is_file():
                return _cached(key, "subset-npz", _signature([path]), "embedded default")
            tried.append(f"{path} (embedded default, missing from this installation)")

    raise FileNotFoundError(
        f"no {key!r} data found (nothing is downloaded); looked for:\n  "
        + "\n  ".join(tried)
        + f"\npass data_dir=... or set ${_ENV_VAR} to the offline data pack"
    )


def _signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Resolved paths with size and mtime, so the cache notices replaced files."""
    sig = []
    for f in files:
        st = f.stat()
        sig.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(sig)


# --------------------------------------------------------------------------------------------
# Decoding


@functools.lru_cache(maxsize=8)
def _cached(
    name: str, reader: str, files: tuple[tuple[str, int, int], ...], origin: str
) -> DataBundle:
    paths = [Path(f[0]) for f in files]
    read = _READERS[reader]
    x_train, y_train, x_test, y_test, classes = read(name, paths)
    classes = _FIXED_CLASSES.get(name, classes)
    if len(classes) != _NUM_CLASSES[name]:
        raise ValueError(
            f"{paths[-1]}: {len(classes)} class names, expected {_NUM_CLASSES[name]} for {name}"
        )
    mean, std = NORMALIZATION[name]
    where = str(paths[0].parent) if reader in ("idx", "cifar10-pickle", "cifar100-pickle") else ""
    return DataBundle(
        name=name,
        train_split=_Split(x_train, y_train, mean, std),
        test_split=_Split(x_test, y_test, mean, std),
        classes=tuple(str(c) for c in classes),
        mean=mean,
        std=std,
        input_shape=_SHAPES[name],
        source=f"{origin}: {where or paths[0]}",
    )


def _images(x_u8: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 NCHW -> normalised float32 NCHW, in place to keep the peak memory low."""
    x = torch.from_numpy(x_u8.astype(np.float32, order="C"))
    m = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1) * 255.0
    return x.sub_(m).div_(s)


def _labels(y: np.ndarray) -> Tensor:
    return torch.from_numpy(y.astype(np.int64))


def _check_xy(
    path: Path,
    what: str,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, ...],
    num_classes: int,
    label_path: Path | None = None,
) -> None:
    """Validate images (N, *shape) uint8 and labels (N,) integers in [0, num_classes)."""
    label_path = label_path or path
    if x.dtype != np.uint8 or x.ndim != len(shape) + 1 or x.shape[1:] != shape:
        raise ValueError(
            f"{path}: {what} images have shape {x.shape} dtype {x.dtype}; "
            f"expected (N, {', '.join(map(str, shape))}) uint8"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{label_path}: {what} labels have shape {y.shape} dtype {y.dtype}; "
            "expected (N,) integers"
        )
    if len(y) != len(x):
        raise ValueError(f"{label_path}: {len(y)} {what} labels for {len(x)} {what} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{label_path}: {what} labels span [{y.min()}, {y.max()}]; expected [0, {num_classes})"
        )


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzip-compressed) with numpy."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read/decompress ({e}); expected a gzip'd IDX file") from e
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(
            f"{path}: IDX magic number {got}, expected {magic} "
            f"(unsigned bytes, {dims} dimension{'s' if dims > 1 else ''})"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: {data.size} payload bytes, header says {'x'.join(map(str, shape))}"
        )
    return data.reshape(shape)


def _read_idx_dataset(name: str, files: list[Path]) -> tuple[Any, ...]:
    _, h, w = _SHAPES[name]
    out = []
    for i, split in ((0, "train"), (2, "test")):
        x = _read_idx(files[i], 2051, 3)
        y = _read_idx(files[i + 1], 2049, 1)
        _check_xy(files[i], split, x, y, (h, w), _NUM_CLASSES[name], label_path=files[i + 1])
        out += [x[:, None], y]
    return (*out, _FIXED_CLASSES[name])


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            # The official batches are Python 2 pickles; latin1 maps their byte strings 1:1.
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # unpickling can fail in many ways on a corrupt file
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: pickle holds {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    missing = {"data", label_key} - batch.keys()
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}; expected 'data', {label_key!r}")
    data = np.asarray(batch["data"])
    y = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' has shape {data.shape} dtype {data.dtype}; expected (N, 3072) uint8"
        )
    x = data.reshape(-1, 3, 32, 32)  # rows are stored channel-major: already CHW
    _check_xy(path, "batch", x, y, (3, 32, 32), num_classes)
    return x, y


def _label_names(path: Path, key: str) -> list[str]:
    meta = _unpickle(path)
    if key not in meta:
        raise ValueError(f"{path}: missing key {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _read_cifar10_pickle(name: str, files: list[Path]) -> tuple[Any, ...]:
    parts = [_cifar_batch(f, "labels", 10) for f in files[:5]]
    x_test, y_test = _cifar_batch(files[5], "labels", 10)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test, _label_names(files[6], "label_names")


def _read_cifar100_pickle(name: str, files: list[Path]) -> tuple[Any, ...]:
    x_train, y_train = _cifar_batch(files[0], "fine_labels", 100)
    x_test, y_test = _cifar_batch(files[1], "fine_labels", 100)
    return x_train, y_train, x_test, y_test, _label_names(files[2], "fine_label_names")


def _open_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys if k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected keys {', '.join(keys)}")
    return arrays


def _read_subset_npz(name: str, files: list[Path]) -> tuple[Any, ...]:
    (path,) = files
    z = _open_npz(path, ("x_train", "y_train", "x_test", "y_test", "classes"))
    out = []
    for split in ("train", "test"):
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        _check_xy(path, split, x, y, (32, 32, 3), _NUM_CLASSES[name])
        out += [x.transpose(0, 3, 1, 2), y]  # NHWC -> NCHW
    classes = z["classes"]
    if classes.ndim != 1 or classes.dtype.kind not in "US":
        raise ValueError(f"{path}: 'classes' must be a 1-D array of strings")
    return (*out, [str(c) for c in classes])


def _read_medmnist_npz(name: str, files: list[Path]) -> tuple[Any, ...]:
    (path,) = files
    z = _open_npz(path, ("train_images", "train_labels", "test_images", "test_labels"))
    out = []
    # The official val split is not used: train and test are MedMNIST's train and test splits.
    for split in ("train", "test"):
        x, y = z[f"{split}_images"], z[f"{split}_labels"]
        if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST stores labels as (N, 1)
            y = y[:, 0]
        _check_xy(path, split, x, y, (28, 28), _NUM_CLASSES[name])
        out += [x[:, None], y]
    return (*out, _FIXED_CLASSES[name])


_READERS = {
    "idx": _read_idx_dataset,
    "cifar10-pickle": _read_cifar10_pickle,
    "cifar100-pickle": _read_cifar100_pickle,
    "subset-npz": _read_subset_npz,
    "medmnist-npz": _read_medmnist_npz,
}
