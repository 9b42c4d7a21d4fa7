"""What one federated run computes, without Flower: its config, model, client data and updates.

This is the ``task.py`` of Flower's examples, kept framework-free so it can be tested and
reused (by the auditor, benchmarks, the plain-PyTorch baseline) without ``flwr``:

- :class:`RunConfig`: every training setting of a run. The server sends
  :meth:`RunConfig.to_config` as the ConfigRecord of each round; clients rebuild it with
  :meth:`RunConfig.from_mapping` (keys are hyphenated, as in Flower's run config).
- :func:`build_model`: the configured network with its model defenses (PRECODE).
- :func:`client_data`: a client's training partition and its share of the test split.
- :func:`compute_update`: one client's reply for one round (FedSGD gradient or FedAvg
  weights), with the update defenses applied.

Client data: the training split is partitioned with :func:`precode_flower.partition.partition`
(``partition`` scheme, ``alpha``, ``classes-per-client``, ``seed``). Each client's test share
is an IID slice of the test split (a seeded permutation cut into ``num-partitions`` parts),
so the aggregate of client evaluations estimates the accuracy on the whole test split; the
server additionally evaluates the global model on the whole test split.

Ground truth for auditing (``audit-ground-truth``): ``batch_indices`` are indices into the
dataset's **training split** (``DataBundle.train``), not into the client's partition, in the
order the client used them (FedSGD: the one batch; FedAvg: every batch of every local step,
concatenated).

Randomness is derived from (``seed``, round, partition id), so the same config reproduces
the same updates regardless of which process or node computes them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import data as data_mod
from . import settings
from .defenses import (
    DEFENSES,
    PRESETS,
    DefenseParams,
    DpParams,
    apply_model_defenses,
    apply_update_defenses,
    check_federation_defenses,
    has_update_defense,
    parse_defenses,
)
from .models import MODELS, build
from .partition import SCHEMES, partition
from .settings import setting
from .training import EvalStats, LocalSGD, evaluate, loss_fn

__all__ = [
    "AGGREGATIONS",
    "MAX_SEED",
    "MODES",
    "SERVER_OPTIMIZERS",
    "ClientData",
    "ClientUpdate",
    "RunConfig",
    "build_model",
    "client_data",
    "compute_update",
    "derive_seeds",
    "evaluate_client",
    "get_model",
    "initial_state",
    "load_state",
    "model_bytes",
    "max_examples",
    "partition_key",
    "partition_sizes",
    "train_indices",
]

MODES: tuple[str, ...] = ("fedavg", "fedsgd")
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
#: FedAvg aggregations: the weighted mean, or one of Flower's robust strategies
#: (FedTrimmedAvg, FedMedian, Krum), the answer to Byzantine clients within every bound.
AGGREGATIONS: tuple[str, ...] = ("mean", "trimmed-mean", "median", "krum")
#: Largest seed: Flower's config records hold 64-bit signed integers.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class _Setup:
    """What a run trains, on which data, with which defenses: the first settings of
    :class:`RunConfig`, a base class only so that they precede the defenses' parameters
    (inherited after them) in flags, configs and ``pyproject.toml``."""

    mode: str = setting(
        "fedavg", "federated algorithm (FedSGD: clients send one gradient each)",
        choices=MODES,
    )  # fmt: skip
    dataset: str = setting("cifar10", "dataset name", choices=data_mod.DATASETS)
    data_dir: str = setting(
        "", 'dataset directory ("" = the data pack, else the embedded CIFAR-10)'
    )
    model: str = setting("mlp", "network", choices=MODELS)
    defenses: tuple[str, ...] = setting(
        (),
        f"comma list of: {', '.join([*DEFENSES, *PRESETS])}",
        parse=parse_defenses,
        flag="--defense",
    )


@dataclass(frozen=True)
class RunConfig(DpParams, DefenseParams, _Setup):
    """All training settings of a run (the ConfigRecord sent each round).

    Field ``some_name`` is key ``some-name`` in configs and flag ``--some-name``. Each field
    is declared once with :func:`precode_flower.settings.setting` (help, bounds, choices):
    the CLI flags, their checks and ``[tool.flwr.app.config]`` in pyproject.toml are derived
    from it. The defenses' parameters are declared on their own dataclasses and inherited
    (:class:`~precode_flower.defenses.DefenseParams`, then
    :class:`~precode_flower.defenses.DpParams`, after :class:`_Setup`'s fields): a new
    one is a RunConfig key without any edit here. ``defenses`` is a tuple of canonical names
    (a comma string in configs, ``"none"`` when empty). Every value is checked on
    construction (ValueError naming the key, in one line), so a setting that can never work
    is refused before a run starts.
    """

    batch_size: int = setting(32, "examples per batch", low=1)
    local_epochs: float = setting(1.0, "FedAvg local epochs", low=0)
    local_steps: int = setting(0, "FedAvg local steps; > 0 overrides local-epochs", low=0)
    # Plain SGD on the MLP diverges at batch 1-2 with lr 0.05 (NaN within 30-300 steps on
    # CIFAR-10, with or without PRECODE) and in FedSGD with server-lr 0.1 at batch 1-3
    # (tests/test_default_training.py); these train every defense at batch 1-64.
    lr: float = setting(0.01, "client SGD learning rate (FedAvg)", low=0, low_open=True)
    momentum: float = setting(0.0, "client SGD momentum", low=0, high=1, high_open=True)
    server_optimizer: str = setting("sgd", "FedSGD server optimiser", choices=SERVER_OPTIMIZERS)
    server_lr: float = setting(0.02, "FedSGD server learning rate", low=0, low_open=True)
    server_momentum: float = setting(0.0, "FedSGD server momentum", low=0, high=1, high_open=True)
    partition: str = setting("iid", "how the training split is divided", choices=SCHEMES)
    alpha: float = setting(
        0.5, "Dirichlet concentration (partition dirichlet)", low=0, low_open=True
    )
    classes_per_client: int = setting(2, "classes per client (partition pathological)", low=1)
    clients: int = setting(2, "clients (nodes to wait for before the first round)", low=1)
    rounds: int = setting(3, "federated rounds", low=1)
    fraction: float = setting(
        1.0, "fraction of clients sampled for training per round", low=0, low_open=True, high=1
    )
    fraction_evaluate: float = setting(
        1.0, "fraction of clients sampled for evaluation per round", low=0, low_open=True, high=1
    )
    seed: int = setting(0, "run seed (model, data, sampling, client batches)", low=0, high=MAX_SEED)
    audit_ground_truth: bool = setting(
        False, "clients report the train indices they used (evaluation only)"
    )
    round_timeout: float = setting(
        600.0, "seconds to wait for replies per phase (train, evaluate)", low=0, low_open=True
    )
    # Server-side reply policy (strategies.validation.ReplyValidator.from_limits).
    max_update_norm: float = setting(
        0.0, "reject updates with a larger L2 norm (FedAvg: of weights - global)", low=0,
        low_open=True, zero="no bound", group="reliability",
    )  # fmt: skip
    max_reply_mb: float = setting(
        0.0, "reject larger replies, in MiB", low=0, low_open=True,
        zero="auto: 2x the model + 8 MiB", group="reliability",
    )  # fmt: skip
    min_replies: int = setting(
        1, "fewer valid replies: round skipped, model unchanged", low=1, group="reliability"
    )
    max_examples: int = setting(
        0, "reject replies claiming more examples (their FedAvg weight)", low=1,
        zero="auto: FedSGD the batch size, FedAvg the largest partition", group="reliability",
    )  # fmt: skip
    aggregation: str = setting(
        "mean", "FedAvg aggregation (robust ones: Flower's strategies)",
        choices=AGGREGATIONS, group="reliability",
    )  # fmt: skip
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        settings.validate(self)  # each value against its declared bounds and choices
        _ = self.defense_params, self.dp_params  # any checks of their own beyond the fields'
        check_federation_defenses(self.defenses, self.mode, self.model)
        if self.local_steps == 0 and not self.local_epochs > 0:
            raise ValueError(
                f"local-epochs must be > 0 (or local-steps > 0), got {self.local_epochs}"
            )
        _, num_classes = data_mod.shape_and_classes(self.dataset)
        if self.classes_per_client > num_classes:
            raise ValueError(
                f"classes-per-client must be <= {num_classes} (the classes of {self.dataset}), "
                f"got {self.classes_per_client}"
            )
        if self.aggregation != "mean" and any(d.startswith("dp-") for d in self.defenses):
            raise ValueError(
                f"aggregation {self.aggregation} cannot be combined with DP: Flower's DP "
                "wrappers calibrate their noise to the plain mean"
            )
        if self.mode == "fedsgd" and self.aggregation != "mean":
            raise ValueError(
                f"aggregation {self.aggregation} is for FedAvg weights; FedSGD averages gradients"
            )
        sampled = max(1, int(self.fraction * self.clients))  # what Flower's FedAvg samples
        if self.min_replies > sampled:
            raise ValueError(
                f"min-replies {self.min_replies} exceeds the {sampled} clients sampled per "
                f"round (clients {self.clients}, fraction {self.fraction:g}): every round "
                "would be skipped"
            )

    @property
    def defense_params(self) -> DefenseParams:
        """The parameters of the model and update defenses."""
        return settings.subset(DefenseParams, self)

    @property
    def dp_params(self) -> DpParams:
        """The parameters of ``dp-server`` / ``dp-client``."""
        return settings.subset(DpParams, self)

    def to_config(self) -> dict[str, bool | int | float | str]:
        """The config as flat hyphenated key -> scalar (a valid Flower ConfigRecord/UserConfig)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "defenses":
                value = ",".join(value) or "none"
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **overrides: Any) -> RunConfig:
        """Parse hyphenated (or underscored) keys; unknown keys are kept in ``extra``.

        Values are coerced to the field's type (``"3"`` -> 3, ``"true"`` -> True) and
        validated; raises ValueError naming the key on a bad value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        defaults = cls()
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in {**dict(mapping), **overrides}.items():
            name = key.replace("-", "_")
            if name not in fields:
                extra[key] = value
                continue
            kwargs[name] = _coerce(key, value, getattr(defaults, name))
        return cls(**kwargs, extra=extra)


def _coerce(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return parse_defenses(value)
        return str(value)
    except (TypeError, ValueError) as err:
        if "defense" in str(err):
            raise
        raise ValueError(
            f"bad value for {key!r}: {value!r} (expected {type(default).__name__})"
        ) from err


# --------------------------------------------------------------------------------------------
# Seeds, models


def derive_seeds(seed: int, server_round: int, partition_id: int, n: int = 3) -> list[int]:
    """``n`` independent 32-bit seeds for (run seed, round, partition)."""
    ss = np.random.SeedSequence([int(seed), int(server_round), int(partition_id) + 1])
    return [int(s) for s in ss.generate_state(n)]


def build_model(
    cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...], *, seed: int | None = None
) -> nn.Module:
    """The configured model with its model defenses (e.g. PRECODE), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build(cfg.model, num_classes, input_shape)
        model = apply_model_defenses(model, cfg.defenses, cfg.defense_params, input_shape)
    return model


def model_bytes(cfg: RunConfig) -> int:
    """Bytes of the configured model's state dict (what a FedAvg reply carries), without
    loading any data. (Built on the CPU: the meta device's first use costs seconds.)"""
    input_shape, num_classes = data_mod.shape_and_classes(cfg.dataset)
    model = build_model(cfg, num_classes, input_shape)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


_MODELS: dict[tuple[Any, ...], nn.Module] = {}


def get_model(cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A cached model of this architecture (callers load the weights they need into it).

    Building the network once per process (a Ray actor serves many rounds and clients)
    saves the initialisation cost; :func:`compute_update` always loads the full state.
    """
    key = (cfg.model, num_classes, tuple(input_shape), cfg.defenses, cfg.defense_params)
    if key not in _MODELS:
        _MODELS.clear()  # one architecture per process is the common case; bound the memory
        _MODELS[key] = build_model(cfg, num_classes, input_shape, seed=0)
    return _MODELS[key]


def initial_state(
    cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...]
) -> OrderedDict[str, Tensor]:
    """The global model's initial state dict, seeded by ``cfg.seed``."""
    return build_model(cfg, num_classes, input_shape, seed=cfg.seed).state_dict()


def as_tensor(values: Tensor | np.ndarray) -> Tensor:
    """``torch.as_tensor`` without a copy, also of read-only arrays (zero-copy views of
    received bytes); callers only read the result."""
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.as_tensor(values)
    return torch.as_tensor(values)


def load_state(model: nn.Module, state: Mapping[str, Tensor | np.ndarray]) -> None:
    """Load a full state dict of tensors or arrays (strict; dtypes cast to the model's)."""
    model.load_state_dict({k: as_tensor(v) for k, v in state.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# Client data


@dataclass(frozen=True)
class ClientData:
    """One client's data. Indices point into the dataset's train / test split."""

    partition_id: int
    num_partitions: int
    train_indices: np.ndarray
    test_indices: np.ndarray
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]


@functools.lru_cache(maxsize=8)
def _train_splits(
    dataset: str,
    data_dir: str | None,
    scheme: str,
    num_partitions: int,
    alpha: float,
    classes_per_client: int,
    seed: int,
) -> list[np.ndarray]:
    labels = data_mod.load(dataset, data_dir).train.tensors[1].numpy()
    return partition(
        labels,
        num_partitions,
        scheme,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )


@functools.lru_cache(maxsize=8)
def _test_splits(
    dataset: str, data_dir: str | None, num_partitions: int, seed: int
) -> list[np.ndarray]:
    n_test = len(data_mod.load(dataset, data_dir).test)
    perm = np.random.default_rng(seed).permutation(n_test)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_partitions)]


def _check_partition(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")


def partition_key(
    cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str | None = None
) -> str:
    """A string naming exactly which training examples a client holds (for caching them)."""
    directory = data_dir or cfg.data_dir or ""
    return (
        f"{cfg.dataset}|{directory}|{cfg.partition}|{num_partitions}|{cfg.alpha}|"
        f"{cfg.classes_per_client}|{cfg.seed}|{partition_id}"
    )


def train_indices(
    cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str | None = None
) -> np.ndarray:
    """Train-split indices of partition ``partition_id`` (cached in-process).

    Partitioning imports Hugging Face ``datasets`` (seconds); a Flower deployment starts a
    fresh process per message, so the ClientApp also keeps the result in its node state.
    """
    _check_partition(partition_id, num_partitions)
    directory = data_dir or cfg.data_dir or None
    parts = _train_splits(
        cfg.dataset,
        directory,
        cfg.partition,
        num_partitions,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.seed,
    )
    return parts[partition_id]


def partition_sizes(cfg: RunConfig, data_dir: str | None = None) -> list[int]:
    """Training examples of each of the ``cfg.clients`` partitions, computed as the clients
    do. Loads the data and partitions it: a bad data dir raises FileNotFoundError, an
    impossible partitioning ValueError (one line each), and so does an empty partition
    (a client with no data cannot train)."""
    directory = data_dir or cfg.data_dir or None
    parts = _train_splits(
        cfg.dataset,
        directory,
        cfg.partition,
        cfg.clients,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.seed,
    )
    sizes = [len(p) for p in parts]
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise ValueError(
            f"partition {empty[0]} of {cfg.clients} has no training examples "
            f"(partition {cfg.partition}); use fewer clients or another partition"
        )
    return sizes


def max_examples(cfg: RunConfig, data_dir: str | None = None) -> int:
    """The largest ``num-examples`` an honest client claims in a train reply: ``cfg``'s
    ``max-examples`` if set, else FedSGD the batch size, FedAvg the largest partition of
    the run's data (:func:`partition_sizes`; in a deployment whose nodes hold other data
    than the server, set ``max-examples``)."""
    if cfg.max_examples > 0:
        return cfg.max_examples
    if cfg.mode == "fedsgd":
        return cfg.batch_size
    return max(partition_sizes(cfg, data_dir))


def client_data(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    data_dir: str | None = None,
    *,
    train: np.ndarray | None = None,
    with_train: bool = True,
) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions``: its train examples and test share.

    ``data_dir`` overrides ``cfg.data_dir`` (a node-local setting in deployment). ``train``:
    the partition's train indices if already known (see :func:`train_indices`);
    ``with_train=False`` skips the training data (evaluation needs only the test share).
    """
    _check_partition(partition_id, num_partitions)
    directory = data_dir or cfg.data_dir or None
    bundle = data_mod.load(cfg.dataset, directory)
    if train is None:
        train = (
            train_indices(cfg, partition_id, num_partitions, data_dir)
            if with_train
            else np.zeros(0, np.int64)
        )
    tr = np.asarray(train, dtype=np.int64)
    te = _test_splits(cfg.dataset, directory, num_partitions, cfg.seed)[partition_id]
    # Only this client's rows are normalised: a simulation actor serving many clients then
    # keeps the uint8 images, a quarter of the float32 ones.
    x_train, y_train = bundle.train_split.rows(tr)
    x_test, y_test = bundle.test_split.rows(te)
    return ClientData(
        partition_id=partition_id,
        num_partitions=num_partitions,
        train_indices=tr,
        test_indices=te,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=bundle.num_classes,
        input_shape=tuple(bundle.input_shape),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------
# Client computation


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply for one round, before it is wrapped in a Flower message.

    ``arrays``: FedSGD: one gradient per trainable parameter (``named_parameters`` names and
    order); FedAvg: the full state dict after local training. ``batch_indices``: train-split
    indices of the examples used, in order.
    """

    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float
    accuracy: float
    batch_indices: np.ndarray

    def metrics(
        self, partition_id: int, audit_ground_truth: bool
    ) -> dict[str, int | float | list[int]]:
        """The reply's MetricRecord content."""
        m: dict[str, int | float | list[int]] = {
            "num-examples": int(self.num_examples),
            "train-loss": float(self.loss),
            "train-accuracy": float(self.accuracy),
            "partition-id": int(partition_id),
        }
        if audit_ground_truth:
            m["batch-indices"] = [int(i) for i in self.batch_indices]
        return m


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def compute_update(
    model: nn.Module,
    global_state: Mapping[str, Tensor | np.ndarray],
    data: ClientData,
    cfg: RunConfig,
    server_round: int,
) -> ClientUpdate:
    """One client's update for ``server_round`` starting from ``global_state``.

    FedSGD: the gradient of (cross-entropy + PRECODE loss) on one batch of ``batch-size``
    examples drawn without replacement from the partition. FedAvg: SGD for ``local-steps``
    (or ``local-epochs`` passes) over shuffled batches. Update defenses are then applied.
    """
    n = len(data.y_train)
    if n == 0:
        raise ValueError(f"partition {data.partition_id} has no training examples")
    load_state(model, global_state)
    s_batch, s_torch, s_noise = derive_seeds(cfg.seed, server_round, data.partition_id)
    noise_gen = torch.Generator().manual_seed(s_noise)
    params = [(name, p) for name, p in model.named_parameters()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s_torch)  # PRECODE's reparameterisation noise
        model.train()
        if cfg.mode == "fedsgd":
            rng = np.random.default_rng(s_batch)
            pos = np.sort(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
            x, y = data.x_train[pos], data.y_train[pos]
            loss, logits = loss_fn(model, x, y)
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            update = {
                name: (torch.zeros_like(p) if g is None else g.detach())
                for (name, p), g in zip(params, grads, strict=True)
            }
            update = apply_update_defenses(update, cfg.defenses, cfg.defense_params, noise_gen)
            arrays = {k: v.numpy() for k, v in update.items()}
            acc = float((logits.argmax(1) == y).float().mean())
            return ClientUpdate(arrays, len(y), float(loss.detach()), acc, data.train_indices[pos])

        per_epoch = math.ceil(n / cfg.batch_size)
        steps = cfg.local_steps or max(1, round(cfg.local_epochs * per_epoch))
        gen = torch.Generator().manual_seed(s_batch)
        batches = _epoch_batches(n, cfg.batch_size, gen)
        opt = LocalSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        used: list[Tensor] = []
        loss_sum, correct = 0.0, 0
        for _ in range(steps):
            idx = next(batches)
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad()
            loss, logits = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            used.append(idx)
    order = torch.cat(used).numpy()
    state = model.state_dict()
    if has_update_defense(cfg.defenses):
        start = {k: as_tensor(global_state[k]) for k, _ in params}
        delta = {k: state[k] - start[k].to(state[k].dtype) for k, _ in params}
        delta = apply_update_defenses(delta, cfg.defenses, cfg.defense_params, noise_gen)
        state = OrderedDict(
            (k, start[k].to(v.dtype) + delta[k] if k in delta else v) for k, v in state.items()
        )
    # Reply in the dtypes received, so the server's checks and aggregation see stable types
    # (Flower's FedAvg turns integer buffers such as num_batches_tracked into floats).
    arrays = {
        k: v.detach().numpy().astype(np.asarray(global_state[k]).dtype, copy=False)
        for k, v in state.items()
    }
    return ClientUpdate(
        arrays, n, loss_sum / len(order), correct / len(order), data.train_indices[order]
    )


def evaluate_client(
    model: nn.Module, global_state: Mapping[str, Tensor | np.ndarray], data: ClientData
) -> EvalStats:
    """Loss and accuracy of ``global_state`` on the client's test share."""
    load_state(model, global_state)
    return evaluate(model, (data.x_test, data.y_test))
