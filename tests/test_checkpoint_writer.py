"""CheckpointWriter: checkpoints saved off the round's path, the latest one on disk at close."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict

import pytest
import torch

from precode_flower.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt(round_: int) -> Checkpoint:
    model = OrderedDict(w=torch.full((4, 3), float(round_)), b=torch.zeros(3))
    return Checkpoint(round=round_, config={"rounds": 9}, model=model)


def test_the_last_submitted_checkpoint_is_on_disk_after_close(tmp_path) -> None:
    writer = CheckpointWriter(tmp_path)
    started, gate = threading.Event(), threading.Event()
    built: list[int] = []

    def slow_first() -> Checkpoint:
        started.set()
        gate.wait(10)  # round 1 is being written while rounds 2 and 3 arrive
        built.append(1)
        return _ckpt(1)

    writer.submit(slow_first)
    assert started.wait(10)
    for r in (2, 3):
        writer.submit(lambda r=r: built.append(r) or _ckpt(r))
    gate.set()
    writer.close()
    assert built == [1, 3]  # round 2 was replaced before its save started
    assert writer.saved_round == 3
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 3 and torch.equal(ckpt.model["w"], torch.full((4, 3), 3.0))
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: _ckpt(4))


def test_a_failed_save_is_logged_and_later_ones_still_happen(tmp_path, caplog) -> None:
    writer = CheckpointWriter(tmp_path)
    writer.submit(lambda: _ckpt(1))
    writer.close()  # (waits for round 1)

    writer = CheckpointWriter(tmp_path)
    done = threading.Event()

    def broken() -> Checkpoint:
        try:
            raise OSError("disk full")
        finally:
            done.set()

    with caplog.at_level(logging.ERROR, logger="precode_flower.checkpoint"):
        writer.submit(broken)
        done.wait(10)
        writer.submit(lambda: _ckpt(2))
        writer.close()
    assert "could not save the checkpoint" in caplog.text and "disk full" in caplog.text
    assert load_checkpoint(tmp_path).round == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_runs_at_the_lowest_priority_and_the_caller_does_not(tmp_path) -> None:
    writer = CheckpointWriter(tmp_path)
    seen: list[int] = []
    writer.submit(lambda: seen.append(_nice(threading.get_native_id())) or _ckpt(1))
    writer.close()
    assert seen == [19]
    assert _nice(threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0) < 19


def _nice(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[16])  # field 19: nice


def test_a_view_is_saved_as_its_own_values_not_its_whole_storage(tmp_path) -> None:
    big = torch.arange(1_000_000, dtype=torch.float32)
    model = OrderedDict(w=big[10:22].view(4, 3), b=torch.zeros(3), t=big[:6].view(3, 2).t())
    save_checkpoint(tmp_path, Checkpoint(round=1, config={"rounds": 9}, model=model))
    assert (tmp_path / "checkpoint.pt").stat().st_size < 100_000  # not the 4 MB storage
    loaded = load_checkpoint(tmp_path).model
    for k, v in model.items():
        assert torch.equal(loaded[k], v)
