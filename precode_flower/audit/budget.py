"""The audit's memory budget: estimates checked before a run, a hard limit while it runs.

Server side, before a job is queued, each attack's registered estimator
(:mod:`precode_flower.attacks.memory`) gives the run's peak; a run whose estimate exceeds the
per-worker budget is not run but logged as ``skipped`` with both numbers. Worker side, every
worker runs under ``RLIMIT_DATA`` = its idle size + the budget, so a run whose estimate was
too low fails with an out-of-memory error (a ``MemoryError`` or torch's allocation error,
reported as such) instead of growing until the kernel's OOM killer picks a process.

Why ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: torch, its thread pools and (where used) CUDA
reserve large virtual ranges they never touch (a CPU worker is ~3.7 GB virtual at ~0.8 GB
resident), so an address-space limit either fails at import or bounds nothing useful.
``RLIMIT_DATA`` (Linux >= 4.7) counts private writable mappings, i.e. the heap and
anonymous ``mmap`` that tensors live in. On CUDA devices only host memory is limited this
way, and device memory by torch's per-process memory fraction.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from ..attacks import memory as attack_memory
from ..attacks.base import spec

log = logging.getLogger(__name__)

GB = attack_memory.GB
#: Default budget: this fraction of the memory available (``MemAvailable``) when the auditor
#: starts, shared by its workers. The rest is left to training, the server and other users.
DEFAULT_MEMORY_FRACTION = 0.5


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int | None:
    """:data:`DEFAULT_MEMORY_FRACTION` of :func:`available_memory` (None if unknown)."""
    avail = available_memory()
    return None if avail is None else int(avail * DEFAULT_MEMORY_FRACTION)


def memory_case(
    payload: Mapping[str, Any], footprint: attack_memory.Footprint, options: Mapping[str, Any]
) -> attack_memory.MemoryCase:
    """The :class:`~precode_flower.attacks.memory.MemoryCase` of one job (a snapshot)."""
    steps = int(payload["local_steps"]) if payload["kind"] == "weights" else 1
    return attack_memory.MemoryCase(
        footprint=footprint,
        batch_size=int(payload["batch_size"]),
        input_shape=tuple(payload["input_shape"]),
        kind=str(payload["kind"]),
        local_steps=steps,
        local_batch_size=payload["local_batch_size"] if steps > 1 else payload["batch_size"],
        options=dict(options),
        scored=payload["ground_truth"] is not None,
    )


def estimate(attack: str, case: attack_memory.MemoryCase) -> int:
    """Peak bytes of one run of ``attack`` (its registered estimator plus the run's overhead)."""
    return attack_memory.estimate_memory(spec(attack).memory, case)


def gb(value: int | None) -> float | None:
    """Bytes as GB rounded to 3 decimals (for rows and messages)."""
    return None if value is None else round(value / GB, 3)


# --------------------------------------------------------------------------------------------
# Worker side


def data_size() -> int | None:
    """This process's data segment (``VmData``: private writable mappings), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def apply_hard_limit(extra: int) -> int | None:
    """Limit this process's data segment to its current size + ``extra`` bytes.

    Returns the limit set (bytes), or None where the platform has no ``RLIMIT_DATA`` or the
    current size is unknown (then nothing is limited).
    """
    try:
        import resource
    except ImportError:  # not Unix
        return None
    current = data_size()
    if current is None or not hasattr(resource, "RLIMIT_DATA"):
        return None
    limit = current + int(extra)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


@contextlib.contextmanager
def hard_limit(extra: int | None) -> Iterator[int | None]:
    """:func:`apply_hard_limit` for the duration of a ``with`` block, then the old limit."""
    try:
        import resource
    except ImportError:
        resource = None  # type: ignore[assignment]
    if extra is None or resource is None or not hasattr(resource, "RLIMIT_DATA"):
        yield None
        return
    old = resource.getrlimit(resource.RLIMIT_DATA)
    try:
        yield apply_hard_limit(extra)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (Python's, numpy's or torch's, CPU or CUDA)."""
    if isinstance(err, MemoryError):
        return True
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "Cannot allocate memory" in text
    )
