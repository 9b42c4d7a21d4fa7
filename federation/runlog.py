"""``rounds.jsonl`` and the console's per-round line, written from the central evaluation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from precode_flower.strategies import Observed, Observer


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
    ) -> None:
        """``resume_after``: keep the rows of rounds 1..k already written, drop later ones
        (written after the last checkpoint, they are about to be redone)."""
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
        self.observed = observed
        self.rounds = rounds
        self.initial: dict[str, float] = {}
        self.bar = tqdm(
            total=rounds,
            initial=resume_after,
            desc="rounds",
            unit="round",
            disable=None if progress else True,
        )
        self._last = time.perf_counter()

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
        }
        self._last = now
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        tl = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "n/a"
        extra = (
            f" (rejected {rec.rejected}, failed {rec.failed}, no reply {rec.dropped})"
            if rec.rejected or rec.failed or rec.dropped
            else ""
        )
        if rec.skipped:
            extra += f" [round skipped, model unchanged: {rec.skipped}]"
        leak = [s(server_round) for o in self.observed.observers if (s := _round_status(o))]
        leak_text = "".join(f" | {t}" for t in leak if t)
        tqdm.write(
            f"round {server_round}/{self.rounds}: {rec.clients} clients replied{extra}, "
            f"train loss {tl}, test accuracy {accuracy:.4f} ({row['seconds']:.1f} s){leak_text}"
        )

    def close(self) -> None:
        self.bar.close()


def _round_status(observer: Observer) -> Any:
    """An observer's per-round console text hook (the auditor's leakage), if it has one."""
    return getattr(observer, "round_status", None)
