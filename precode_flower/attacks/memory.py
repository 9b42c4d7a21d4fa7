"""Peak-memory estimates of attack runs, made before they run.

Every attack declares an estimator with its registration (``register(name, memory=...)``):
a function of a :class:`MemoryCase` (the model's :class:`Footprint`, the update's batch and
local training, the attack's options) returning the bytes the attack adds at its peak to
the process that runs it. :func:`estimate_memory` adds what every run costs on top (the
model and update copies a worker holds, scoring against ground truth). The auditor refuses
a run whose estimate exceeds its budget, and runs the rest under a hard limit, so an
estimate only needs to be a safe upper bound of the right order (measured against real
peaks in ``tests/test_audit_memory.py``; "Attack memory" in docs/BENCHMARKS.md).

A footprint is measured with one small dry training pass (two examples, train mode, the
client's loss): the bytes autograd saves for the backward pass per example, and the shapes of
the Linear layers. An attack that differentiates through the gradient (``ig``, ``dlg``,
``fedavg``) keeps a few such graphs alive at once; the constants below say how many.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

GB = 1 << 30
#: Pairs of images one chunk of the SSIM matching compares (see ``metrics.match``).
MATCH_CHUNK_ELEMENTS = 1 << 19
#: Float32 tensors of one chunk's size alive at once inside SSIM (measured; rounded up).
SSIM_TENSORS = 110
#: Fixed slack per run: small tensors, allocator rounding, Python objects.
SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class Footprint:
    """Sizes of one model, from its parameters and a dry training pass.

    Attributes:
        param_bytes: bytes of all parameters (an update or a gradient has the same size).
        saved_bytes: bytes autograd saves for the backward pass, per example.
        output_bytes: bytes of every leaf module's output in the forward pass, per example.
        input_numel: elements of one example.
        linears: (out, in, sees the flattened image) of each ``nn.Linear``, in forward order.
    """

    param_bytes: int
    saved_bytes: int
    output_bytes: int
    input_numel: int
    linears: tuple[tuple[int, int, bool], ...] = ()


@dataclass(frozen=True)
class MemoryCase:
    """What an estimator may use: the model's footprint, the update, the attack's options.

    ``local_steps`` and ``local_batch_size`` describe the client's training behind a weight
    update (1 and ``batch_size`` for a gradient); ``scored``: ground truth came with the job.
    """

    footprint: Footprint
    batch_size: int
    input_shape: tuple[int, int, int]
    kind: str = "gradients"
    local_steps: int = 1
    local_batch_size: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    scored: bool = False


MemoryEstimator = Callable[[MemoryCase], int]


def footprint(model: nn.Module, input_shape: Sequence[int]) -> Footprint:
    """Measure ``model``'s :class:`Footprint` with a dry training pass of two examples.

    Leaves the model as it was (modes, flags, buffers, RNG; see ``attack_session``).
    """
    from ..training import loss_fn
    from .gradient_matching import attack_session

    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    param_ptrs = {p.data_ptr() for p in params}
    device = params[0].device if params else torch.device("cpu")
    n = 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *input_shape, generator=gen).to(device)
    flat = x.flatten(1)
    saved: dict[int, int] = {}
    outputs = [0]
    linears: list[tuple[int, int, bool]] = []

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta" and t.data_ptr() not in param_ptrs:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def on_output(_m: nn.Module, _a: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                outputs[0] += t.numel() * t.element_size()

    def on_linear(m: nn.Module, args: tuple) -> None:
        a = args[0]
        sees = a.shape == flat.shape and bool(torch.equal(a, flat))
        linears.append((m.out_features, m.in_features, sees))

    hooks = []
    for m in model.modules():
        if not any(True for _ in m.children()):
            hooks.append(m.register_forward_hook(on_output))
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(on_linear))
    try:
        with attack_session(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = torch.zeros(n, dtype=torch.long, device=device)
            loss, _ = loss_fn(model, x, y)  # the graph stays alive while its tensors are counted
            saved_bytes = sum(saved.values())
            del loss
    finally:
        for h in hooks:
            h.remove()
    return Footprint(
        param_bytes=int(param_bytes),
        saved_bytes=int(saved_bytes // n),
        output_bytes=int(outputs[0] // n),
        input_numel=int(flat.shape[1]),
        linears=tuple(linears),
    )


def scoring_memory(batch_size: int, input_numel: int) -> int:
    """Bytes scoring a batch against ground truth takes (chunked SSIM matching, metrics)."""
    row = batch_size * input_numel  # one original against every reconstruction
    chunk = max(min(batch_size * row, MATCH_CHUNK_ELEMENTS), row) * 4 * SSIM_TENSORS
    whole = batch_size * input_numel * 8 * SSIM_TENSORS // 4  # the final metrics, float64 PSNR
    return chunk + whole + batch_size * batch_size * 16


def run_overhead(case: MemoryCase) -> int:
    """Bytes every run costs besides the attack itself.

    The worker holds the job's update and global state, builds the model, gives each
    attack a copy and may turn the update into a pseudo-gradient: five model-sized copies.
    """
    fp = case.footprint
    images = 3 * case.batch_size * fp.input_numel * 4
    score = scoring_memory(case.batch_size, fp.input_numel) if case.scored else 0
    return 5 * fp.param_bytes + images + score + SLACK_BYTES


def gradient_matching_memory(case: MemoryCase) -> int:
    """Optimisation attacks that match a gradient (``ig``, ``dlg``, ``ignore-bottleneck``).

    Per iteration: the candidate's forward graph, the gradient computed with
    ``create_graph=True`` (its own graph, about twice the forward's) and the backward pass
    through both; parameter-sized gradients and targets; a few copies of the images
    (optimiser state, the best point, the restarts' results).
    """
    fp = case.footprint
    b = case.batch_size
    restarts = int(case.options.get("restarts", 1) or 1)
    images = (6 + restarts) * b * fp.input_numel * 4
    return 6 * fp.saved_bytes * b + 6 * fp.param_bytes + images


def lbfgs_memory(case: MemoryCase) -> int:
    """``dlg``: gradient matching plus L-BFGS' history (``history_size`` pairs of
    image-sized vectors, 100 by default)."""
    history = int(case.options.get("history_size", 100) or 100)
    vectors = 2 * history * case.batch_size * (case.footprint.input_numel + 1000) * 4
    return gradient_matching_memory(case) + vectors


def unrolled_memory(case: MemoryCase) -> int:
    """Attacks that unroll the client's local training (``fedavg``): every step's graph
    (forward, ``create_graph`` gradient, new weights) stays alive until the backward pass."""
    fp = case.footprint
    steps = max(1, case.local_steps)
    b = case.local_batch_size or max(1, case.batch_size // steps)
    per_step = 6 * fp.saved_bytes * b + 4 * fp.param_bytes
    images = 8 * case.batch_size * fp.input_numel * 4
    return steps * per_step + 4 * fp.param_bytes + images


def generic_memory(case: MemoryCase) -> int:
    """The estimate of an attack registered without its own: the larger of the gradient
    matching and unrolled-training estimates, doubled (a deliberately safe default)."""
    return 2 * max(gradient_matching_memory(case), unrolled_memory(case))


def estimate_memory(estimator: MemoryEstimator, case: MemoryCase) -> int:
    """Peak bytes of one run: ``estimator``'s part plus :func:`run_overhead`."""
    return int(estimator(case)) + run_overhead(case)


def label_memory(case: MemoryCase) -> int:
    """Label recovery reads the classifier's gradient: a copy of the update at most."""
    return 2 * case.footprint.param_bytes
