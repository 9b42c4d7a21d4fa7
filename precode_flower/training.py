"""Local training and evaluation, with the PRECODE loss added automatically."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from .precode import precode_loss


@dataclass(frozen=True)
class TrainStats:
    """Mean loss and accuracy over the examples seen during training."""

    loss: float
    accuracy: float
    steps: int
    examples: int


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    examples: int


def as_tensors(dataset: Dataset | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of a TensorDataset, a (nested) Subset of one, or any map dataset.

    Indexing the tensors directly is far faster than a DataLoader over single items.
    """
    if isinstance(dataset, tuple):
        return dataset
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        x, y = as_tensors(dataset.dataset)
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return x[idx], y[idx]
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(task cross-entropy + PRECODE loss, logits) for one batch."""
    logits = model(x)
    return F.cross_entropy(logits, y) + precode_loss(model), logits


def compute_gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[Tensor], float]:
    """FedSGD update: gradients of the training loss on one batch, in train mode.

    Returns one gradient per parameter (``model.parameters()`` order) and the loss.
    The model's ``.grad`` fields are left untouched.
    """
    model.train()
    params = [p for p in model.parameters()]
    loss, _ = loss_fn(model, x, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    return grads, float(loss.detach())


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


class LocalSGD:
    """SGD with optional heavy-ball momentum: ``torch.optim.SGD``'s update (no dampening,
    Nesterov or weight decay), step for step the same numbers, without ``torch.optim``.

    Why not ``torch.optim.SGD``: its first ``step()`` imports ``torch._dynamo`` (about 900
    modules and 80 MiB per process, plus a second or two), which every simulation actor
    would pay for a few lines of arithmetic.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0) -> None:
        if lr < 0 or momentum < 0:
            raise ValueError(f"lr and momentum must be >= 0, got {lr} and {momentum}")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self._buffers: dict[int, Tensor] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            step = p.grad
            if self.momentum:
                buf = self._buffers.get(i)
                if buf is None:
                    buf = self._buffers[i] = torch.clone(step).detach()
                else:
                    buf.mul_(self.momentum).add_(step)
                step = buf
            p.add_(step, alpha=-self.lr)


def train(
    model: nn.Module,
    dataset: Dataset | tuple[Tensor, Tensor],
    *,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> TrainStats:
    """Train ``model`` with SGD for ``epochs`` passes or ``steps`` batches (exactly one of them).

    The loss is cross-entropy plus :func:`precode_loss`, so PRECODE models need nothing extra.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    x_all, y_all = as_tensors(dataset)
    n = len(y_all)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_epoch = -(-n // batch_size)
    total = steps if steps is not None else max(1, round(epochs * per_epoch))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    if seed is not None:
        torch.manual_seed(seed)
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    opt = optimizer or torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    loss_sum, correct, seen = 0.0, 0, 0
    batches = _batches(n, batch_size, gen)
    for _ in tqdm(range(total), desc="train", disable=not progress, leave=False):
        idx = next(batches)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss, logits = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return TrainStats(loss_sum / seen, correct / seen, total, seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset | tuple[Tensor, Tensor],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> EvalStats:
    """Mean cross-entropy (without the PRECODE term) and accuracy in eval mode."""
    x_all, y_all = as_tensors(dataset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(y_all), batch_size):
            x = x_all[start : start + batch_size].to(device)
            y = y_all[start : start + batch_size].to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(y_all), 1)
    return EvalStats(loss_sum / n, correct / n, len(y_all))
