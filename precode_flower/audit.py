"""Honest-but-curious server auditor: attack client updates off the aggregation path.

A :class:`LeakageAuditor` takes :class:`AuditJob` s (one client update each: the model the
client started from, the update exactly as the server received it, the training config the
server sent, and ground truth only where an explicit evaluation channel provides it) and runs
the configured gradient inversion attacks on them in worker processes, so that aggregation
never waits for an attack. Results are appended to ``leakage.jsonl`` as they finish; per
audited round an image grid is written; :meth:`LeakageAuditor.close` waits (with a limit) for
what is pending and writes a leakage plot and ``leakage_summary.md`` with one verdict per
defense.

Why worker processes rather than threads: an attack is a long chain of small tensor ops that
holds the GIL between ops and would slow the server's own threads (aggregation, the Ray
driver); a stuck attack cannot be stopped from a thread, but a process can be killed at its
wall-time limit; and a crash or out-of-memory kill takes down a worker, not the server. Each
worker uses one torch thread so that an audit cannot take every core from training.

Nothing here imports Flower; ``strategies.auditor`` adapts it to Flower strategies.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import math
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
import traceback
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import ATTACKS

log = logging.getLogger(__name__)

UpdateKind = Literal["gradients", "weights"]
#: Row statuses in ``leakage.jsonl``.
STATUSES: tuple[str, ...] = ("ok", "error", "timeout", "dropped")
#: Default SSIM from which a reconstruction counts as a successful attack.
DEFAULT_SUCCESS_SSIM = 0.6
#: Most images per row of a round's image grid.
GRID_COLUMNS = 16

_DIR_MODE = 0o700
_FILE_MODE = 0o600


@dataclass(frozen=True)
class AuditJob:
    """One client update to audit, with exactly what an honest-but-curious server holds.

    Attributes:
        round: federated round the update answers.
        client: the client's id (node or partition id); only used for bookkeeping.
        model: the architecture, as a module or a zero-argument picklable factory (e.g. a
            ``functools.partial`` of a module-level function). A module is copied on submission.
        update: per-parameter tensors named like ``model.named_parameters()``: the gradients
            (``kind="gradients"``, FedSGD) or the weight difference reply - global
            (``kind="weights"``, FedAvg). Extra entries (buffers) are ignored.
        kind: ``"gradients"`` or ``"weights"``.
        input_shape, mean, std: (C, H, W) of one example and the input normalisation.
        batch_size: examples behind the update (FedSGD: the batch; FedAvg: all local examples).
        local_steps, lr, local_batch_size: the local training config the server sent (FedAvg).
        global_state: the global model's state dict the update answers, loaded into ``model``
            (None when ``model`` already holds it).
        ground_truth: the client's (x, y) behind the update, only from an explicit evaluation
            channel; None in deployment (then nothing can be scored).
        defense: the configured defense, for the verdict (``"none"``, ``"precode"``, ...).
    """

    round: int
    client: int | str
    model: nn.Module | Callable[[], nn.Module]
    update: Mapping[str, Tensor | np.ndarray]
    kind: UpdateKind
    input_shape: Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int
    local_steps: int = 1
    lr: float | None = None
    local_batch_size: int | None = None
    global_state: Mapping[str, Tensor | np.ndarray] | None = None
    ground_truth: tuple[Tensor, Tensor] | None = None
    defense: str = "none"


def task_seed(seed: int, round: int, client: int | str, attack: str) -> int:
    """Deterministic seed of one (round, client, attack)."""
    return zlib.crc32(f"{seed}:{round}:{client}:{attack}".encode()) & 0x7FFFFFFF


def validate_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
    """Attack names checked against the registry; ValueError naming the valid ones."""
    names = [a.strip() for a in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    names = [a for a in names if a]
    if not names:
        raise ValueError(f"no attack given; choose from: {', '.join(sorted(ATTACKS))}")
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ValueError(
            f"unknown attack {unknown[0]!r}; choose from: {', '.join(sorted(ATTACKS))}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"attack listed twice: {names}")
    return tuple(names)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Owner-only files


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) and make it owner-only (0o700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(_DIR_MODE)
    return path


def _private_open(path: str | os.PathLike[str], mode: str = "w") -> IO[Any]:
    """Open for writing a file that is owner-only (0o600) from creation, never briefly public.

    ``mode`` is ``"w"``, ``"a"``, ``"wb"`` or ``"ab"``.
    """
    if mode not in ("w", "a", "wb", "ab"):
        raise ValueError(f"mode must be w, a, wb or ab, got {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = os.open(path, flags, _FILE_MODE)
    os.fchmod(fd, _FILE_MODE)  # an existing file would otherwise keep its old mode
    return os.fdopen(fd, mode)


def _save_private(obj: Any, path: Path) -> None:
    with _private_open(path, "wb") as f:
        torch.save(obj, f)


def _json_safe(value: Any) -> Any:
    """Tensors/arrays to lists and NaN/inf to None (strict JSON), recursively."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# --------------------------------------------------------------------------------------------
# Worker side (runs in a spawned process)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that skips cached non-leaf tensors (e.g. a bottleneck's last KL).

    Deep-copying a tensor that is part of an autograd graph is an error in torch; such
    attributes are per-forward caches, so the copy gets None instead.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = None
    return copy.deepcopy(model, memo)


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

    ``fedavg`` inverts a weight update; the gradient attacks need gradients. A FedSGD gradient
    is the weight update of one step at lr 1 (with the sign flipped); a FedAvg update of ``s``
    steps at learning rate ``lr`` is approximated by the pseudo-gradient
    ``-(new - old) / (lr * s)`` (exact for one full-batch step of plain SGD).
    """
    update: dict[str, Tensor] = payload["update"]
    kind = payload["kind"]
    if attack == "fedavg":
        if kind == "weights":
            opts = {
                "local_steps": payload["local_steps"],
                "local_lr": payload["lr"],
                "local_batch_size": payload["local_batch_size"] or payload["batch_size"],
            }
            return update, opts, False
        delta = {k: -v for k, v in update.items()}
        opts = {"local_steps": 1, "local_lr": 1.0, "local_batch_size": payload["batch_size"]}
        return delta, opts, False
    if kind == "gradients":
        return update, {}, False
    if not payload["lr"]:
        raise ValueError(f"{attack}: a weight update needs the local learning rate (lr)")
    scale = float(payload["lr"]) * max(int(payload["local_steps"]), 1)
    return {k: -v / scale for k, v in update.items()}, {}, True


def _run_attack(
    payload: dict[str, Any],
    model: nn.Module,
    attack: str,
    options: dict[str, Any],
    seed: int,
    success_ssim: float,
) -> tuple[dict[str, Any], Tensor | None]:
    """Run one attack on one update; score it where ground truth came with the job."""
    from .attacks import reconstruct
    from .metrics import score

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
    truth = payload["ground_truth"]
    if truth is not None:
        x, y = truth
        scores = score(result, x, y, payload["mean"], payload["std"], success_ssim=success_ssim)
        for key in ("attack", "batch_size", "seconds", "loss", "recovered"):  # ours stay
            scores.pop(key, None)
        row.update(scores)
        row["scored"] = True
    images = None if result.images is None else result.images.detach().cpu()
    return row, images


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


def _worker_main(conn: Connection, device: str, threads: int, nice: int) -> None:
    """Worker loop: hold one job's payload, run attacks on it, send rows back."""
    torch.set_num_threads(threads)
    _prefer_oom_kill()
    dev = torch.device(device)
    # Import what scoring needs before reporting ready, so that the first attack's wall time
    # (and its time limit) does not include seconds of imports (torchmetrics, scipy).
    from . import metrics

    metrics.preload()

    if nice and hasattr(os, "nice"):
        # Training first: attacks take the CPU time that training leaves. Only now, so that a
        # busy machine does not starve the worker's start-up.
        os.nice(nice)
    conn.send(("ready", os.getpid()))
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
        _, task_id, attack, module, options, seed, success_ssim = msg
        images = None
        try:
            if attack not in ATTACKS and module:  # registered outside the package: import it
                importlib.import_module(module)
            if payload is None:
                raise RuntimeError("no job payload received")
            if model is None:
                model = _build_model(payload, dev)
            row, images = _run_attack(payload, model, attack, options, seed, success_ssim)
        except Exception as e:  # a failing attack is a result, not a worker crash
            row = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=-6),
            }
        try:
            conn.send(("result", task_id, row, images))
        except Exception as e:  # e.g. an unpicklable info value
            conn.send(("result", task_id, {"status": "error", "error": f"unsendable: {e}"}, None))


# --------------------------------------------------------------------------------------------
# Server side


@dataclass
class _Task:
    id: int
    job_id: int
    attack: str
    submitted: float
    started: float | None = None


@dataclass
class _Job:
    meta: dict[str, Any]  # round, client, defense, kind, batch_size: copied into every row
    payload: dict[str, Any]  # what a worker needs; picklable
    remaining: int


@dataclass
class _Worker:
    process: Any  # a spawn-context multiprocessing.Process
    conn: Connection
    ready: bool = False
    task: _Task | None = None
    job_id: int | None = None  # the job whose payload the worker holds


@dataclass
class _Round:
    outstanding: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    originals: dict[str, Path] = field(default_factory=dict)  # client -> saved ground truth
    widths: dict[str, int] = field(default_factory=dict)  # client -> batch size
    norm: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))
    grid: Path | None = None


class LeakageAuditor:
    """Runs gradient inversion attacks on client updates in worker processes.

    Args:
        out_dir: where ``leakage.jsonl``, ``leakage.png`` and ``leakage_summary.md`` go;
            reconstructions (grids, tensors) go to ``out_dir/reconstructions`` (owner-only).
        attacks: names from :data:`precode_flower.attacks.ATTACKS` (or a comma-separated string).
        every: audit rounds 1, 1 + every, 1 + 2 * every, ...
        clients_per_round: clients audited per audited round, sampled with ``seed`` (None: all).
        iterations: budget of every iterative attack (None: the attack's default).
        time_limit: wall-time limit of one attack run in seconds; the worker running it is
            killed and the run logged as ``timeout`` (None: no limit).
        device: where attacks run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        success_ssim: SSIM from which a reconstruction counts as a successful attack.
        max_pending: most jobs held (queued or running); a job submitted beyond it is dropped,
            logged, counted in :attr:`dropped` and written as ``dropped`` rows.
        workers, threads: worker processes, and torch threads in each.
        nice: niceness added to the workers (0-19; Unix). The default, the lowest priority,
            leaves contended CPUs to training: the audit then slows rounds little and lags
            behind them instead (measured: "Auditor overhead" in docs/BENCHMARKS.md).
        seed: seeds client sampling and every attack.
        attack_options: extra options per attack, e.g. ``{"ig": {"lr": 0.1}}``.
        progress: show a progress bar while :meth:`close` waits.
        print_summary: print the summary when :meth:`close` writes it.
        append: continue an existing ``leakage.jsonl`` (a resumed run) instead of starting
            it afresh; a later row for the same (round, client, attack) supersedes an
            earlier one in the summary.

    Raises:
        ValueError: on an unknown attack or a senseless budget, before any process starts.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        attacks: Sequence[str] | str,
        *,
        every: int = 1,
        clients_per_round: int | None = None,
        iterations: int | None = None,
        time_limit: float | None = None,
        device: str = "cpu",
        success_ssim: float = DEFAULT_SUCCESS_SSIM,
        max_pending: int = 16,
        workers: int = 1,
        threads: int = 1,
        nice: int = 19,
        seed: int = 0,
        attack_options: Mapping[str, Mapping[str, Any]] | None = None,
        progress: bool = True,
        print_summary: bool = True,
        append: bool = False,
    ) -> None:
        self.attacks = validate_attacks(attacks)
        _check_int("every", every, 1)
        if clients_per_round is not None:
            _check_int("clients_per_round", clients_per_round, 1)
        if iterations is not None:
            _check_int("iterations", iterations, 1)
        if time_limit is not None and not (
            isinstance(time_limit, int | float) and math.isfinite(time_limit) and time_limit > 0
        ):
            raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
        if not 0 < success_ssim <= 1:
            raise ValueError(f"success_ssim must be in (0, 1], got {success_ssim!r}")
        _check_int("max_pending", max_pending, 1)
        _check_int("workers", workers, 1)
        _check_int("threads", threads, 1)
        _check_int("nice", nice, 0)
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {device!r}: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        unknown = sorted(set(attack_options or {}) - set(self.attacks))
        if unknown:
            raise ValueError(f"attack_options given for attacks not configured: {unknown}")

        self.every = every
        self.clients_per_round = clients_per_round
        self.iterations = iterations
        self.time_limit = None if time_limit is None else float(time_limit)
        self.device = str(dev)
        self.success_ssim = float(success_ssim)
        self.max_pending = max_pending
        self.seed = seed
        self.progress = progress
        self.print_summary = print_summary
        self._options = {a: dict((attack_options or {}).get(a, {})) for a in self.attacks}

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.recon_dir = private_dir(self.out_dir / "reconstructions")
        self.jsonl_path = self.out_dir / "leakage.jsonl"
        self.summary_path = self.out_dir / "leakage_summary.md"
        self.plot_path = self.out_dir / "leakage.png"
        previous = _read_rows(self.jsonl_path) if append else []
        # Owner-only: recovered labels are private data too.
        _private_open(self.jsonl_path, "a" if append else "w").close()

        #: Jobs dropped at submission (queue full, or submitted after close).
        self.dropped = 0
        #: Attack runs abandoned by :meth:`close` (queued or running at its time limit).
        self.abandoned = 0
        self._rows: list[dict[str, Any]] = previous
        self._rounds: dict[int, _Round] = defaultdict(_Round)
        for row in previous:
            self._rounds[row["round"]].rows.append(row)
        self._defenses: list[str] = list(dict.fromkeys(str(r["defense"]) for r in previous))
        self._jobs: dict[int, _Job] = {}
        self._queue: deque[_Task] = deque()
        self._grids_due: list[int] = []
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._closing = False  # no new jobs
        self._stopped = False  # workers going away; dispatcher exits
        self._summary: str | None = None
        self._ctx = mp.get_context("spawn")
        self._threads = threads
        self._nice = min(nice, 19)
        self._workers = [self._start_worker() for _ in range(workers)]
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="leakage-auditor", daemon=True
        )
        self._dispatcher.start()
        # Grids are drawn on their own thread: drawing takes a second, dispatching must not wait.
        self._drawer = threading.Thread(target=self._draw_loop, name="leakage-grids", daemon=True)
        self._drawer.start()

    def __enter__(self) -> LeakageAuditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what to audit ------------------------------------------------------------------

    def should_audit(self, round: int) -> bool:
        """Whether ``round`` is audited (rounds 1, 1 + every, 1 + 2 * every, ...)."""
        return (round - 1) % self.every == 0

    def sample_clients(self, round: int, clients: Iterable[Any]) -> list[Any]:
        """The clients of ``round`` to audit: ``clients_per_round`` of them, seeded."""
        pool = sorted(set(clients), key=_client_key)
        if self.clients_per_round is None or self.clients_per_round >= len(pool):
            return pool
        rng = random.Random(task_seed(self.seed, round, "*", "sample"))
        return sorted(rng.sample(pool, self.clients_per_round), key=_client_key)

    # ---- submission ---------------------------------------------------------------------

    def submit(self, job: AuditJob) -> bool:
        """Queue ``job`` for every configured attack without blocking; False if dropped."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Sequence[AuditJob]) -> list[bool]:
        """Queue several jobs at once (a round's, so its grid waits for all of them).

        Never blocks on attacks: inputs are copied, queued, and the call returns. A job that
        does not fit in ``max_pending`` is dropped (logged, counted, ``dropped`` rows).
        """
        snapshots = [(job, _snapshot(job)) for job in jobs]  # copies outside the lock
        accepted = []
        with self._lock:
            for job, payload in snapshots:
                meta = {
                    "round": int(job.round),
                    "client": job.client,
                    "defense": str(job.defense),
                    "kind": job.kind,
                    "batch_size": int(job.batch_size),
                }
                if meta["defense"] not in self._defenses:
                    self._defenses.append(meta["defense"])
                if self._closing or len(self._jobs) >= self.max_pending:
                    self.dropped += 1
                    why = "auditor closed" if self._closing else f"queue full ({self.max_pending})"
                    log.warning(
                        "audit: dropped round %s client %s: %s (%d jobs dropped so far)",
                        job.round,
                        job.client,
                        why,
                        self.dropped,
                    )
                    for attack in self.attacks:
                        self._record({**meta, "attack": attack}, _failed("dropped", why))
                    accepted.append(False)
                    continue
                job_id = next(self._ids)
                now = time.time()
                self._jobs[job_id] = _Job(meta, payload, remaining=len(self.attacks))
                state = self._rounds[meta["round"]]
                state.outstanding += len(self.attacks)
                state.norm = (payload["mean"], payload["std"])
                state.widths[str(job.client)] = meta["batch_size"]
                if payload["ground_truth"] is not None:
                    path = self.recon_dir / f"round{job.round:04d}_client{job.client}_original.pt"
                    _save_private(payload["ground_truth"][0], path)
                    state.originals[str(job.client)] = path
                for attack in self.attacks:
                    self._queue.append(_Task(next(self._ids), job_id, attack, now))
                accepted.append(True)
            self._changed.notify_all()
        return accepted

    def report_error(
        self, round: int, client: int | str, error: str, *, defense: str = "none", **meta: Any
    ) -> None:
        """Log a job that could not even be built (e.g. an undecodable reply) as error rows."""
        log.warning("audit: round %s client %s not audited: %s", round, client, error)
        base = {"round": int(round), "client": client, "defense": str(defense), **meta}
        with self._lock:
            if base["defense"] not in self._defenses:
                self._defenses.append(base["defense"])
            for attack in self.attacks:
                self._record({**base, "attack": attack}, _failed("error", error))

    # ---- results ------------------------------------------------------------------------

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row written so far (copies), in the order they finished."""
        with self._lock:
            return [dict(r) for r in self._rows]

    @property
    def pending(self) -> int:
        """Attack runs queued or running."""
        with self._lock:
            return len(self._queue) + sum(w.task is not None for w in self._workers)

    def round_done(self, round: int) -> bool:
        """Whether every attack run submitted for ``round`` has a row."""
        with self._lock:
            return round in self._rounds and self._rounds[round].outstanding == 0

    def round_line(self, round: int) -> str | None:
        """Console text for ``round`` (``"leak: analytic 2/2 ssim 1.00"``) once it is complete."""
        with self._lock:
            state = self._rounds.get(round)
            if state is None or state.outstanding:
                return None
            rows = list(state.rows)
        return "leak: " + round_leakage(rows, self.attacks)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (True) or ``timeout`` seconds have passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        with self._changed:
            total = self.pending
            if self.progress and total:
                bar = tqdm(total=total, desc="audit: pending attacks", unit="attack", leave=False)
            try:
                while self.pending:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._changed.wait(0.25 if left is None else min(left, 0.25))
                    if bar is not None:
                        bar.update(max(0, total - self.pending - bar.n))
            finally:
                if bar is not None:
                    bar.close()
        return True

    def close(self, timeout: float | None = None) -> str:
        """Wait up to ``timeout`` s for pending attacks, stop the workers, write the summary.

        Runs still queued or running at the limit are abandoned (logged, ``dropped`` rows).
        Writes ``leakage.png`` and ``leakage_summary.md``, prints the summary and returns it.
        Calling it again returns the same summary.
        """
        with self._lock:
            if self._summary is not None:
                return self._summary
            self._closing = True
        finished = self.wait(timeout)
        with self._lock:
            if not finished:
                why = f"abandoned at close() after waiting {timeout:g} s"
                while self._queue:
                    self.abandoned += 1
                    self._finish(self._queue.popleft(), _failed("dropped", why))
                for worker in self._workers:
                    if worker.task is not None:
                        task, worker.task = worker.task, None
                        self.abandoned += 1
                        result = _failed("dropped", why + " (was running)")
                        result["seconds"] = time.time() - (task.started or time.time())
                        self._finish(task, result)
                log.warning("audit: %s: %d attack runs", why, self.abandoned)
            self._stopped = True
            workers, self._workers = self._workers, []
        self._dispatcher.join(timeout=5)
        _stop_workers(workers, graceful=finished)
        self._drawer.join(timeout=60)
        self._write_due_grids()
        try:
            from .plotting import plot_leakage

            plot_leakage(self.rows, self.attacks, self.plot_path, success_ssim=self.success_ssim)
        except Exception:  # a missing plot must not hide the summary
            log.exception("audit: could not write %s", self.plot_path)
        with self._lock:
            rounds = {r: s.grid for r, s in self._rounds.items() if s.grid is not None}
            text = summarize(
                latest_rows(self.rows),
                self.attacks,
                defenses=self._defenses,
                success_ssim=self.success_ssim,
                recon_dir=self.recon_dir,
                grids=len(rounds),
                jsonl=self.jsonl_path,
                plot=self.plot_path if self.plot_path.exists() else None,
                dropped_jobs=self.dropped,
                abandoned=self.abandoned,
                budget=self._budget_text(),
            )
            self._summary = text
        self.summary_path.write_text(text)
        log.info("audit: summary written to %s", self.summary_path)
        if self.print_summary:
            print(text, flush=True)
        return text

    def _budget_text(self) -> str:
        parts = [
            f"every {self.every} round(s)",
            "all clients"
            if self.clients_per_round is None
            else f"{self.clients_per_round} client(s) per round (seeded sample)",
            "default iterations" if self.iterations is None else f"{self.iterations} iterations",
            "no time limit" if self.time_limit is None else f"{self.time_limit:g} s per attack",
            f"device {self.device}",
        ]
        return ", ".join(parts)

    # ---- bookkeeping (lock held) --------------------------------------------------------

    def _record(self, meta: dict[str, Any], result: dict[str, Any], images: Any = None) -> None:
        """Write one row: a jsonl line, the reconstruction tensor, round bookkeeping."""
        row = {**meta, **result}
        row.setdefault("scored", False)
        row["finished_at"] = time.time()
        if images is not None and row["status"] == "ok":
            name = f"round{row['round']:04d}_client{row['client']}_{row['attack']}.pt"
            path = self.recon_dir / name
            _save_private(images, path)
            row["reconstruction"] = str(path)
        row = _json_safe(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rows.append(row)
        self._rounds[row["round"]].rows.append(row)

    def _finish(self, task: _Task, result: dict[str, Any], images: Tensor | None = None) -> None:
        """Book the result of one task."""
        job = self._jobs[task.job_id]
        meta = {
            **job.meta,
            "attack": task.attack,
            "submitted_at": task.submitted,
            "queued_seconds": (task.started or time.time()) - task.submitted,
        }
        self._record(meta, result, images)
        job.remaining -= 1
        if job.remaining == 0:
            del self._jobs[task.job_id]
        round = job.meta["round"]
        state = self._rounds[round]
        state.outstanding -= 1
        if state.outstanding == 0:
            log.info("audit round %d: leak: %s", round, round_leakage(state.rows, self.attacks))
            self._grids_due.append(round)
        self._changed.notify_all()

    # ---- image grids --------------------------------------------------------------------

    def _draw_loop(self) -> None:
        while True:
            with self._changed:
                while not self._grids_due and not self._stopped:
                    self._changed.wait(0.5)
                if self._stopped:
                    return  # close() draws what is left
            self._write_due_grids()

    def _write_due_grids(self) -> None:
        """Write the grids of completed rounds (without the lock held: drawing is slow)."""
        while True:
            with self._lock:
                if not self._grids_due:
                    return
                round = self._grids_due.pop(0)
                state = self._rounds[round]
                rows, originals = list(state.rows), dict(state.originals)
                widths, norm = dict(state.widths), state.norm
            try:
                grid = self._write_grid(round, rows, originals, widths, norm)
            except Exception:  # a plotting problem must not stop the audit
                log.exception("audit: could not write the image grid of round %d", round)
                continue
            with self._lock:
                state.grid = grid

    def _write_grid(
        self,
        round: int,
        rows: list[dict[str, Any]],
        originals: dict[str, Path],
        widths: dict[str, int],
        norm: tuple[tuple[float, ...], tuple[float, ...]],
    ) -> Path | None:
        from .plotting import image_grid

        ok = [r for r in rows if r["status"] == "ok" and r.get("reconstruction")]
        loaded = {id(r): torch.load(r["reconstruction"], weights_only=True) for r in ok}
        images = [x for x in loaded.values() if x.dim() == 4 and len(x)]
        images += [torch.load(p, weights_only=True) for p in originals.values()]
        if not images:
            return None
        shape = tuple(images[0].shape[1:])
        blank = torch.zeros(shape)
        clients = sorted(widths, key=_client_key)

        def fit(x: Tensor | None, width: int) -> Tensor:
            """Exactly ``width`` images of ``shape``; blanks (the mean image) where missing."""
            if x is None or x.dim() != 4 or tuple(x.shape[1:]) != shape:
                x = blank.expand(0, *shape)
            x = x[:width]
            return torch.cat([x, blank.expand(width - len(x), *shape)])

        grid: dict[str, Tensor] = {}
        if originals:
            grid["original"] = torch.cat(
                [
                    fit(
                        torch.load(originals[c], weights_only=True) if c in originals else None,
                        widths[c],
                    )
                    for c in clients
                ]
            )[:GRID_COLUMNS]
        for attack in self.attacks:
            parts = []
            for c in clients:
                hit = next((r for r in ok if r["attack"] == attack and str(r["client"]) == c), None)
                x = loaded[id(hit)] if hit is not None else None
                order = hit.get("match") if hit is not None else None
                if x is not None and order and len(order) == len(x):  # aligned to the originals
                    x = x[torch.as_tensor(order, dtype=torch.long)]
                parts.append(fit(x, widths[c]))
            grid[attack] = torch.cat(parts)[:GRID_COLUMNS]
        path = self.recon_dir / f"round{round:04d}.png"
        title = f"round {round}: client(s) {', '.join(clients)}"
        image_grid(grid, norm[0], norm[1], path, title=title)
        path.chmod(_FILE_MODE)  # whatever image_grid did: reconstructions stay owner-only
        return path

    # ---- workers ------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self.device, self._threads, self._nice),
            name="leakage-auditor-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _dispatch_loop(self) -> None:
        """Feed idle workers, collect results, enforce time limits; never raises."""
        while True:
            try:
                self._assign()
            except Exception:
                log.exception("audit: dispatcher error while assigning")
            with self._lock:
                if self._stopped:
                    return
                waitables = [w.conn for w in self._workers]
                waitables += [w.process.sentinel for w in self._workers]
            ready = wait(waitables, timeout=0.1) if waitables else time.sleep(0.1) or []
            with self._lock:
                if self._stopped:
                    return
                try:
                    self._collect(ready)
                    self._enforce_time_limit()
                except Exception:
                    log.exception("audit: dispatcher error while collecting")

    def _assign(self) -> None:
        """Send queued tasks to idle, ready workers.

        The sends (a job's payload can be tens of MB) happen outside the lock, so that
        :meth:`submit` never waits for them.
        """
        while True:
            with self._lock:
                if self._stopped or not self._queue:
                    return
                worker = next((w for w in self._workers if w.ready and w.task is None), None)
                if worker is None:
                    return
                task = self._queue.popleft()
                worker.task = task  # reserved; its time limit starts once it is sent
                job = self._jobs[task.job_id]
                send_job = worker.job_id != task.job_id
                options = dict(self._options[task.attack])
                if self.iterations is not None:
                    options.setdefault("iterations", self.iterations)
                module = getattr(ATTACKS[task.attack], "__module__", None)
                seed = task_seed(self.seed, job.meta["round"], job.meta["client"], task.attack)
                run = ("run", task.id, task.attack, module, options, seed, self.success_ssim)
            try:
                if send_job:
                    worker.job_id = None
                    worker.conn.send(("job", task.job_id, job.payload))
                    worker.job_id = task.job_id
                worker.conn.send(run)
            except Exception as e:  # e.g. an unpicklable model factory: fail this task only
                with self._lock:
                    if worker.task is task:  # else close() abandoned it meanwhile
                        worker.task = None
                        self._finish(task, _failed("error", f"cannot send to a worker: {e}"))
                    if not self._stopped and not worker.process.is_alive():
                        self._replace(worker)
                continue
            with self._lock:
                task.started = time.time()

    def _collect(self, ready: list[Any]) -> None:
        """Book results, and replace workers that died (crash, out-of-memory kill)."""
        for worker in list(self._workers):
            dead = False
            if worker.conn in ready:
                try:
                    while worker.conn.poll():
                        msg = worker.conn.recv()
                        if msg[0] == "ready":
                            worker.ready = True
                        elif msg[0] == "result" and worker.task and msg[1] == worker.task.id:
                            task, worker.task = worker.task, None
                            self._finish(task, msg[2], msg[3])
                except (EOFError, OSError):
                    dead = True
            if dead or (worker.process.sentinel in ready and not worker.process.is_alive()):
                worker.process.join(timeout=1)
                code = worker.process.exitcode
                if worker.task is not None:
                    task, worker.task = worker.task, None
                    why = f"worker process died (exit code {code}; out of memory?)"
                    log.warning("audit: %s while running %s", why, task.attack)
                    self._finish(task, _failed("error", why))
                self._replace(worker)

    def _enforce_time_limit(self) -> None:
        if self.time_limit is None:
            return
        now = time.time()
        for worker in list(self._workers):
            task = worker.task
            if task is None or task.started is None or now - task.started <= self.time_limit:
                continue
            worker.task = None
            meta = self._jobs[task.job_id].meta
            why = f"killed at the {self.time_limit:g} s time limit"
            log.warning(
                "audit: %s on round %s client %s %s",
                task.attack,
                meta["round"],
                meta["client"],
                why,
            )
            result = _failed("timeout", why)
            result["seconds"] = now - task.started
            self._finish(task, result)
            self._replace(worker, kill=True)

    def _replace(self, worker: _Worker, kill: bool = False) -> None:
        """Swap ``worker`` for a fresh process, killing it first if asked."""
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        index = self._workers.index(worker)
        self._workers[index] = self._start_worker()


def _failed(status: str, error: str) -> dict[str, Any]:
    return {"status": status, "error": error, "seconds": None, "scored": False}


def _stop_workers(workers: list[_Worker], graceful: bool) -> None:
    for worker in workers:
        if graceful:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + (5 if graceful else 0)
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()


def _snapshot(job: AuditJob) -> dict[str, Any]:
    """Copy everything the job references: the caller may reuse its buffers right away."""
    if job.kind not in ("gradients", "weights"):
        raise ValueError(f"kind must be 'gradients' or 'weights', got {job.kind!r}")
    _check_int("batch_size", job.batch_size, 1)
    _check_int("local_steps", job.local_steps, 1)
    model = job.model
    if isinstance(model, nn.Module):
        model = copy_model(model).cpu()
    elif not callable(model):
        raise TypeError("model must be an nn.Module or a zero-argument factory")

    def tensors(m: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            k: v.detach().cpu().clone() if isinstance(v, Tensor) else torch.tensor(np.asarray(v))
            for k, v in m.items()
        }

    truth = None
    if job.ground_truth is not None:
        x, y = job.ground_truth
        truth = (x.detach().cpu().clone().float(), torch.as_tensor(y).cpu().clone().long())
    return {
        "model": model,
        "global_state": None if job.global_state is None else tensors(job.global_state),
        "update": tensors(job.update),
        "kind": job.kind,
        "input_shape": tuple(int(d) for d in job.input_shape),
        "mean": tuple(float(v) for v in job.mean),
        "std": tuple(float(v) for v in job.std),
        "batch_size": int(job.batch_size),
        "local_steps": int(job.local_steps),
        "lr": None if job.lr is None else float(job.lr),
        "local_batch_size": job.local_batch_size,
        "ground_truth": truth,
    }


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an existing ``leakage.jsonl`` (none if it is missing; torn lines skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and {"round", "client", "attack"} <= row.keys():
            row.setdefault("defense", "none")
            rows.append(row)
    return rows


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The last row per (round, client, attack), in first-seen order (resumed runs)."""
    latest: dict[tuple[Any, str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["round"], str(r["client"]), str(r["attack"]))] = dict(r)
    return list(latest.values())


def _client_key(client: Any) -> tuple[int, Any]:
    """Sort clients numerically where they are numbers."""
    try:
        return (0, int(client))
    except (TypeError, ValueError):
        return (1, str(client))


# --------------------------------------------------------------------------------------------
# Reporting (pure functions of the rows)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def image_successes(row: Mapping[str, Any], success_ssim: float) -> tuple[int, int]:
    """(images this scored row reconstructed successfully, images behind the update)."""
    total = int(row.get("batch_size") or 1)
    if row.get("attack") == "labels":  # no images: the leak is the labels themselves
        acc = row.get("label_accuracy")
        return (round(acc * total) if acc is not None else 0), total
    per_image = row.get("per_image")
    ssims = per_image.get("ssim") if isinstance(per_image, Mapping) else None
    if isinstance(ssims, list) and ssims and all(v is not None for v in ssims):
        return sum(v >= success_ssim for v in ssims), len(ssims)
    return (total if row.get("success") else 0), total


def round_leakage(rows: Sequence[Mapping[str, Any]], attacks: Sequence[str]) -> str:
    """Compact per-attack leakage of one round: ``"analytic 2/2 ssim 1.00, ig 0/2 ssim 0.12"``.

    Scored rows give successes/scored updates and the mean SSIM; unscored rows give the
    number of reconstructions (and the attack's own exact-recovery claims); failures are
    counted by status.
    """
    parts = []
    for attack in attacks:
        mine = [r for r in rows if r.get("attack") == attack]
        ok = [r for r in mine if r.get("status") == "ok"]
        scored = [r for r in ok if r.get("scored")]
        if scored:
            hits = sum(bool(r.get("success")) for r in scored)
            text = f"{attack} {hits}/{len(scored)}"
            ssim = _mean(r.get("ssim") for r in scored)
            if ssim is not None:
                text += f" ssim {ssim:.2f}"
            elif attack == "labels":
                text += f" label-acc {_fmt(_mean(r.get('label_accuracy') for r in scored))}"
        elif ok:
            text = f"{attack} {len(ok)} unscored"
            claims = [r["recovered"] for r in ok if r.get("recovered") is not None]
            if claims:
                text += f" (claims {sum(claims)}/{sum(r['batch_size'] for r in ok)} exact)"
        else:
            text = f"{attack} -"
        fails = {s: sum(r.get("status") == s for r in mine) for s in STATUSES[1:]}
        fails_text = ", ".join(f"{n} {s}" for s, n in fails.items() if n)
        parts.append(text + (f" [{fails_text}]" if fails_text else ""))
    return ", ".join(parts)


def verdicts(
    rows: Sequence[Mapping[str, Any]],
    attacks: Sequence[str],
    defenses: Sequence[str] | None = None,
    success_ssim: float = DEFAULT_SUCCESS_SSIM,
    recon_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """One verdict line per configured defense, naming the attacks that succeeded.

    The wording never claims safety: a verdict is evidence from the attacks tried.
    """
    defenses = list(defenses or dict.fromkeys(str(r.get("defense", "none")) for r in rows))
    lines = []
    for defense in defenses:
        mine = [r for r in rows if str(r.get("defense", "none")) == defense]
        where = "with no defense" if defense in ("none", "") else f"despite defense {defense}"
        under = "with no defense" if defense in ("none", "") else f"under defense {defense}"
        ok = [r for r in mine if r.get("status") == "ok"]
        scored = [r for r in ok if r.get("scored")]
        failed = len(mine) - len(ok)
        fail_note = f" ({failed} attack runs failed, timed out or were dropped)" if failed else ""
        if not mine:
            lines.append(f"NOTHING AUDITED {under}.")
        elif not ok:
            lines.append(f"NO EVIDENCE {under}: every attack run failed{fail_note}.")
        elif scored:
            leaks, best = [], None
            for attack in attacks:
                a_rows = [r for r in scored if r.get("attack") == attack]
                if not a_rows:
                    continue
                hits = [image_successes(r, success_ssim) for r in a_rows]
                k, n = sum(h for h, _ in hits), sum(t for _, t in hits)
                ssim = _mean(r.get("ssim") for r in a_rows)
                if attack != "labels" and ssim is not None and (best is None or ssim > best[1]):
                    best = (attack, ssim)
                if k and attack == "labels":
                    acc = _mean(r.get("label_accuracy") for r in a_rows)
                    leaks.append(
                        f"labels recovered the labels of {k}/{n} audited images "
                        f"(label accuracy {_fmt(acc)})"
                    )
                elif k:
                    leaks.append(
                        f"{attack} reconstructed {k}/{n} audited images (SSIM {_fmt(ssim)})"
                    )
            if leaks:
                lines.append(f"LEAK: {'; '.join(leaks)} {where}{fail_note}.")
            else:
                tried = ", ".join(a for a in attacks if any(r.get("attack") == a for r in scored))
                best_text = f"; best mean SSIM {best[1]:.2f} by {best[0]}" if best else ""
                lines.append(
                    f"NO LEAK FOUND {under}: no reconstruction by {tried} reached SSIM "
                    f"{success_ssim:.2f}{best_text}{fail_note}. This is evidence from these "
                    "attacks at this budget, not a guarantee: a stronger attack, a larger "
                    "budget or other rounds may still recover the data."
                )
        else:
            evidence = []
            for attack in attacks:
                a_rows = [r for r in ok if r.get("attack") == attack]
                if not a_rows:
                    continue
                text = f"{attack}: {len(a_rows)} reconstruction(s)"
                claims = [r["recovered"] for r in a_rows if r.get("recovered") is not None]
                if claims:
                    total = sum(int(r.get("batch_size") or 1) for r in a_rows)
                    text += f", claims exact recovery of {sum(claims)}/{total} images"
                losses = [r.get("loss") for r in a_rows if r.get("loss") is not None]
                if losses:
                    text += f", median final attack loss {statistics.median(losses):.3g}"
                if any(r.get("labels") is not None for r in a_rows):
                    text += ", labels recovered"
                evidence.append(text)
            place = f" in {recon_dir}" if recon_dir else ""
            lines.append(
                f"SCORES UNAVAILABLE {under}: no ground truth (deployment), so leakage cannot "
                f"be measured. Evidence: {'; '.join(evidence)}{fail_note}. Inspect the "
                f"reconstructions{place}."
            )
    return lines


def summarize(
    rows: Sequence[Mapping[str, Any]],
    attacks: Sequence[str],
    *,
    defenses: Sequence[str] | None = None,
    success_ssim: float = DEFAULT_SUCCESS_SSIM,
    recon_dir: str | os.PathLike[str] | None = None,
    grids: int = 0,
    jsonl: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    dropped_jobs: int = 0,
    abandoned: int = 0,
    budget: str = "",
) -> str:
    """The Markdown summary: verdicts, a per-attack table, outputs and failures."""
    rounds = sorted({r["round"] for r in rows})
    updates = {(r["round"], str(r["client"])) for r in rows}
    scored_any = any(r.get("scored") for r in rows)
    out = ["# Leakage audit", ""]
    out.append(
        f"Honest-but-curious server audit: {', '.join(attacks)} on {len(updates)} client "
        f"update(s) from {len(rounds)} round(s)" + (f" ({budget})." if budget else ".")
    )
    if scored_any:
        out.append(
            f"Scored against the clients' true data from the explicit evaluation channel; "
            f"success = SSIM >= {success_ssim:.2f}."
        )
    else:
        out.append(
            "No ground truth (deployment, or the evaluation channel was off): "
            "scores are unavailable; the reference-free evidence is shown."
        )
    out += ["", "## Verdict", ""]
    out += [f"- {line}" for line in verdicts(rows, attacks, defenses, success_ssim, recon_dir)]
    out += [
        "",
        "A verdict is evidence from the attacks tried, at their budget, on the audited "
        "rounds and clients. It is never a proof of privacy.",
        "",
        "## Per attack",
        "",
        "| defense | attack | runs | ok | error | timeout | dropped | images recovered "
        "| mean PSNR (dB) "
        "| mean SSIM | label acc. | mean s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_defenses = list(defenses or dict.fromkeys(str(r.get("defense", "none")) for r in rows))
    for defense in all_defenses:
        for attack in attacks:
            mine = [
                r
                for r in rows
                if r.get("attack") == attack and str(r.get("defense", "none")) == defense
            ]
            if not mine:
                continue
            count = {s: sum(r.get("status") == s for r in mine) for s in STATUSES}
            scored = [r for r in mine if r.get("status") == "ok" and r.get("scored")]
            hits = [image_successes(r, success_ssim) for r in scored]
            rate = f"{sum(h for h, _ in hits)}/{sum(n for _, n in hits)}" if scored else "n/a"
            images = attack != "labels"  # the label attack reconstructs no image
            psnr = _mean(r.get("psnr") for r in scored) if images else None
            ssim = _mean(r.get("ssim") for r in scored) if images else None
            acc = _mean(r.get("label_accuracy") for r in scored)
            secs = _mean(r.get("seconds") for r in mine if r.get("status") == "ok")
            out.append(
                f"| {defense} | {attack} | {len(mine)} | {count['ok']} | {count['error']} | "
                f"{count['timeout']} | {count['dropped']} | {rate} | {_fmt(psnr, '.1f')} | "
                f"{_fmt(ssim)} | {_fmt(acc)} | {_fmt(secs, '.1f')} |"
            )
    out += ["", "## Outputs", ""]
    if jsonl:
        out.append(f"- per (round, client, attack) results: `{jsonl}`")
    if plot:
        out.append(f"- leakage over rounds: `{plot}`")
    if recon_dir:
        n_tensors = sum(bool(r.get("reconstruction")) for r in rows)
        out.append(
            f"- reconstructions, owner-only (directory 0700, files 0600): `{recon_dir}` "
            f"({grids} round grid(s), {n_tensors} tensor file(s)). They may show the clients' "
            "private data: share them as you would the data itself."
        )
    if dropped_jobs or abandoned:
        out.append(
            f"- lost work: {dropped_jobs} job(s) dropped at submission (queue full or closed), "
            f"{abandoned} attack run(s) abandoned at close"
        )
    failures = [r for r in rows if r.get("status") in ("error", "timeout")]
    if failures:
        out += ["", "## Failures", ""]
        for r in failures[:10]:
            out.append(
                f"- round {r['round']} client {r['client']} {r['attack']}: {r['status']}: "
                f"{r.get('error')}"
            )
        if len(failures) > 10:
            out.append(f"- ... and {len(failures) - 10} more in `{jsonl or 'leakage.jsonl'}`")
    return "\n".join(out) + "\n"
