"""strategies.replies: collecting the replies to messages pushed earlier."""

from __future__ import annotations

import time

import numpy as np
from conftest import make_message
from flwr.app import ConfigRecord, RecordDict
from test_ray_transport import _FakeGrid

from strategies import ray_transport
from strategies.arrays import to_array_record
from strategies.replies import collect_replies


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
    from strategies import replies

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
