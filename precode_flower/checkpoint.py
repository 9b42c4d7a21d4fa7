"""Run checkpoints: the server's whole state after a completed round, saved atomically.

A checkpoint (``<run dir>/checkpoint.pt``) holds the round number, the run config, the
global model, the strategy's state (FedSGD's server optimiser), the RNG states of the server
process, its initial evaluation, the round log's rows so far (a lost ``rounds.jsonl`` is
rebuilt from them) and where the run directory was (a run whose data lives in its own
directory, ``<run dir>/data``, can then be resumed after the directory was moved).
:func:`save_checkpoint` writes it to a temporary file in the same directory, fsyncs it and
renames it over the old one, so a crash at any moment
leaves either the previous or the new checkpoint, never a mixture. The file is owner-only
(0o600) and so is the run directory (0o700): the global model can reveal client data
(:mod:`precode_flower.private`).

:func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` (tensors and plain
containers only: no arbitrary pickle) and validates everything before returning: format and
version, the digest of the model tensors, the config (keys that define the run must be
equal; :data:`RESUMABLE_KEYS` may change), and the model's names, shapes and dtypes against
the model the run builds. Any problem raises :class:`CheckpointError` with the reason;
nothing is ever half-loaded, because callers only apply a checkpoint that passed.

Nothing here imports Flower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .private import open_private, private_dir

__all__ = [
    "CHECKPOINT_NAME",
    "RESUMABLE_KEYS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "config_differences",
    "load_checkpoint",
    "model_digest",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "precode-flower-checkpoint"
_VERSION = 1

#: Run-config keys that may differ when resuming: they do not change what a round computes
#: (more rounds, other timeouts and reply limits, the test-only faults of older versions;
#: where the data lives is *not* among them: another directory may hold other data, but a
#: run's own ``<run dir>/data`` may move with it, see :func:`load_checkpoint`).
RESUMABLE_KEYS = frozenset(
    {
        "rounds",
        "round-timeout",
        "fault-injection",
        "max-update-norm",
        "max-reply-mb",
        "min-replies",
        "max-examples",
        "out-dir",
        "resume",
    }
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupted or belongs to another run."""


@dataclass
class Checkpoint:
    """The server's state after round ``round`` completed."""

    round: int
    config: dict[str, bool | int | float | str]
    model: OrderedDict[str, Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, float] = field(default_factory=dict)
    #: The round log's rows of rounds 1..round (``rounds.jsonl`` can be rebuilt from them).
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: Where the run directory was when this was saved (set by :func:`save_checkpoint`).
    run_dir: str = ""


def model_digest(model: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in order."""
    h = hashlib.sha256()
    for name, t in model.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """The server process's ``random``, NumPy and torch RNG states (weights_only-safe types)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])


def _own_tensor(t: Tensor) -> Tensor:
    """``t`` on the CPU, copied only where it is a view into a larger storage (torch.save
    would write all of that storage) or not contiguous."""
    t = t.detach().cpu()
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone()


def save_checkpoint(run_dir: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``run_dir/checkpoint.pt`` atomically; return the path."""
    run_dir = private_dir(run_dir)  # the model can reveal client data: owner-only
    path = run_dir / CHECKPOINT_NAME
    model = OrderedDict((k, _own_tensor(v)) for k, v in ckpt.model.items())
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "round": int(ckpt.round),
        "config": dict(ckpt.config),
        "model": model,
        "digest": model_digest(model),
        "strategy": ckpt.strategy,
        "rng": ckpt.rng,
        "initial": dict(ckpt.initial),
        "rows": json.dumps(ckpt.rows),  # one string: weights_only loads it whatever the rows
        "run_dir": str(run_dir.resolve()),
    }
    tmp = run_dir / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    try:
        with open_private(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable (the directory entry), where the OS allows it.
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is already synced
    finally:
        os.close(fd)
    return path


def _lower_thread_priority(nice: int = 19) -> None:
    """Give the calling thread the lowest CPU priority where the OS allows it per thread
    (Linux, where a thread is a task with its own nice value); elsewhere leave it."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:  # a sandbox may forbid it: the writer then runs at normal priority
            pass


class CheckpointWriter:
    """Saves checkpoints on a background thread, so that a round need not wait for the disk.

    The thread runs at the lowest CPU priority (Linux): a save (hashing, serialising and
    syncing the model, ~30 ms of CPU for 16 MB) then uses cores the training leaves idle
    instead of slowing the next round's clients on a small machine.

    :meth:`submit` takes a function that builds the :class:`Checkpoint` on the writer thread
    (so it must only read state that no longer changes: snapshot the rest before). A newer
    submission replaces one whose save has not started: only the latest state is worth
    writing. :meth:`close` waits for the last save. A failed save is logged, and the run
    goes on; the previous checkpoint file stays in place, whole.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.saved_round = 0  # round of the last checkpoint written
        self._pending: Callable[[], Checkpoint] | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], Checkpoint]) -> None:
        """Queue a checkpoint (built by ``make`` on the writer thread)."""
        with self._wake:
            if self._closed:
                raise RuntimeError("CheckpointWriter is closed")
            self._pending = make
            self._wake.notify()

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        _lower_thread_priority()  # durability work must not take the cores from training
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                make, self._pending = self._pending, None
                if make is None:  # closed, nothing left
                    return
            try:
                ckpt = make()
                save_checkpoint(self.run_dir, ckpt)
                self.saved_round = ckpt.round
            except Exception:  # the run goes on; the previous checkpoint is still whole
                logging.getLogger(__name__).exception(
                    "could not save the checkpoint in %s", self.run_dir
                )


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str] = RESUMABLE_KEYS
) -> list[str]:
    """``key: saved -> current`` for every key that defines the run and differs."""
    keys = sorted((set(saved) | set(current)) - ignore)
    missing = object()
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    reference: Mapping[str, Tensor] | None = None,
) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` (a run directory or the file itself).

    ``config``: the resuming run's config; keys outside :data:`RESUMABLE_KEYS` must equal
    the saved ones. ``reference``: a state dict of the model the run builds; the saved model
    must have exactly its names, shapes and dtypes. Raises :class:`CheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bit flips, foreign pickles: all unreadable
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a checkpoint (cannot be read: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    where = f"checkpoint {path}"
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise CheckpointError(f"{where} is not a precode-flower checkpoint")
    if raw.get("version") != _VERSION:
        raise CheckpointError(
            f"{where} has format version {raw.get('version')!r}, this code reads {_VERSION}"
        )
    for key, kind in (
        ("round", int),
        ("config", dict),
        ("model", dict),
        ("digest", str),
        ("strategy", dict),
        ("rng", dict),
        ("initial", dict),
    ):
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise CheckpointError(f"{where} is malformed: {key!r} missing or not a {kind.__name__}")
    model = raw["model"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items()):
        raise CheckpointError(f"{where} is malformed: the model is not a dict of tensors")
    if model_digest(model) != raw["digest"]:
        raise CheckpointError(f"{where} is corrupted: the model does not match its digest")
    if raw["round"] < 1:
        raise CheckpointError(f"{where} is malformed: round {raw['round']}")
    rows = raw.get("rows", "[]")  # absent from checkpoints of older versions
    try:
        rows = json.loads(rows) if isinstance(rows, str) else None
    except ValueError:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CheckpointError(f"{where} is malformed: 'rows' is not a JSON list of objects")
    saved_dir = raw.get("run_dir", "")
    saved_dir = saved_dir if isinstance(saved_dir, str) else ""
    if config is not None:
        saved = dict(raw["config"])
        # A run's own copy of its data (simulate.py's embedded default, <run dir>/data)
        # moves with the run directory: the same data at the directory's new place.
        here = str(path.parent.resolve() / "data")
        if saved_dir and saved.get("data-dir") == str(Path(saved_dir) / "data"):
            if config.get("data-dir") == here:
                saved["data-dir"] = here
        diff = config_differences(saved, config)
        if diff:
            raise CheckpointError(
                f"{where} belongs to another run; these settings differ (saved -> now): "
                + "; ".join(diff)
            )
        rounds = config.get("rounds")
        if isinstance(rounds, int) and raw["round"] > rounds:
            raise CheckpointError(
                f"{where} is at round {raw['round']}, beyond this run's {rounds} rounds"
            )
    if reference is not None:
        problems = _model_differences(model, reference)
        if problems:
            raise CheckpointError(
                f"{where} holds another model: "
                + "; ".join(problems[:5])
                + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            )
    bad = [k for k, t in model.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{where} holds non-finite values in {bad[:3]}")
    return Checkpoint(
        round=raw["round"],
        config=raw["config"],
        model=OrderedDict(model),
        strategy=raw["strategy"],
        rng=raw["rng"],
        initial={str(k): float(v) for k, v in raw["initial"].items()},
        rows=rows,
        run_dir=saved_dir,
    )


def _model_differences(model: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> list[str]:
    out = []
    missing = [k for k in reference if k not in model]
    extra = [k for k in model if k not in reference]
    if missing:
        out.append(f"missing {missing[:3]}")
    if extra:
        out.append(f"unexpected {extra[:3]}")
    for k, ref in reference.items():
        t = model.get(k)
        if t is None:
            continue
        if tuple(t.shape) != tuple(ref.shape):
            out.append(f"{k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        elif t.dtype != ref.dtype:
            out.append(f"{k!r} has dtype {t.dtype}, expected {ref.dtype}")
    return out
