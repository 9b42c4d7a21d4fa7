"""strategies.replies: collecting the replies to messages pushed earlier."""

from __future__ import annotations

import gc
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import make_message
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from test_ray_transport import _FakeGrid

from precode_flower import task
from precode_flower.clients.client_app import app as client_app
from precode_flower.strategies import Observed, ray_transport
from precode_flower.strategies.arrays import arrays_view, to_array_record
from precode_flower.strategies.replies import collect_replies, release_arrays


def _push(grid, n: int) -> list[str]:
    content = RecordDict(
        {"arrays": to_array_record({"w": np.ones(2)}), "config": ConfigRecord({"lr": 0.1})}
    )
    return list(grid.push_messages([make_message(content, "train", dst=10 + i) for i in range(n)]))


def test_two_phases_in_flight_are_collected_apart() -> None:
    grid = _FakeGrid(delay=0.05)
    grid.pull_interval = 0.01
    first, second = _push(grid, 2), _push(grid, 3)
    got = collect_replies(grid, first, timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["id0", "id1"]
    got = collect_replies(grid, second, timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["id2", "id3", "id4"]


def test_collecting_stops_at_the_timeout_with_what_came() -> None:
    grid = _FakeGrid(lose=1)  # the first message never gets a reply
    grid.pull_interval = 0.01
    ids = _push(grid, 2)
    started = time.monotonic()
    got = collect_replies(grid, ids, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert [r.metadata.reply_to_message_id for r in got] == ["id1"]


def test_a_grid_without_pull_interval_is_polled_at_flowers_pace(monkeypatch) -> None:
    from precode_flower.strategies import replies

    grid = _FakeGrid(delay=0.05)
    del grid.pull_interval  # as Flower's gRPC grid
    waits: list[float] = []
    sleep = time.sleep
    monkeypatch.setattr(replies.time, "sleep", lambda s: waits.append(s) or sleep(0.06))
    got = collect_replies(grid, _push(grid, 1), timeout=None)
    assert len(got) == 1 and waits and set(waits) == {replies.FLOWER_PULL_INTERVAL}


def test_a_grid_that_receives_itself_is_asked() -> None:
    class Receiving(_FakeGrid):
        asked: list = []

        def receive(self, ids, *, timeout=None):
            self.asked.append(timeout)
            return self.pull_messages(ids)

    grid = Receiving()
    got = collect_replies(grid, _push(grid, 2), timeout=7.0)
    assert len(got) == 2 and grid.asked == [7.0]


def test_shared_model_grid_receives_what_it_pushed(monkeypatch) -> None:
    monkeypatch.setattr(ray_transport, "_REPLY_WAKEUP", False)
    inner = _FakeGrid(delay=0.05)
    inner.pull_interval = 0.01
    grid = ray_transport.SharedModelGrid(inner)
    first, second = _push(grid, 1), _push(grid, 2)
    assert [r.metadata.reply_to_message_id for r in collect_replies(grid, first, 30)] == ["id0"]
    assert len(collect_replies(grid, second, 30)) == 2


@contextmanager
def _no_cyclic_gc():
    """Only reference counting frees objects meanwhile (what happens between collections)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _update_reply() -> tuple[Message, weakref.ref]:
    record = to_array_record({"w": np.arange(1000.0), "b": np.ones(3)})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4})})
    msg = make_message(content, "train")
    return msg, weakref.ref(record["w"])


def test_released_arrays_go_with_the_last_reference_despite_flowers_view_cycle() -> None:
    with _no_cyclic_gc():
        kept, kept_ref = _update_reply()
        released, released_ref = _update_reply()
        for msg in (kept, released):
            assert len(msg.content.array_records) == 1  # as Flower's strategies read replies
        view = arrays_view(released.content["arrays"])["w"]
        release_arrays([released])
        del kept, released
        # The view cycle keeps an unreleased reply's arrays; a released one's are gone.
        assert kept_ref() is not None
        assert released_ref() is None
        np.testing.assert_array_equal(view, np.arange(1000.0))  # earlier views stay valid


def test_release_skips_error_replies_and_keeps_metrics() -> None:
    msg, _ = _update_reply()
    failed = make_message(RecordDict(), "train")
    failed = Message(Error(code=0, reason="boom"), reply_to=failed)
    release_arrays([failed, msg])
    assert len(msg.content["arrays"]) == 0
    assert msg.content["metrics"]["num-examples"] == 4


def _recording_grid(inprocess_grid: type, nodes: int):  # noqa: ANN202
    """An in-process grid that keeps a weak reference to every train reply's arrays."""

    class Recording(inprocess_grid):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.updates: list[weakref.ref] = []

        def pull_messages(self, message_ids):  # noqa: ANN001, ANN202
            got = super().pull_messages(message_ids)
            for m in got:
                if m.metadata.message_type == "train" and not m.has_error():
                    self.updates += [weakref.ref(a) for a in m.content["arrays"].values()]
            return got

    return Recording(client_app, nodes)


@pytest.mark.parametrize("mode", ["fedavg", "fedsgd"])
def test_a_finished_rounds_updates_are_freed_without_the_cyclic_gc(
    mode: str, tmp_path: Path, task_identity: None, inprocess_grid: type
) -> None:
    """In a simulation a lingering update pins Ray's object store (see release_arrays)."""
    from server import run_federation

    cfg = task.RunConfig(mode=mode, batch_size=4, local_steps=1, rounds=2, clients=3)
    grid = _recording_grid(inprocess_grid, 3)
    with _no_cyclic_gc():
        run_federation(grid, cfg, tmp_path / "run", progress=False)
        assert grid.updates
        alive = sum(ref() is not None for ref in grid.updates)
    assert alive == 0


def test_updates_are_freed_under_flowers_own_round_loop_too(
    task_identity: None, inprocess_grid: type
) -> None:
    """``Observed`` (so also the auditor) on any strategy, run by Flower's ``start``."""
    cfg = task.RunConfig(mode="fedavg", batch_size=4, local_steps=1, rounds=2, clients=3)
    grid = _recording_grid(inprocess_grid, 3)
    strategy = Observed(FedAvg(min_available_nodes=3, fraction_evaluate=0.0))
    with _no_cyclic_gc():
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(task.initial_state(cfg, 10, (3, 32, 32))),
            num_rounds=cfg.rounds,
            train_config=ConfigRecord(cfg.to_config()),
        )
        assert grid.updates
        alive = sum(ref() is not None for ref in grid.updates)
    assert alive == 0
    assert len(result.arrays) > 0  # the aggregate itself is whole


def test_a_record_the_strategy_returns_is_kept() -> None:
    msg, ref = _update_reply()
    record = msg.content["arrays"]
    release_arrays([msg], keep=record)
    assert len(record) == 2 and ref() is not None
