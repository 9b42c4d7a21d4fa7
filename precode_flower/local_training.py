"""What the server knows of the clients' local training, and that training as a pure function.

:class:`LocalTraining` describes a client's local training loop (batch size, epochs or steps,
optimizer and its hyperparameters, loss) the way a Flower app's ``train`` function runs it:
each epoch visits the client's ``n`` examples once in batches of ``batch_size``, the last
batch ragged (``ceil(n / batch_size)`` steps an epoch), exactly like a ``DataLoader`` without
``drop_last``. Values unknown to the server are None; :meth:`LocalTraining.resolve` fills them
with stated guesses and says which were guessed, so that an audit can say what it assumed.

:func:`unrolled_update` replays that training differentiably (``torch.func.functional_call``),
step for step the same arithmetic as ``torch.optim.SGD`` (momentum, dampening-free, Nesterov,
weight decay) and ``torch.optim.Adam`` / ``AdamW`` with their defaults, so that the ``fedavg``
attack can optimise the data behind a weight update. Torch only: no Flower here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .precode import precode_loss

Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
LOSSES: tuple[str, ...] = ("cross_entropy",)
LossFn = Callable[[Tensor, Tensor], Tensor]

#: Train-config keys that describe local training (hyphenated, as Flower apps name them),
#: mapped to :class:`LocalTraining` fields. Values found in a round's config override ``local=``.
CONFIG_KEYS: dict[str, str] = {
    "batch-size": "batch_size",
    "batch_size": "batch_size",
    "local-epochs": "epochs",
    "local_epochs": "epochs",
    "epochs": "epochs",
    "local-steps": "steps",
    "local_steps": "steps",
    "lr": "lr",
    "learning-rate": "lr",
    "learning_rate": "lr",
    "momentum": "momentum",
    "weight-decay": "weight_decay",
    "weight_decay": "weight_decay",
    "optimizer": "optimizer",
}

#: What :meth:`LocalTraining.resolve` assumes for a field nobody stated.
GUESSES: dict[str, Any] = {
    "epochs": 1.0,
    "lr": 0.01,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "optimizer": "sgd",
}


@dataclass(frozen=True)
class LocalTraining:
    """The clients' local training, as far as the server knows it (None: unknown).

    Args:
        batch_size: examples per step; None: unknown (guessed: all examples in one step).
        epochs: passes over the client's examples (may be fractional: ``round(epochs *
            steps_per_epoch)`` steps, as :func:`precode_flower.training.train`); give this or
            ``steps``, not both.
        steps: local steps, overriding ``epochs``.
        lr: the local learning rate.
        momentum, dampening-free heavy ball (SGD); nesterov: Nesterov momentum (SGD).
        weight_decay: L2 penalty added to the gradient (SGD, Adam) or decoupled (AdamW).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (torch's defaults otherwise).
        betas, eps: Adam's.
        loss: ``"cross_entropy"`` (mean over the batch) or a picklable (module-level)
            ``loss(logits, labels) -> scalar``; the PRECODE KL term is added where the model
            has bottlenecks, as :func:`precode_flower.training.loss_fn` does.

    Raises:
        ValueError: on an impossible value, naming it.
    """

    batch_size: int | None = None
    epochs: float | None = None
    steps: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    optimizer: Optimizer | None = None
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loss: str | LossFn = "cross_entropy"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"LocalTraining: {msg}")

        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise bad(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise bad(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and not (_number(self.epochs) and self.epochs > 0):
            raise bad(f"epochs must be a number > 0, got {self.epochs!r}")
        if self.lr is not None and not (_number(self.lr) and self.lr > 0):
            raise bad(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value >= 0):
                raise bad(f"{name} must be a number >= 0, got {value!r}")
        if self.momentum is not None and self.momentum >= 1:
            raise bad(f"momentum must be < 1, got {self.momentum!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.nesterov and (self.optimizer not in (None, "sgd") or not self.momentum):
            raise bad("nesterov needs optimizer 'sgd' with momentum > 0")
        if len(self.betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise bad(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (_number(self.eps) and self.eps > 0):
            raise bad(f"eps must be a number > 0, got {self.eps!r}")
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise bad(f"loss must be one of {LOSSES} or a callable, got {self.loss!r}")
        elif not callable(self.loss):
            raise bad(f"loss must be one of {LOSSES} or a callable, got {self.loss!r}")

    # ---- what is known ------------------------------------------------------------------

    def merged(self, config: Mapping[str, Any]) -> LocalTraining:
        """This description with the values a round's train config states (they win).

        Recognised keys: :data:`CONFIG_KEYS`; a zero or empty value counts as unstated (run
        configs have no null). A bad value raises ValueError naming the key.
        """
        updates: dict[str, Any] = {}
        for key, field in CONFIG_KEYS.items():
            if key not in config or field in updates:
                continue
            value = config[key]
            if value in (None, "", 0, 0.0) and field not in ("momentum", "weight_decay"):
                continue
            try:
                updates[field] = _coerce(field, value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"train config {key}={value!r}: {err}") from None
        if "steps" in updates and updates["steps"] and "epochs" not in updates:
            updates["epochs"] = None  # a stated step count overrides ``local=``'s epochs
        return dataclasses.replace(self, **updates) if updates else self

    def with_defaults(self) -> LocalTraining:
        """Unstated optimizer, momentum and weight decay as ``torch.optim.SGD``'s defaults
        (plain SGD): what a user who describes the training with ``local=`` implies."""
        return dataclasses.replace(
            self,
            optimizer=self.optimizer or "sgd",
            momentum=self.momentum if self.momentum is not None else 0.0,
            weight_decay=self.weight_decay if self.weight_decay is not None else 0.0,
        )

    def unknown(self) -> list[str]:
        """The fields an audit has to guess (batch size, length, lr, optimizer ...)."""
        out = [
            f
            for f in ("batch_size", "lr", "momentum", "weight_decay", "optimizer")
            if getattr(self, f) is None
        ]
        if self.epochs is None and self.steps is None:
            out.insert(1, "epochs")
        return out

    def resolve(self, examples: int) -> tuple[LocalTraining, list[str]]:
        """(a fully specified description for ``examples`` examples, the fields guessed).

        Guesses: one full-batch step (batch size = all examples, 1 epoch), lr 0.01 (plain
        SGD, :func:`precode_flower.training.train`'s defaults), no momentum or weight decay.
        """
        if examples < 1:
            raise ValueError(f"examples must be >= 1, got {examples}")
        guessed = self.unknown()
        fill: dict[str, Any] = {f: GUESSES[f] for f in guessed if f in GUESSES}
        if "batch_size" in guessed:
            fill["batch_size"] = examples
        return dataclasses.replace(self, **fill), guessed

    # ---- the schedule -------------------------------------------------------------------

    def total_steps(self, examples: int) -> int:
        """Local steps over ``examples`` examples (``steps``, or epochs x ceil(n / b))."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(examples / self._batch(examples))
        return max(1, round((self.epochs or 1.0) * per_epoch))

    def batches(self, examples: int) -> list[tuple[int, int]]:
        """(start, stop) rows of every step: epoch after epoch, the last batch ragged.

        The rows stand for the examples in the order the client visited them in its first
        epoch; later epochs revisit them in the same order here (a client that reshuffles
        visits them in another order, which the server cannot know).
        """
        b = self._batch(examples)
        per_epoch = math.ceil(examples / b)
        out = []
        for t in range(self.total_steps(examples)):
            pos = t % per_epoch
            out.append((pos * b, min(examples, (pos + 1) * b)))
        return out

    def used_examples(self, examples: int) -> int:
        """How many of ``examples`` the schedule visits at least once."""
        return max(stop for _, stop in self.batches(examples))

    def effective_steps(self, examples: int) -> float:
        """``s`` such that ``-update / (lr * s)`` estimates the mean gradient (SGD).

        Plain SGD: the number of steps. Heavy-ball momentum mu: the gradient of step t
        reaches the weights with weight ``(1 - mu^(T-t+1)) / (1 - mu)``; Nesterov adds one
        more un-damped step each. Weight decay is left out (it shrinks the weights, not the
        data's gradient). Adam has no such scale: the number of steps (direction only).
        """
        steps = self.total_steps(examples)
        mu = self.momentum or 0.0
        if self.optimizer not in (None, "sgd") or not mu:
            return float(steps)
        heavy = sum((1 - mu**k) / (1 - mu) for k in range(1, steps + 1))
        return steps + mu * heavy if self.nesterov else heavy

    def describe(self, examples: int | None = None, guessed: Sequence[str] = ()) -> str:
        """One line, e.g. ``"SGD lr 0.1 momentum 0.9, batch 32, 1 epoch = 63 steps over 2000
        examples (last batch 16)"``; fields in ``guessed`` are marked ``(assumed)``."""

        def mark(text: str, *fields: str) -> str:
            return text + (" (assumed)" if any(f in guessed for f in fields) else "")

        opt = (self.optimizer or "sgd").upper().replace("ADAMW", "AdamW").replace("ADAM", "Adam")
        parts = [mark(f"{opt} lr {_g(self.lr)}", "optimizer", "lr")]
        if self.momentum:
            parts[0] += f" {'nesterov ' if self.nesterov else ''}momentum {_g(self.momentum)}"
        elif "momentum" in guessed:
            parts[0] += " no momentum (assumed)"
        if self.weight_decay:
            parts[0] += f" weight decay {_g(self.weight_decay)}"
        if not isinstance(self.loss, str):
            parts.append(f"loss {getattr(self.loss, '__qualname__', repr(self.loss))}")
        if examples is None:
            parts.append(f"batch {self.batch_size or 'all'}")
            length = f"{self.steps} steps" if self.steps else f"{_g(self.epochs or 1.0)} epoch(s)"
            parts.append(mark(length, "epochs"))
            return ", ".join(parts)
        b = self._batch(examples)
        parts.append(mark(f"batch {b}", "batch_size"))
        steps = self.total_steps(examples)
        last = examples - (math.ceil(examples / b) - 1) * b
        epochs = f"{_g(self.epochs or 1.0)} epoch(s) = "
        length = f"{'' if self.steps else epochs}{steps} steps"
        length += f" over {examples} examples"
        if last != b and steps >= math.ceil(examples / b):
            length += f" (last batch {last})"
        parts.append(mark(length, "epochs"))
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe fields (a callable loss by its qualified name)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        if not isinstance(self.loss, str):
            out["loss"] = getattr(self.loss, "__qualname__", repr(self.loss))
        return out

    def _batch(self, examples: int) -> int:
        return min(self.batch_size or examples, examples)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _g(value: float | None) -> str:
    return "?" if value is None else format(value, "g")


def _coerce(field: str, value: Any) -> Any:
    if field in ("batch_size", "steps"):
        number = float(value)
        if not number.is_integer():
            raise ValueError("expected an integer")
        return int(number)
    if field == "optimizer":
        return str(value).strip().lower()
    return float(value)


# --------------------------------------------------------------------------------------------
# The training as a differentiable function of the data


def batch_loss(model: nn.Module, logits: Tensor, labels: Tensor, loss: str | LossFn) -> Tensor:
    """The client's loss of one batch: cross-entropy (or ``loss``) + the PRECODE KL term."""
    task = F.cross_entropy(logits, labels) if isinstance(loss, str) else loss(logits, labels)
    return task + precode_loss(model)


def unrolled_update(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    training: LocalTraining,
    *,
    order: Sequence[Tensor | Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
    create_graph: bool = True,
) -> dict[str, Tensor]:
    """``w_T - w_0`` per parameter after the local training on ``(x, labels)``.

    Starts from the model's current weights (not modified), runs ``training`` (fully
    specified: see :meth:`LocalTraining.resolve`) with rows ``order[t]`` at step ``t``
    (default :meth:`LocalTraining.batches`), and returns the update of ``names`` (default:
    every parameter), differentiable in ``x`` when ``create_graph``. Buffers are used as the
    model holds them (train mode: BatchNorm uses batch statistics). The model should be in
    the mode the client trains in; random layers draw from the global RNG.
    """
    n = len(labels)
    if training.lr is None or training.batch_size is None:
        raise ValueError("unrolled_update needs a resolved LocalTraining (lr and batch_size)")
    steps: list[Any]
    if order is None:
        steps = [slice(a, b) for a, b in training.batches(n)]
    else:
        steps = [torch.as_tensor(o, dtype=torch.long, device=x.device) for o in order]
        for i, o in enumerate(steps):
            if o.numel() == 0 or int(o.min()) < 0 or int(o.max()) >= n:
                raise ValueError(f"order[{i}]: rows must be non-empty and in [0, {n})")
    buffers = dict(model.named_buffers())
    start = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    weights = dict(start)
    state = _OptimizerState(training)
    for rows in steps:
        logits = functional_call(model, {**weights, **buffers}, (x[rows],))
        loss = batch_loss(model, logits, labels[rows], training.loss)
        grads = torch.autograd.grad(
            loss, list(weights.values()), create_graph=create_graph, allow_unused=True
        )
        weights = state.step(weights, grads)
    wanted = list(names) if names is not None else list(start)
    if not create_graph:
        return {k: (weights[k] - start[k]).detach() for k in wanted}
    return {k: weights[k] - start[k] for k in wanted}


class _OptimizerState:
    """torch.optim's SGD / Adam / AdamW arithmetic on a dict of weights, without in-place ops."""

    def __init__(self, training: LocalTraining) -> None:
        self.t = training
        self.opt = training.optimizer or "sgd"
        self.lr = float(training.lr)  # type: ignore[arg-type]
        self.mu = float(training.momentum or 0.0)
        self.wd = float(training.weight_decay or 0.0)
        self.bufs: dict[str, Tensor] = {}
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}  # Adam's per-parameter step

    def step(self, weights: dict[str, Tensor], grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
        out = {}
        for (name, w), g in zip(weights.items(), grads, strict=True):
            # torch.optim skips a parameter without a gradient (its state does not advance).
            out[name] = w if g is None else getattr(self, "_" + self.opt)(name, w, g)
        return out

    def _sgd(self, name: str, w: Tensor, g: Tensor) -> Tensor:
        if self.wd:
            g = g + self.wd * w
        if self.mu:
            buf = self.bufs.get(name)
            buf = g if buf is None else buf * self.mu + g
            self.bufs[name] = buf
            g = g + self.mu * buf if self.t.nesterov else buf
        return w - self.lr * g

    def _adam(self, name: str, w: Tensor, g: Tensor, decoupled: bool = False) -> Tensor:
        b1, b2 = self.t.betas
        if self.wd:
            if decoupled:
                w = w * (1 - self.lr * self.wd)
            else:
                g = g + self.wd * w
        m = self.m.get(name, torch.zeros_like(w))
        v = self.v.get(name, torch.zeros_like(w))
        # torch: exp_avg.lerp_(grad, 1 - beta1) == m + (g - m) * (1 - beta1)
        m = m + (g - m) * (1 - b1)
        v = v * b2 + g * g * (1 - b2)
        self.m[name], self.v[name] = m, v
        k = self.counts[name] = self.counts.get(name, 0) + 1
        bc1 = 1 - b1**k
        bc2_sqrt = math.sqrt(1 - b2**k)
        # sqrt(v + tiny): the derivative of sqrt at 0 is infinite (NaN in the double
        # backward where a weight's gradient is exactly 0); tiny is far below float
        # precision of any v that matters (eps = 1e-8 dominates the denominator there).
        denom = (v + 1e-30).sqrt() / bc2_sqrt + self.t.eps
        return w - (self.lr / bc1) * (m / denom)

    def _adamw(self, name: str, w: Tensor, g: Tensor) -> Tensor:
        return self._adam(name, w, g, decoupled=True)
