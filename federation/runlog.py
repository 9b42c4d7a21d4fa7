"""``rounds.jsonl`` and the console's per-round line, written from the central evaluation."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from precode_flower.private import open_private, write_private
from precode_flower.strategies import Observed, Observer

log = logging.getLogger(__name__)


class RoundLog:
    """Writes ``rounds.jsonl`` and the per-round progress line, from the central evaluation.

    :meth:`on_evaluation` is called with the central evaluation once before training
    (round 0) and after each round, once client training and evaluation are done; so at
    that point the round's record in :attr:`Observed.rounds` is complete.
    """

    def __init__(
        self,
        out_dir: Path,
        observed: Observed,
        rounds: int,
        progress: bool,
        *,
        resume_after: int = 0,
        saved_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """``resume_after``: keep the rows of rounds 1..k already written, drop later ones
        (written after the last checkpoint, they are about to be redone). Rows of rounds
        1..k missing from the file (deleted, cut short) are taken from ``saved_rows`` (the
        checkpoint's copy), and the rebuild is logged."""
        self.path = out_dir / "rounds.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_after and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by the interruption
                    continue
                if isinstance(row, dict) and 1 <= row.get("round", 0) <= resume_after:
                    self.rows.append(row)
        if resume_after:
            self._rebuild(resume_after, saved_rows)
        write_private(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.observed = observed
        self.rounds = rounds
        self.initial: dict[str, float] = {}
        #: Replies rejected for NaN/Inf values over the run (from the rows kept on resume too).
        self.non_finite = sum(r.get("non_finite", 0) for r in self.rows)
        self.bar = tqdm(
            total=rounds,
            initial=resume_after,
            desc="rounds",
            unit="round",
            disable=None if progress else True,
        )
        self._last = time.perf_counter()

    def _rebuild(self, resume_after: int, saved_rows: Sequence[dict[str, Any]]) -> None:
        have = {r.get("round") for r in self.rows}
        saved = {r.get("round"): r for r in saved_rows if 1 <= r.get("round", 0) <= resume_after}
        rebuilt = sorted(k for k in saved if k not in have)
        if rebuilt:
            self.rows = sorted([*self.rows, *(saved[k] for k in rebuilt)], key=lambda r: r["round"])
            log.warning(
                "rebuilt rounds.jsonl rows of rounds %s from checkpoint.pt (%s was %s)",
                _spans(rebuilt),
                self.path,
                "missing" if not have else f"lacking {len(rebuilt)} rows",
            )
        lost = [k for k in range(1, resume_after + 1) if k not in have and k not in saved]
        if lost:
            log.warning(
                "rounds.jsonl has no rows for rounds %s and the checkpoint no copy of them",
                _spans(lost),
            )

    def on_evaluation(self, server_round: int, loss: float, accuracy: float) -> None:
        now = time.perf_counter()
        if server_round == 0:
            self.initial = {"test_loss": loss, "test_accuracy": accuracy}
            self._last = now
            return
        rec = self.observed.record(server_round)
        train = rec.train_metrics or {}
        ev = rec.evaluate_metrics or {}
        row = {
            "round": server_round,
            "clients": rec.clients,
            "partitions": rec.partitions,
            "rejected": rec.rejected,
            "non_finite": non_finite(rec.rejections),
            "failed": rec.failed,
            "dropped": rec.dropped,
            "train_loss": train.get("train-loss"),
            "train_accuracy": train.get("train-accuracy"),
            "client_eval_loss": ev.get("eval-loss"),
            "client_eval_accuracy": ev.get("eval-accuracy"),
            "test_loss": loss,
            "test_accuracy": accuracy,
            "seconds": round(now - self._last, 3),
            "skipped": rec.skipped,
            "rejections": rec.rejections,
            "failures": rec.failures,
            "dropped_nodes": rec.dropped_nodes,
            "evaluate_failures": rec.evaluate_failures,
            "evaluate_rejections": rec.evaluate_rejections,
        }
        privacy_row = getattr(self.observed.strategy, "privacy_row", None)
        if privacy_row is not None:  # dp-server / dp-client: epsilon so far
            row.update(privacy_row(server_round))
        self._last = now
        self.rows.append(row)
        with open_private(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        tl = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "n/a"
        extra = (
            f" (rejected {rec.rejected}, failed {rec.failed}, no reply {rec.dropped})"
            if rec.rejected or rec.failed or rec.dropped
            else ""
        )
        if row["non_finite"]:
            self.non_finite += row["non_finite"]
            extra += (
                f" [{row['non_finite']} client(s) sent non-finite (NaN/Inf) updates: training "
                "diverged; lower --lr (FedAvg) or --server-lr (FedSGD), or --beta]"
            )
        if rec.skipped:
            extra += f" [round skipped, model unchanged: {rec.skipped}]"
        if row.get("dp_epsilon") is not None:
            extra += f", epsilon {row['dp_epsilon']:.3g} (delta {row['dp_delta']:g})"
        leak = [s(server_round) for o in self.observed.observers if (s := _round_status(o))]
        leak_text = "".join(f" | {t}" for t in leak if t)
        tqdm.write(
            f"round {server_round}/{self.rounds}: {rec.clients} clients replied{extra}, "
            f"train loss {tl}, test accuracy {accuracy:.4f} ({row['seconds']:.1f} s){leak_text}"
        )

    def close(self) -> None:
        self.bar.close()


def non_finite(rejections: list[dict[str, Any]]) -> int:
    """How many of a round's rejections were for NaN/Inf values (``finite_values``' reasons)."""
    marks = ("contains NaN", "contains Inf", "is not finite")
    return sum(any(m in str(r.get("reason", "")) for m in marks) for r in rejections)


def _spans(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    out: list[str] = []
    for k in rounds:
        if out and int(out[-1].split("-")[-1]) == k - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{k}"
        else:
            out.append(str(k))
    return ", ".join(out)


def _round_status(observer: Observer) -> Any:
    """An observer's per-round console text hook (the auditor's leakage), if it has one."""
    return getattr(observer, "round_status", None)
