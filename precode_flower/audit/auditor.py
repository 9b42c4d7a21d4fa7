"""The auditor: queues jobs, feeds worker processes, enforces limits, books rows.

Why worker processes rather than threads: an attack is a long chain of small tensor ops that
holds the GIL between ops and would slow the server's own threads (aggregation, the Ray
driver); a stuck attack cannot be stopped from a thread, but a process can be killed at its
wall-time limit; and a crash or out-of-memory kill takes down a worker, not the server.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..attacks import ATTACKS
from ..attacks import memory as attack_memory
from ..attacks.base import spec
from .budget import GB, default_memory_budget, estimate, gb, memory_case
from .files import _json_safe, _private_open, _read_rows, _save_private, latest_rows, private_dir
from .grids import write_grid
from .jobs import AuditJob, _check_int, _client_key, _snapshot, task_seed, validate_attacks
from .report import DEFAULT_SUCCESS_SSIM, round_leakage, summarize
from .worker import _worker_main

log = logging.getLogger(__name__)


@dataclass
class _Task:
    id: int
    job_id: int
    attack: str
    submitted: float
    started: float | None = None
    memory: int | None = None  # estimated peak bytes (None: no estimate)


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
    limit: int | None = None  # its hard memory limit, as the worker reported it


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
        memory_gb: memory the attacks may use, in GB, shared by the workers (each may add
            ``memory_gb / workers`` to its idle size, ~1 GB). A run whose estimated peak
            (each attack's registered estimator, :mod:`precode_flower.attacks.memory`)
            exceeds a worker's share is not run but logged as ``skipped`` with both numbers;
            the workers run under that share as a hard limit (:mod:`.budget`), so a run that
            needs more fails with an out-of-memory error. None: :data:`.budget.
            DEFAULT_MEMORY_FRACTION` of the memory available at start.
        attack_options: extra options per attack, e.g. ``{"ig": {"lr": 0.1}}``.
        progress: show a progress bar while :meth:`close` waits.
        print_summary: print the summary when :meth:`close` writes it.
        append: continue an existing ``leakage.jsonl`` (a resumed run) instead of starting
            it afresh; a later row for the same (round, client, attack) supersedes an
            earlier one in the summary.
        references: (N, C, H, W) candidate images, normalised like the inputs and none of
            them a client's example (e.g. :func:`precode_flower.data.reference_pool`). Each
            scored reconstruction is then also tested for re-identification
            (:func:`precode_flower.metrics.identified`): rows carry ``linked`` (originals
            that some reconstruction resembles more than it resembles any candidate), which
            the verdict reports next to SSIM. None: no such test.

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
        memory_gb: float | None = None,
        attack_options: Mapping[str, Mapping[str, Any]] | None = None,
        progress: bool = True,
        print_summary: bool = True,
        append: bool = False,
        references: torch.Tensor | None = None,
    ) -> None:
        self.attacks = validate_attacks(attacks)
        if references is not None and (
            not isinstance(references, torch.Tensor) or references.dim() != 4 or not len(references)
        ):
            raise ValueError("references must be a non-empty (N, C, H, W) tensor of images")
        #: Candidates for the re-identification test (None: not run).
        self.references = None if references is None else references.detach().float().cpu()
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
        if memory_gb is not None and not (
            isinstance(memory_gb, int | float) and math.isfinite(memory_gb) and memory_gb > 0
        ):
            raise ValueError(f"memory_gb must be a positive number of GB, got {memory_gb!r}")
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
        budget = default_memory_budget() if memory_gb is None else int(memory_gb * GB)
        #: Bytes each worker may add to its idle size (None: unknown, nothing is limited).
        self.worker_memory = None if budget is None else budget // workers
        # id(factory) -> (factory, footprint, reasons attacks do not apply)
        self._footprints: dict[int, tuple[Any, Any, dict[str, str]]] = {}

        # Absolute: the paths are logged and written into the summary.
        self.out_dir = Path(out_dir).resolve()
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
        #: Why the workers could not start (None while they can); every job then fails with it.
        self.start_failure: str | None = None
        self._start_failures = 0
        self._errors_logged: set[str] = set()  # attacks whose first error was logged loudly
        self._workers = [self._start_worker() for _ in range(workers)]
        log.info("audit: %s; outputs in %s", ", ".join(self.attacks), self.out_dir)
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
        estimates = [self._estimate(payload) for _, payload in snapshots]  # and applicability
        accepted = []
        with self._lock:
            for (job, payload), (memory, why_not) in zip(snapshots, estimates, strict=True):
                meta = {
                    "round": int(job.round),
                    "client": job.client,
                    "defense": str(job.defense),
                    "kind": job.kind,
                    "batch_size": int(job.batch_size),
                    "training": _training_text(job, payload),
                    "assumed": list(job.assumed),
                }
                if job.aggregate_only:  # a SecAgg+ sum: no individual update was visible
                    meta["aggregate_only"] = True
                if payload["ground_truth"] is None:
                    meta["unscored_reason"] = job.unscored_reason or "no ground truth in the job"
                elif (
                    self.references is not None
                    and payload["truth_kind"] == "batch"
                    and tuple(self.references.shape[1:]) == payload["input_shape"]
                ):
                    payload["references"] = self.references
                if meta["defense"] not in self._defenses:
                    self._defenses.append(meta["defense"])
                if self.start_failure is not None:
                    for attack in self.attacks:
                        self._record(
                            {**meta, "attack": attack}, _failed("error", self.start_failure)
                        )
                    accepted.append(False)
                    continue
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
                runs = [
                    a
                    for a in self.attacks
                    if not self._inapplicable(meta, a, why_not.get(a))
                    and not self._over_budget(meta, a, memory[a])
                ]
                accepted.append(True)
                if not runs:
                    continue
                job_id = next(self._ids)
                now = time.time()
                self._jobs[job_id] = _Job(meta, payload, remaining=len(runs))
                state = self._rounds[meta["round"]]
                state.outstanding += len(runs)
                state.norm = (payload["mean"], payload["std"])
                state.widths[str(job.client)] = meta["batch_size"]
                if payload["ground_truth"] is not None and payload["truth_kind"] == "batch":
                    path = self.recon_dir / f"round{job.round:04d}_client{job.client}_original.pt"
                    _save_private(payload["ground_truth"][0], path)
                    state.originals[str(job.client)] = path
                for attack in runs:
                    self._queue.append(
                        _Task(next(self._ids), job_id, attack, now, None, memory[attack])
                    )
            self._changed.notify_all()
        return accepted

    def _estimate(self, payload: dict[str, Any]) -> tuple[dict[str, int | None], dict[str, str]]:
        """Each configured attack's estimated peak bytes on this job (None: no estimate), and
        why attacks do not apply to its model (their declared applicability tests).

        Measures the model's footprint with a dry pass of two examples (a factory's model is
        built once per factory); a model that cannot be measured runs under the hard limit
        only, with a warning.
        """
        model_spec = payload["model"]
        shape = payload["input_shape"]

        def measure(model: torch.nn.Module) -> tuple[Any, dict[str, str]]:
            reasons = {a: spec(a).why_not(model, shape) for a in self.attacks}
            fp = attack_memory.footprint(model, shape)
            return fp, {a: why for a, why in reasons.items() if why}

        try:
            if isinstance(model_spec, torch.nn.Module):
                fp, why_not = measure(model_spec)
            else:
                cached = self._footprints.get(id(model_spec))
                if cached is None or cached[0] is not model_spec:
                    cached = (model_spec, *measure(model_spec()))
                    self._footprints[id(model_spec)] = cached
                fp, why_not = cached[1], cached[2]
        except Exception as e:  # the attacks will fail on it too, with their own message
            log.warning("audit: cannot estimate attack memory (%s: %s)", type(e).__name__, e)
            return dict.fromkeys(self.attacks), {}
        out: dict[str, int | None] = {}
        for attack in self.attacks:
            options = dict(self._options[attack])
            if self.iterations is not None:
                options.setdefault("iterations", self.iterations)
            out[attack] = estimate(attack, memory_case(payload, fp, options))
        return out, why_not

    def _inapplicable(self, meta: dict[str, Any], attack: str, why: str | None) -> bool:
        """Whether ``attack`` declared it does not apply to the job's model; if so an
        ``error`` row with its reason is written at once, no worker involved (lock held)."""
        if why is None:
            return False
        log.warning(
            "audit: %s on round %s client %s: %s", attack, meta["round"], meta["client"], why
        )
        self._record({**meta, "attack": attack}, _failed("error", why))
        return True

    def _over_budget(self, meta: dict[str, Any], attack: str, memory: int | None) -> bool:
        """Whether a run's estimate exceeds a worker's share; if so it is logged ``skipped``
        (lock held)."""
        if memory is None or self.worker_memory is None or memory <= self.worker_memory:
            return False
        why = (
            f"estimated peak memory {gb(memory)} GB exceeds the audit's budget of "
            f"{gb(self.worker_memory)} GB per worker (--audit-memory-gb)"
        )
        log.warning(
            "audit: skipped %s on round %s client %s: %s",
            attack,
            meta["round"],
            meta["client"],
            why,
        )
        result = _failed("skipped", why)
        result.update(memory_estimate_gb=gb(memory), memory_budget_gb=gb(self.worker_memory))
        self._record({**meta, "attack": attack}, result)
        return True

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
            from ..plotting import plot_leakage

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
                start_failure=self.start_failure,
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
            "no memory budget"
            if self.worker_memory is None
            else f"memory budget {gb(self.worker_memory)} GB per worker",
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
        if result.get("status") == "error" and task.attack not in self._errors_logged:
            # The first failure of an attack is loud (with its cause), not only a row.
            self._errors_logged.add(task.attack)
            log.error(
                "audit: %s failed on round %s client %s: %s",
                task.attack,
                job.meta["round"],
                job.meta["client"],
                result.get("error"),
            )
        meta = {
            **job.meta,
            "attack": task.attack,
            "submitted_at": task.submitted,
            "queued_seconds": (task.started or time.time()) - task.submitted,
            "memory_estimate_gb": gb(task.memory),
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
                grid = write_grid(
                    self.recon_dir, self.attacks, round, rows, originals, widths, norm
                )
            except Exception:  # a plotting problem must not stop the audit
                log.exception("audit: could not write the image grid of round %d", round)
                continue
            with self._lock:
                state.grid = grid

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self.device, self._threads, self._nice, self.worker_memory),
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
                run = (
                    "run",
                    task.id,
                    task.attack,
                    module,
                    options,
                    seed,
                    self.success_ssim,
                    task.memory,
                )
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
                            worker.limit = msg[2] if len(msg) > 2 else None
                            self._changed.notify_all()
                        elif msg[0] == "result" and worker.task and msg[1] == worker.task.id:
                            task, worker.task = worker.task, None
                            self._finish(task, msg[2], msg[3])
                except (EOFError, OSError):
                    dead = True
            if dead or (worker.process.sentinel in ready and not worker.process.is_alive()):
                worker.process.join(timeout=1)
                code = worker.process.exitcode
                if not worker.ready:
                    self._worker_failed_to_start(worker, code)
                    continue
                if worker.task is not None:
                    task, worker.task = worker.task, None
                    why = f"worker process died (exit code {code}; out of memory?)"
                    if worker.limit is not None:
                        why = (
                            f"worker process died (exit code {code}) under its hard memory "
                            f"limit of {gb(self.worker_memory)} GB beyond its idle size "
                            f"(estimate {gb(task.memory)} GB): likely out of memory"
                        )
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

    def _worker_failed_to_start(self, worker: _Worker, code: int | None) -> None:
        """A worker died before it was ready: not replaced (it would die again); loud."""
        self._start_failures += 1
        if self.start_failure is None:
            self.start_failure = (
                f"worker process failed to start (exit code {code}): a spawned worker imports "
                "the main module again, so a script that creates the auditor at its top level "
                "needs an `if __name__ == '__main__':` guard; the worker's own error is on "
                "stderr above"
            )
            log.error("audit: %s", self.start_failure)
        worker.conn.close()
        self._workers.remove(worker)
        if worker.task is not None:
            task, worker.task = worker.task, None
            self._finish(task, _failed("error", self.start_failure))
        if not self._workers:  # nothing can run what is queued: fail it now, not at close
            while self._queue:
                self._finish(self._queue.popleft(), _failed("error", self.start_failure))
        self._changed.notify_all()

    def wait_workers(self, timeout: float | None = None) -> bool:
        """Block until every worker is ready (True), or one failed to start or ``timeout``
        seconds passed (False; :attr:`start_failure` says why when one failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.start_failure is None and not all(w.ready for w in self._workers):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(0.1 if left is None else min(left, 0.1))
            return self.start_failure is None

    def _replace(self, worker: _Worker, kill: bool = False) -> None:
        """Swap ``worker`` for a fresh process, killing it first if asked."""
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        index = self._workers.index(worker)
        self._workers[index] = self._start_worker()


def _training_text(job: AuditJob, payload: Mapping[str, Any]) -> str:
    """The training the attacks assume, for every row (and the summary)."""
    if job.kind == "gradients":
        return f"FedSGD: the gradient of one batch of {job.batch_size}"
    training = payload["training"]
    return training.describe(job.batch_size, job.assumed)


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
