"""The worker process: holds one job's payload, runs attacks on it, sends rows back.

Runs in a spawned process (see :class:`~precode_flower.audit.auditor.LeakageAuditor` for
why processes). Each worker uses few torch threads so that an audit cannot take every core
from training.
"""

from __future__ import annotations

import importlib
import inspect
import os
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import ATTACKS
from ..attacks.base import reconstructs_images, spec
from ..local_training import LocalTraining
from .budget import apply_hard_limit, gb, is_out_of_memory
from .jobs import copy_model


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _build_model(payload: dict[str, Any], device: torch.device) -> nn.Module:
    spec = payload["model"]
    model = spec if isinstance(spec, nn.Module) else spec()
    if payload["global_state"] is not None:
        model.load_state_dict(payload["global_state"], strict=True)
    return model.to(device)


def attack_inputs(
    payload: Mapping[str, Any], attack: str
) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
    """(tensors to pass as ``gradients``, extra options, whether they are pseudo-gradients).

    An attack declared with ``inputs="weights"`` (``fedavg``) inverts a weight update by
    unrolling the job's local training; the gradient attacks need gradients. A FedSGD
    gradient is the weight update of one step at lr 1 (with the sign flipped); a FedAvg
    update is turned into the pseudo-gradient
    ``-(new - old) / (lr * s)``, ``s`` the training's effective step count
    (:meth:`LocalTraining.effective_steps`: the steps for plain SGD, more with momentum; exact
    for one full-batch step of plain SGD; a direction only for Adam).
    """
    update: dict[str, Tensor] = payload["update"]
    kind = payload["kind"]
    n = int(payload["batch_size"])
    if spec(attack).inputs == "weights":
        if kind == "weights":
            return update, {"training": payload["training"]}, False
        delta = {k: -v for k, v in update.items()}
        one_step = LocalTraining(batch_size=n, steps=1, lr=1.0).with_defaults()
        return delta, {"training": one_step}, False
    if kind == "gradients":
        return update, {}, False
    training: LocalTraining = payload["training"]
    if not training.lr:
        raise ValueError(f"{attack}: a weight update needs the local learning rate (lr)")
    scale = float(training.lr) * training.effective_steps(n)
    return {k: -v / scale for k, v in update.items()}, {}, True


def pseudo_gradient_text(payload: Mapping[str, Any]) -> str:
    """How a weight update became this attack's gradient, for the row."""
    training: LocalTraining = payload["training"]
    n = int(payload["batch_size"])
    steps = training.total_steps(n)
    effective = training.effective_steps(n)
    text = f"-update / (lr {training.lr:g} x {effective:.4g})"
    if (training.optimizer or "sgd") != "sgd":
        return text + f": {training.optimizer} has no linear scale, a direction only"
    if training.momentum:
        return text + f": mean gradient of {steps} momentum-{training.momentum:g} steps"
    return text + (": exact (one full-batch step)" if steps == 1 else f": mean of {steps} steps")


def _run_attack(
    payload: dict[str, Any],
    model: nn.Module,
    attack: str,
    options: dict[str, Any],
    seed: int,
    success_ssim: float,
) -> tuple[dict[str, Any], Tensor | None]:
    """Run one attack on one update; score it where ground truth came with the job."""
    from ..attacks import reconstruct
    from ..ground_truth import score_against_partition
    from ..metrics import identified, score

    fn = ATTACKS[attack]
    tensors, extra, pseudo = attack_inputs(payload, attack)
    opts = {k: v for k, v in {**extra, **options}.items() if v is not None and _accepts(fn, k)}
    result = reconstruct(
        attack,
        copy_model(model),  # attacks must leave the model alone; a copy makes sure
        tensors,
        input_shape=payload["input_shape"],
        mean=payload["mean"],
        std=payload["std"],
        batch_size=payload["batch_size"],
        seed=seed,
        **opts,
    )
    row: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "seconds": result.seconds,
        "loss": result.loss,
        "labels": None if result.labels is None else result.labels.tolist(),
        "recovered": result.recovered,
        "pseudo_gradient": pseudo,
        "info": result.info,
        "scored": False,
    }
    if pseudo:
        row["pseudo_gradient_estimate"] = pseudo_gradient_text(payload)
    truth = payload["ground_truth"]
    if truth is not None:
        x, y = truth
        rate = score_against_partition if payload["truth_kind"] == "partition" else score
        scores = rate(result, x, y, payload["mean"], payload["std"], success_ssim=success_ssim)
        for key in ("attack", "batch_size", "seconds", "loss", "recovered"):  # ours stay
            scores.pop(key, None)
        row.update(scores)
        row["scored"] = True
        refs = payload.get("references")
        if refs is not None and reconstructs_images(attack):
            hits = identified(result.images, x, refs, payload["mean"], payload["std"])
            row["linked"] = int(hits.sum())
            row["per_image"]["linked"] = hits.tolist()
            row["references"] = len(refs)
            row["classes"] = num_classes(model, payload)
        if row.get("label_accuracy") is not None and len(y) > 1:
            row["label_baseline"] = even_count_baseline(model, payload, y)
    images = None if result.images is None else result.images.detach().cpu()
    return row, images


def num_classes(model: nn.Module, payload: Mapping[str, Any]) -> int:
    """The model's number of outputs (classes), from one forward pass in eval mode."""
    device = next(model.parameters()).device
    with torch.no_grad():
        was = model.training
        model.eval()
        classes = int(model(torch.zeros(1, *payload["input_shape"], device=device)).shape[-1])
        model.train(was)
    return classes


def even_count_baseline(model: nn.Module, payload: Mapping[str, Any], labels: Tensor) -> float:
    """Label accuracy of an uninformed guess: the batch's size spread evenly over the classes.

    Multiset label accuracy of a large batch is high for any guess with plausible counts, so
    a recovered label count only leaks what it adds over this.
    """
    from ..metrics import label_accuracy

    classes = num_classes(model, payload)
    n = len(labels)
    counts = torch.full((classes,), n // classes, dtype=torch.long)
    counts[: n % classes] += 1
    guess = torch.repeat_interleave(torch.arange(classes), counts)
    return label_accuracy(guess, labels)


def _prefer_oom_kill() -> None:
    """Ask Linux's out-of-memory killer to pick this worker first (oom_score_adj 1000).

    An attack that exhausts memory then costs its own worker (replaced, the run logged as
    an error), never the server; raising one's own score needs no privilege.
    """
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass  # not Linux, or /proc not writable: nothing to do


def _hard_limit(dev: torch.device, memory_limit: int | None) -> int | None:
    """Put this worker under its hard memory limit (see :mod:`.budget`); the limit set."""
    if memory_limit is None:
        return None
    if dev.type == "cuda":
        # Device memory: torch's caching allocator raises OutOfMemoryError beyond this.
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit / total), dev)
        return memory_limit
    return apply_hard_limit(memory_limit)


def _worker_main(
    conn: Connection, device: str, threads: int, nice: int, memory_limit: int | None = None
) -> None:
    """Worker loop: hold one job's payload, run attacks on it, send rows back.

    ``memory_limit``: bytes the worker may allocate beyond its idle size (None: no limit).
    """
    torch.set_num_threads(threads)
    _prefer_oom_kill()
    dev = torch.device(device)
    # Import what scoring needs before reporting ready, so that the first attack's wall time
    # (and its time limit) does not include seconds of imports (torchmetrics, scipy).
    from .. import metrics

    metrics.preload()
    # Only now: the limit is the idle worker (torch, the scoring libraries) + the budget.
    limit = _hard_limit(dev, memory_limit)

    if nice and hasattr(os, "nice"):
        # Training first: attacks take the CPU time that training leaves. Only now, so that a
        # busy machine does not starve the worker's start-up.
        os.nice(nice)
    conn.send(("ready", os.getpid(), limit))
    payload: dict[str, Any] | None = None
    model: nn.Module | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "job":
            payload, model = msg[2], None
            continue
        _, task_id, attack, module, options, seed, success_ssim, estimate = msg
        images = None
        out_of_memory = False
        try:
            if attack not in ATTACKS and module:  # registered outside the package: import it
                importlib.import_module(module)
            if payload is None:
                raise RuntimeError("no job payload received")
            if model is None:
                model = _build_model(payload, dev)
            row, images = _run_attack(payload, model, attack, options, seed, success_ssim)
        except Exception as e:  # a failing attack is a result, not a worker crash
            out_of_memory = is_out_of_memory(e)
            error = f"{type(e).__name__}: {e}"
            if out_of_memory:
                limit_text = (
                    "more memory than there was"
                    if memory_limit is None
                    else f"more than the worker's hard limit of {gb(memory_limit)} GB"
                )
                error = (
                    f"out of memory: the attack needed {limit_text} (its estimate was "
                    f"{gb(estimate)} GB; --audit-memory-gb): {error.splitlines()[0][:300]}"
                )
            row = {
                "status": "error",
                "error": error,
                "traceback": traceback.format_exc(limit=-6),
            }
        try:
            conn.send(("result", task_id, row, images))
        except Exception as e:  # e.g. an unpicklable info value
            conn.send(("result", task_id, {"status": "error", "error": f"unsendable: {e}"}, None))
        if out_of_memory:
            # A fresh worker (the auditor starts one) instead of a fragmented heap; at once:
            # the interpreter's orderly teardown of torch took seconds on a busy machine.
            conn.close()
            os._exit(0)
