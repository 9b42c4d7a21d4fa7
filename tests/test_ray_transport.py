"""Shared ArrayRecords, the shared-model grid, the prompt feeder and the pipelined actor pool
(strategies/ray_transport)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_message
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from precode_flower.processes import session_pids, stop_sessions
from precode_flower.strategies import ray_transport
from precode_flower.strategies.arrays import to_array_record

REPO = Path(__file__).resolve().parents[1]


def test_share_without_ray_returns_the_record_itself() -> None:
    record = to_array_record({"w": np.ones((3, 4), np.float32)})
    assert ray_transport.share(record) is record
    assert ray_transport.share(ArrayRecord()) is not None


def test_share_arrays_without_ray_encodes_them() -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3)}
    record = ray_transport.share_arrays(arrays)
    assert type(record) is ArrayRecord
    assert record == to_array_record(arrays)


@pytest.mark.slow
def test_shared_records_through_a_ray_actor(flower_env) -> None:
    """One put for both messages; the actor sees ordinary, equal records of read-only
    views and reads the shared model once; its shared reply arrives as an ordinary, equal
    record, still intact after the actor is gone and the store was filled again."""
    temp = flower_env / "ray" / "transport"
    temp.mkdir(parents=True, exist_ok=True)
    # Its own session, so that Ray's processes are stopped with it whatever happens.
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "ray_transport_probe.py"), str(temp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        stop_sessions([proc.pid], grace=5)
    assert not session_pids(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["shared_type"] == "SharedArrayRecord"
    assert out["same_record_in_both"]
    assert out["original_untouched"] == "ArrayRecord"
    assert out["actor_types"] == ["ArrayRecord", "ArrayRecord"]
    assert out["actor_digests"] == [out["expected_digest"]] * 2
    assert out["actor_views"] == [True, True]  # read-only views of the store: no copy
    assert out["actor_model_reads"] == 1  # the second message reused the first read
    assert out["reply_type"] == "ArrayRecord"
    assert out["reply_views"]
    assert out["reply_digest"] == out["expected_reply"]
    assert out["reply_equal"]
    assert out["driver_cache_entries"] == 0
    assert out["changed_pickles_plain"] == "_plain"


class _FakeGrid:
    """push/pull over a dict; a reply appears ``delay`` seconds after its push."""

    def __init__(self, delay: float = 0.0, lose: int = 0) -> None:
        self.delay, self.lose = delay, lose
        self.pull_interval = 0.1
        self.pushed: list = []
        self._due: dict[str, float] = {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"id{len(self.pushed)}"
            self.pushed.append(m)
            if i >= self.lose:
                self._due[mid] = time.monotonic() + self.delay
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        now = time.monotonic()
        out = []
        for mid in list(ids):
            if mid in self._due and self._due[mid] <= now:
                del self._due[mid]
                reply = make_message(RecordDict(), "train")
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out


def _messages(n: int, record: ArrayRecord):
    content = RecordDict({"arrays": record, "config": ConfigRecord({"lr": 0.1})})
    return [make_message(content, "train", dst=10 + i) for i in range(n)]


def test_grid_waits_for_every_reply_and_forwards_settings() -> None:
    inner = _FakeGrid(delay=0.05)
    grid = ray_transport.SharedModelGrid(inner)
    grid.pull_interval = 0.005  # reaches the wrapped grid (run_federation sets it)
    assert inner.pull_interval == 0.005
    replies = list(grid.send_and_receive(_messages(3, to_array_record({"w": np.ones(2)}))))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1", "id2"]
    assert len(inner.pushed) == 3


def test_grid_stops_at_the_timeout() -> None:
    inner = _FakeGrid(lose=1)  # the first message never gets a reply
    grid = ray_transport.SharedModelGrid(inner)
    inner.pull_interval = 0.01
    started = time.monotonic()
    replies = list(
        grid.send_and_receive(_messages(2, to_array_record({"w": np.ones(2)})), timeout=0.3)
    )
    assert 0.3 <= time.monotonic() - started < 5
    assert [r.metadata.reply_to_message_id for r in replies] == ["id1"]


def test_share_message_arrays_puts_a_record_once_and_caches_across_calls(monkeypatch) -> None:
    calls: list[ArrayRecord] = []

    def fake_share(record: ArrayRecord, *, many_readers: bool = False) -> ArrayRecord:
        assert many_readers  # every message of the round reads the same model
        calls.append(record)
        return ray_transport.SharedArrayRecord(dict(record.items()))

    monkeypatch.setattr(ray_transport, "share", fake_share)
    model = to_array_record({"w": np.arange(6.0)})
    cache: OrderedDict = OrderedDict()
    first = ray_transport.share_message_arrays(_messages(3, model), cache)
    assert len(calls) == 1
    shared = first[0].content["arrays"]
    assert all(m.content["arrays"] is shared for m in first)
    again = ray_transport.share_message_arrays(_messages(2, model), cache)  # evaluate phase
    assert len(calls) == 1 and again[0].content["arrays"] is shared
    ray_transport.share_message_arrays(_messages(1, to_array_record({"w": np.zeros(6)})), cache)
    assert len(calls) == 2 and len(cache) == 1  # only the latest model is kept


def test_prompt_feeder_delivers_right_after_a_push(monkeypatch) -> None:
    monkeypatch.setattr(ray_transport, "_FEEDER_TIMEOUT", 30.0)  # only a wake-up can be fast

    class State:
        def __init__(self) -> None:
            self.waiting: dict[int, list[str]] = {1: [], 2: []}
            self.lock = threading.Lock()

        def get_message_ins(self, node_id: int, limit: int):
            with self.lock:
                taken, self.waiting[node_id] = (
                    self.waiting[node_id][:limit],
                    self.waiting[node_id][limit:],
                )
            return taken

    state, out, stop = State(), queue.Queue(), threading.Event()
    feeder = threading.Thread(
        target=ray_transport._prompt_feeder, args=(state, out, {1: 0, 2: 1}, stop), daemon=True
    )
    feeder.start()
    try:
        time.sleep(0.2)  # the feeder has scanned once and waits
        with state.lock:
            state.waiting[1].append("a")
            state.waiting[2].extend(["b", "c"])
        started = time.monotonic()
        ray_transport._PUSHED.set()
        got = {out.get(timeout=10), out.get(timeout=10), out.get(timeout=10)}
        assert got == {"a", "b", "c"}
        assert time.monotonic() - started < 10  # far below the 30 s timer
    finally:
        stop.set()
        ray_transport._PUSHED.set()
        feeder.join(timeout=10)
    assert not feeder.is_alive()


def test_install_prompt_feeder_replaces_flowers_feeder(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert ray_transport.install_prompt_feeder()
    assert vce_api.add_messages_to_queue is ray_transport._prompt_feeder


def test_prompt_injector_stores_each_reply_and_wakes_the_grid() -> None:
    stored: list[str] = []
    state = SimpleNamespace(store_message_res=stored.append)
    replies, stop = queue.Queue(), threading.Event()
    ray_transport._REPLIED.clear()
    injector = threading.Thread(
        target=ray_transport._prompt_injector, args=(state, replies, stop), daemon=True
    )
    injector.start()
    try:
        replies.put("r1")
        assert ray_transport._REPLIED.wait(10) and stored == ["r1"]
    finally:
        stop.set()
        injector.join(timeout=10)
    assert not injector.is_alive()


def test_grid_woken_by_replies_does_not_poll(monkeypatch) -> None:
    monkeypatch.setattr(ray_transport, "_REPLY_WAKEUP", True)
    monkeypatch.setattr(ray_transport, "_REPLY_TIMEOUT", 30.0)  # only a wake-up can be fast
    inner = _FakeGrid(delay=0.05)
    pulls = []
    pull = inner.pull_messages
    inner.pull_messages = lambda ids: pulls.append(1) or pull(ids)
    grid = ray_transport.SharedModelGrid(inner)
    grid.pull_interval = 0.001  # ignored while replies wake the grid
    wake = threading.Timer(0.2, ray_transport._REPLIED.set)  # as the injector, once stored
    wake.start()
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(2, to_array_record({"w": np.ones(2)}))))
    assert len(replies) == 2 and time.monotonic() - started < 10
    assert len(pulls) <= 3  # one before the wake-up (maybe one more if it came early), one after


def test_install_reply_wakeup_replaces_flowers_injector(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "put_message_into_state", vce_api.put_message_into_state)
    monkeypatch.setattr(ray_transport, "_REPLY_WAKEUP", False)
    assert ray_transport.install_reply_wakeup()
    assert vce_api.put_message_into_state is ray_transport._prompt_injector
    assert ray_transport._REPLY_WAKEUP


class _FakeActor:
    """Stands in for a Ray actor handle: counts its tasks and terminations."""

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.terminated = 0
        self.terminate = SimpleNamespace(remote=self._terminate)

    def _terminate(self) -> None:
        self.terminated += 1


def _pipelined_pool(monkeypatch, actors: int):  # noqa: ANN202
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)
    monkeypatch.setattr(ray_transport, "_FLOWER_POOL", None)
    assert ray_transport.install_pipelined_actor_pool()
    cls = raybackend.BasicActorPool
    assert cls is not BasicActorPool and issubclass(cls, BasicActorPool)
    assert ray_transport.install_pipelined_actor_pool(1)  # depth 1: Flower's own pool again
    assert raybackend.BasicActorPool is BasicActorPool
    with pytest.raises(ValueError, match="at least 1"):
        ray_transport.install_pipelined_actor_pool(0)
    assert ray_transport.install_pipelined_actor_pool(2)
    cls = raybackend.BasicActorPool
    # Flower's __init__ asks a running Ray for the pool size; set what it would.
    pool = cls.__new__(cls)
    pool.__dict__.update(
        _lock=threading.Lock(), pool=[], num_actors=0, _future_to_actor={},
        create_actor_fn=_FakeActor, client_resources={"num_cpus": 1}, actors_capacity=actors,
    )  # fmt: skip
    pool.add_actors_to_pool(actors)
    return pool


def _run_on(actor: _FakeActor, app_fn, msg: str, cid: str, context) -> object:  # noqa: ANN001
    actor.tasks.append(msg)
    return object()  # the task's future


def test_pipelined_pool_queues_two_tasks_per_actor_on_the_least_busy(monkeypatch) -> None:
    pool = _pipelined_pool(monkeypatch, actors=2)
    assert pool.num_actors == 2 * ray_transport.ACTOR_QUEUE_DEPTH == len(pool.pool)
    a, b = {id(x): x for x in pool.pool}.values()
    first = pool.submit(_run_on, (None, "m1", "0", None))
    pool.submit(_run_on, (None, "m2", "1", None))
    assert (len(a.tasks), len(b.tasks)) == (1, 1)  # two clients: both actors, not one twice
    pool.submit(_run_on, (None, "m3", "2", None))
    pool.submit(_run_on, (None, "m4", "3", None))
    assert (len(a.tasks), len(b.tasks)) == (2, 2) and not pool.is_actor_available()
    done = pool._future_to_actor[first]
    pool.add_actor_back_to_pool(first)  # its actor now has one in flight, the other two
    pool.submit(_run_on, (None, "m5", "4", None))
    assert done.tasks[-1] == "m5"
    pool.terminate_all_actors()
    assert (a.terminated, b.terminated) == (1, 1)


def test_pipelined_pool_keeps_its_slots_under_concurrent_workers(monkeypatch) -> None:
    pool = _pipelined_pool(monkeypatch, actors=2)
    errors: list[BaseException] = []

    def worker() -> None:  # as Flower's worker threads: submit, fetch, give back
        try:
            for i in range(500):
                pool.add_actor_back_to_pool(pool.submit(_run_on, (None, f"m{i}", "0", None)))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(pool.num_actors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not pool._future_to_actor
    assert sorted(Counter(map(id, pool.pool)).values()) == [2, 2]  # every slot is back
    assert sum(len(x.tasks) for x in {id(x): x for x in pool.pool}.values()) == 4 * 500


# --- the --transport switch: the fast transport only on the Flower it was verified with ---


def test_fast_transport_is_allowed_exactly_on_the_verified_flower() -> None:
    from importlib import metadata

    version = metadata.version("flwr")
    problem = ray_transport.fast_transport_problem()
    if version.startswith(ray_transport.VERIFIED_FLOWER):
        assert problem is None
    else:  # CI on a newer Flower (the range allows it): refused, naming the version
        assert problem is not None and version in problem


def test_fast_transport_is_refused_where_flower_changed(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    monkeypatch.setattr(ray_transport.metadata, "version", lambda name: "1.42.0")
    monkeypatch.setattr(ray_transport, "_FLOWER_ORIGINALS", {})
    assert ray_transport.fast_transport_problem() is None

    with monkeypatch.context() as m:
        m.setattr(ray_transport.metadata, "version", lambda name: "1.43.0")
        assert "not 1.43.0" in ray_transport.fast_transport_problem()

    def feeder(state, queue, nodes_mapping, f_stop, batch):  # a new parameter
        pass

    with monkeypatch.context() as m:
        m.setattr(vce_api, "add_messages_to_queue", feeder)
        problem = ray_transport.fast_transport_problem()
        assert "add_messages_to_queue" in problem and "batch" in problem

    class Pool:  # the same methods, but no longer the attributes the pipelined pool uses
        def __init__(self, actor_type, client_resources, actor_kwargs):
            self.pool = []

        def add_actors_to_pool(self, num_actors): ...
        def submit(self, actor_fn, job): ...
        def add_actor_back_to_pool(self, future): ...
        def terminate_all_actors(self): ...

    with monkeypatch.context() as m:
        m.setattr(raybackend, "BasicActorPool", Pool)
        problem = ray_transport.fast_transport_problem()
        assert "_future_to_actor" in problem and "create_actor_fn" in problem


def test_fast_transport_checks_flowers_own_functions_once_replaced(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(ray_transport.metadata, "version", lambda name: "1.42.0")
    monkeypatch.setattr(ray_transport, "_FLOWER_ORIGINALS", {})
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(vce_api, "put_message_into_state", vce_api.put_message_into_state)
    assert ray_transport.install_prompt_feeder()
    assert vce_api.add_messages_to_queue is ray_transport._prompt_feeder
    assert ray_transport.fast_transport_problem() is None  # Flower's, not ours, is checked
    assert ray_transport._FLOWER_ORIGINALS["add_messages_to_queue"] is not (
        ray_transport._prompt_feeder
    )


def test_a_process_without_shared_records_replies_plain(monkeypatch) -> None:
    """The flower transport: a client actor (connected to Ray) never shares its update
    unless its server sent it a shared record."""
    monkeypatch.setattr(ray_transport, "_ray", lambda: pytest.fail("must not touch Ray"))
    monkeypatch.setattr(ray_transport, "_SHARED_SEEN", False)
    arrays = {"w": np.ones((2, 2), np.float32)}
    record = ray_transport.share_arrays(arrays)
    assert type(record) is ArrayRecord and record == to_array_record(arrays)


def test_restore_flower_undoes_every_replacement(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    feeder, injector = vce_api.add_messages_to_queue, vce_api.put_message_into_state
    pool = raybackend.BasicActorPool
    monkeypatch.setattr(vce_api, "add_messages_to_queue", feeder)
    monkeypatch.setattr(vce_api, "put_message_into_state", injector)
    monkeypatch.setattr(raybackend, "BasicActorPool", pool)
    monkeypatch.setattr(ray_transport, "_REPLY_WAKEUP", False)
    assert ray_transport.install_prompt_feeder() and ray_transport.install_reply_wakeup()
    assert ray_transport.install_pipelined_actor_pool()
    assert raybackend.BasicActorPool is not pool and ray_transport._REPLY_WAKEUP
    ray_transport.restore_flower()
    assert vce_api.add_messages_to_queue is feeder
    assert vce_api.put_message_into_state is injector
    assert raybackend.BasicActorPool is pool
    assert not ray_transport._REPLY_WAKEUP
