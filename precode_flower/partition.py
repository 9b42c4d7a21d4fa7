"""Split a training set among federated clients (IID, Dirichlet, pathological non-IID).

The non-IID splitting is done by Flower Datasets' maintained partitioners
(``DirichletPartitioner``, ``PathologicalPartitioner``) on a small in-memory Hugging Face
``datasets.Dataset`` holding only the labels and row indices; IID is the same cut as
Flower's ``IidPartitioner``, done with NumPy. ``flwr_datasets`` is a separate
package that does not depend on the ``flwr`` framework; it and ``datasets`` are imported lazily
inside :func:`partition` because they take a second or two to import.

Every scheme first permutes the rows with ``seed``, so which examples of a class go to which
client is random but reproducible.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["SCHEMES", "partition"]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")


def partition(
    labels: Sequence[int] | np.ndarray | Tensor,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition example indices among ``num_partitions`` clients.

    Returns one sorted int64 array of indices into ``labels`` per client. Schemes:

    - ``"iid"``: a seeded shuffle cut into equal contiguous shards (sizes differ by at most 1).
    - ``"dirichlet"``: per class, client shares drawn from Dirichlet(``alpha``) (smaller is more
      skewed), with Flower's self-balancing (a client already above the average size gets no
      more examples) and at least one example per client. Raises ``ValueError`` when no draw
      satisfies that after Flower's 10 retries (try a larger ``alpha`` or fewer clients).
    - ``"pathological"``: each client holds exactly ``classes_per_client`` classes. Client
      ``p`` gets classes ``(p * k + i) % C`` for ``i < k``, so consecutive clients take
      consecutive blocks of classes and every class is used whenever
      ``num_partitions * k >= C``; each class is split evenly among the clients holding it.

    Partitions are disjoint and cover every example, except pathological ones with
    ``num_partitions * k < C``, which leave out the unused classes (Flower warns).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    y = _as_labels(labels)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int | np.integer):
        raise ValueError(f"num_partitions must be an int, got {num_partitions!r}")
    if not 1 <= num_partitions <= len(y):
        raise ValueError(f"num_partitions must be in [1, {len(y)}] (the number of labels)")
    num_classes = len(np.unique(y))
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if scheme == "pathological" and not 1 <= classes_per_client <= num_classes:
        raise ValueError(
            f"classes_per_client must be in [1, {num_classes}] (the number of classes), "
            f"got {classes_per_client!r}"
        )

    order = np.random.default_rng(seed).permutation(len(y))
    if scheme == "iid":
        # What Flower's IidPartitioner does (contiguous shards of the shuffled rows, the first
        # len % n one row longer; a test pins the equality), without importing Hugging Face
        # datasets, which costs every partitioning process ~110 MiB and a second or two.
        return [np.sort(part) for part in np.array_split(order, num_partitions)]

    import datasets
    from flwr_datasets import partitioner as fp

    table = datasets.Dataset.from_dict({"label": y[order], "index": order})
    p: Any
    if scheme == "dirichlet":
        p = fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=1,  # a client with no data cannot train
            self_balancing=True,
            shuffle=False,
            seed=seed,
        )
    else:
        p = _spread_pathological_partitioner()(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(classes_per_client),
            class_assignment_mode="deterministic",
            shuffle=False,
            seed=seed,
        )
    p.dataset = table
    unused = num_classes - num_partitions * classes_per_client
    if scheme == "pathological" and unused > 0:
        warnings.warn(
            f"{num_partitions} clients x {classes_per_client} classes cannot hold all "
            f"{num_classes} classes; the examples of {unused} classes are left out",
            stacklevel=2,
        )
    try:
        with warnings.catch_warnings():
            # Replaced by the warning above / the error below, which name this API's arguments.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            warnings.filterwarnings("ignore", message=r"Classes: .* will NOT be used")
            parts = [
                p.load_partition(i).with_format("numpy")["index"][:] for i in range(num_partitions)
            ]
    except ValueError as e:
        if scheme == "dirichlet":
            detail = (
                f"Dirichlet(alpha={alpha}) draws could not give each of {num_partitions} clients "
                f"at least one of {len(y)} examples; use a larger alpha or fewer clients"
            )
        else:
            detail = (
                f"{num_partitions} clients x {classes_per_client} classes need more examples of "
                "some class than there are; use fewer clients or a smaller classes_per_client"
            )
        raise ValueError(f"{scheme} partitioning failed: {detail}") from e
    return [np.sort(np.asarray(ix, dtype=np.int64)) for ix in parts]


def _as_labels(labels: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


@functools.cache
def _spread_pathological_partitioner() -> type:
    from flwr_datasets.partitioner import PathologicalPartitioner

    class SpreadPathologicalPartitioner(PathologicalPartitioner):
        """Flower's partitioner with class blocks ``(p * k + i) % C`` per client ``p``.

        Flower's "deterministic" mode gives client ``p`` classes ``p .. p + k - 1``, which
        leaves classes unused whenever there are fewer clients than classes (5 clients x 2
        classes of CIFAR-10 would use only 6 classes and drop 40% of the data).
        """

        def _determine_partition_id_to_unique_labels(self) -> None:
            super()._determine_partition_id_to_unique_labels()  # also validates k <= C
            classes, k = self._unique_labels, self._num_classes_per_partition
            self._partition_id_to_unique_labels = {
                pid: [classes[(pid * k + i) % len(classes)] for i in range(k)]
                for pid in range(self._num_partitions)
            }

        def _determine_partition_id_to_indices_if_needed(self) -> None:
            if self._partition_id_to_indices_determined:
                return
            super()._determine_partition_id_to_indices_if_needed()
            # Plain ints: `Dataset.select` hashes its argument, and hashing a list of numpy
            # scalars is ~10x slower (seconds for 60k examples).
            self._partition_id_to_indices = {
                pid: np.asarray(ix, dtype=np.int64).tolist()
                for pid, ix in self._partition_id_to_indices.items()
            }

    return SpreadPathologicalPartitioner
