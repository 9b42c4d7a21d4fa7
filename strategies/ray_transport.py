"""Model-sized messages through Flower's Ray simulation with fewer copies and less waiting.

In Flower's simulation every message to a client actor is pickled into Ray's object store
and out again in the actor: the same 16 MB global model ten times a round for training
and ten more for evaluation, at about 25 ms each on 2 cores (two copies, and page faults
on fresh shared memory). Here:

- :func:`share` puts a record's values into the object store once (``ray.put``, one copy,
  the NumPy buffers out of band) and returns a :class:`SharedArrayRecord`, whose pickled
  form is only that object's reference. Unpickled (in an actor, or in the driver for a
  reply) it is an ordinary ``ArrayRecord`` again, of
  :class:`~strategies.arrays.StoredArray` views of the shared memory: no copy, and no
  ``.npy`` bytes unless something asks for them. A record shared for many readers (the
  global model) is kept by each process that read it for the clients it serves next.
- :func:`share_arrays` does the same for a client's update, straight from its NumPy
  arrays (one copy in all, where encoding them first would make two).
- :class:`SharedModelGrid` shares the ArrayRecords of every message the ServerApp sends,
  and wakes Flower's message feeder (see :func:`install_prompt_feeder`) right after each
  push instead of letting it poll every 0.1 s; Flower's reply injector in turn wakes the
  grid after each reply (:func:`install_reply_wakeup`) instead of the grid polling.
- :func:`install_pipelined_actor_pool` keeps two client tasks in flight per actor, so that
  an actor never waits for its last reply to reach the driver before starting the next.

The stored values live as long as a reader holds them (also after the process that put
them has exited), so the server's view of a round's updates occupies the store until it
has aggregated them: ``simulate.object_store_mb`` sizes the store for that.

What a ClientApp or a strategy sees is unchanged: the same names, dtypes, shapes and
bytes. Outside a process connected to Ray (a SuperNode's ClientApp, a deployed ServerApp)
:func:`share` returns the record as it is; there Flower serialises messages to protobuf
and never pickles them.

All of this is ``simulate.py --transport fast``, the one switch for what touches Flower's
or Ray's internals: three of Flower's simulation-engine functions or classes replaced, the
private attributes of its actor pool, ``Array``'s fields set directly
(:class:`~precode_flower.strategies.arrays.StoredArray`). :func:`fast_transport_problem`
checks them against the installed Flower (the version and every replaced signature it
was verified with) before anything is installed. With ``--transport flower`` nothing here
runs: no grid wrapper, no replacement, and a client actor replies with plain ``.npy``
records (:func:`share_arrays` shares only in a process that has received a shared record,
i.e. one whose server is on the fast transport).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from importlib import metadata
from queue import Empty
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .arrays import NUMPY_STYPE, StoredArray, arrays_view, to_array_record
from .replies import poll_replies

__all__ = [
    "SharedArrayRecord",
    "ACTOR_QUEUE_DEPTH",
    "TRANSPORTS",
    "SharedModelGrid",
    "fast_transport_problem",
    "restore_flower",
    "install_pipelined_actor_pool",
    "install_prompt_feeder",
    "install_reply_wakeup",
    "share",
    "share_arrays",
    "share_message_arrays",
]

# Records this process read from the object store, by object id: an actor serves many
# clients the same global model in turn (a round's evaluate phase and the next round's
# train phase send the same one), so the latest suffices.
_READ_CACHE: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
_READ_CACHE_SIZE = 1
_READ_LOCK = threading.Lock()
# Whether this process has read a shared record: its server is on the fast transport, so
# its replies may be shared too (see share_arrays).
_SHARED_SEEN = False

#: simulate.py's --transport choices.
TRANSPORTS = ("fast", "flower")

# What the fast transport replaces or relies on, as verified with Flower 1.42.0. Checked by
# fast_transport_problem() before anything is installed.
VERIFIED_FLOWER = "1.42."  # version prefix
_VCE_API = "flwr.server.superlink.fleet.vce.vce_api"
_RAY_BACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"
_VERIFIED_SIGNATURES: dict[tuple[str, str], tuple[str, ...]] = {
    (_VCE_API, "add_messages_to_queue"): ("state", "queue", "nodes_mapping", "f_stop"),
    (_VCE_API, "put_message_into_state"): ("state", "queue", "f_stop"),
    (_RAY_BACKEND, "BasicActorPool.__init__"): (
        "self",
        "actor_type",
        "client_resources",
        "actor_kwargs",
    ),
    (_RAY_BACKEND, "BasicActorPool.add_actors_to_pool"): ("self", "num_actors"),
    (_RAY_BACKEND, "BasicActorPool.submit"): ("self", "actor_fn", "job"),
    (_RAY_BACKEND, "BasicActorPool.add_actor_back_to_pool"): ("self", "future"),
    (_RAY_BACKEND, "BasicActorPool.terminate_all_actors"): ("self",),
}
# The pool's attributes the pipelined pool reads and writes (set in its __init__).
_POOL_ATTRIBUTES = ("pool", "num_actors", "create_actor_fn", "_future_to_actor")
# StoredArray sets these fields of Flower's Array (a dataclass) directly.
_ARRAY_FIELDS = ("dtype", "shape", "stype", "data")
# Flower's own functions and pool class, once replaced here.
_FLOWER_ORIGINALS: dict[str, Any] = {}


def _flower_object(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for i, part in enumerate(qualname.split(".")):
        if i == 0:  # a module attribute that this module may have replaced
            obj = _FLOWER_ORIGINALS.get(part, getattr(obj, part))
        else:
            obj = getattr(obj, part)
    return obj


def fast_transport_problem() -> str | None:
    """Why the fast transport must not run on the installed Flower, or None where it may:
    the Flower version, and every function, class and field it replaces or relies on, as
    verified (:data:`VERIFIED_FLOWER`). Imports Flower's simulation engine (and Ray)."""
    try:
        version = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return "Flower (flwr) is not installed"
    if not version.startswith(VERIFIED_FLOWER):
        return f"the fast transport is verified for Flower {VERIFIED_FLOWER}x, not {version}"
    try:
        for (module, name), params in _VERIFIED_SIGNATURES.items():
            found = tuple(inspect.signature(_flower_object(module, name)).parameters)
            if found != params:
                return f"Flower {version}: {name}{found} differs from the verified {params}"
        pool = _flower_object(_RAY_BACKEND, "BasicActorPool")
        init = inspect.getsource(pool.__init__)
        missing = [a for a in _POOL_ATTRIBUTES if f"self.{a}" not in init]
        if missing:
            return f"Flower {version}: BasicActorPool no longer sets {', '.join(missing)}"
        import dataclasses

        from flwr.app import Array

        fields = tuple(f.name for f in dataclasses.fields(Array))
        if fields != _ARRAY_FIELDS:
            return f"Flower {version}: Array's fields {fields} differ from {_ARRAY_FIELDS}"
    except (ImportError, AttributeError, OSError, TypeError, ValueError) as err:
        return f"Flower {version}: cannot check the fast transport's hooks ({err})"
    return None


def _ray() -> Any:
    """The ``ray`` module if this process is connected to Ray, else None (never imports it)."""
    ray = sys.modules.get("ray")
    # Another thread may be importing Ray right now (Flower starts it beside the ServerApp).
    connected = getattr(ray, "is_initialized", None)
    return ray if connected is not None and connected() else None


def _record(
    names: tuple[str, ...], values: list[np.ndarray], record: ArrayRecord | None = None
) -> ArrayRecord:
    # New Array objects over the same read-only values for every reader, so that a
    # ClientApp that changes its message's record cannot change the next client's. Set
    # one by one: ArrayRecord(dict) would rebuild each as a plain Array, making its bytes.
    record = ArrayRecord() if record is None else record
    for name, v in zip(names, values, strict=True):
        record[name] = StoredArray(v)
    return record


def _rebuild(ref: Any, names: tuple[str, ...], many_readers: bool = False) -> ArrayRecord:
    """Unpickling a :class:`SharedArrayRecord`: an ordinary ``ArrayRecord`` whose arrays
    are read-only views of the values in the object store (no copy)."""
    import ray

    global _SHARED_SEEN
    _SHARED_SEEN = True

    key = ref.binary()
    values = None
    if many_readers:
        with _READ_LOCK:
            values = _READ_CACHE.get(key)
            if values is not None:
                _READ_CACHE.move_to_end(key)
    if values is None:
        # Views of the shared memory, which Ray keeps while they live (also after the
        # putting process has exited).
        values = ray.get(ref)
        if many_readers:
            with _READ_LOCK:
                _READ_CACHE[key] = values
                while len(_READ_CACHE) > _READ_CACHE_SIZE:
                    _READ_CACHE.popitem(last=False)
    return _record(names, values)


def _plain(arrays: dict[str, Array]) -> ArrayRecord:
    return ArrayRecord(arrays)


class SharedArrayRecord(ArrayRecord):
    """An ``ArrayRecord`` whose values also live in Ray's object store (see :func:`share`).

    Pickled (by Ray, for a task argument or result) it is the object's reference and the
    arrays' names; it unpickles as an ordinary ``ArrayRecord`` of
    :class:`~strategies.arrays.StoredArray` views of the stored values. Changing an entry
    drops the shared copy, so the pickled form is never stale.
    """

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        ref = self.__dict__.get("_shared_ref")
        if ref is None:
            return _plain, (dict(self.items()),)
        return _rebuild, (ref, tuple(self.keys()), self.__dict__["_many_readers"])

    def __setitem__(self, key: str, value: Array) -> None:
        self.__dict__["_shared_ref"] = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__dict__["_shared_ref"] = None
        super().__delitem__(key)


def _put(ray: Any, names: list[str], values: list[np.ndarray], many_readers: bool) -> ArrayRecord:
    # ray.put copies the values into the object store once (NumPy buffers out of band);
    # the record here is read back from there, so it is exactly what readers will see.
    ref = ray.put(values)
    shared = _record(tuple(names), ray.get(ref), SharedArrayRecord())
    shared.__dict__["_many_readers"] = many_readers
    shared.__dict__["_shared_ref"] = ref
    return shared


def share(record: ArrayRecord, *, many_readers: bool = False) -> ArrayRecord:
    """``record`` as a :class:`SharedArrayRecord` (its values put into Ray's object store
    once), or ``record`` itself where that cannot help: no Ray connection in this process,
    an empty record, one already shared, or arrays that are not NumPy-serialised.
    ``many_readers``: several messages carry it, so each reading process keeps its copy for
    the next one."""
    ray = _ray()
    if ray is None or not record or isinstance(record, SharedArrayRecord):
        return record
    if any(a.stype != NUMPY_STYPE for a in record.values()):
        return record
    return _put(ray, list(record.keys()), list(arrays_view(record).values()), many_readers)


def share_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays`` (a client's update), copied once: into Ray's object
    store where this process is connected to Ray (a simulation actor) and has received a
    shared record (its server is on the fast transport), else into ``.npy`` bytes
    (:func:`~strategies.arrays.to_array_record`)."""
    ray = _ray() if _SHARED_SEEN else None
    values = [np.asarray(v) for v in arrays.values()]
    if ray is None or not values or any(v.dtype.hasobject for v in values):
        return to_array_record(arrays)
    return _put(ray, list(arrays.keys()), values, many_readers=False)


def share_message_arrays(
    messages: Iterable[Message],
    cache: OrderedDict[int, tuple[ArrayRecord, ArrayRecord]] | None = None,
    cache_size: int = 1,
) -> list[Message]:
    """Replace every ``ArrayRecord`` in the messages' content by its shared form.

    A record that several messages carry (Flower's strategies give every node the same
    ``RecordDict``) is put into the object store once. With ``cache`` (original's id ->
    (original, shared), the ``cache_size`` latest kept) also across calls.
    """
    messages = list(messages)
    cache = OrderedDict() if cache is None else cache
    for msg in messages:
        if msg.has_error():
            continue
        content = msg.content
        # Not ``content.array_records``: that view would tie the content (and the original
        # record) into a reference cycle (see strategies.replies.release_arrays).
        for key, record in list(content.items()):
            if not isinstance(record, ArrayRecord) or isinstance(record, SharedArrayRecord):
                continue  # not arrays, or a content shared by earlier messages
            hit = cache.get(id(record))
            if hit is None or hit[0] is not record:
                hit = cache[id(record)] = (record, share(record, many_readers=True))
            cache.move_to_end(id(record))
            if hit[1] is not record:
                content[key] = hit[1]
    while len(cache) > max(cache_size, 1):
        cache.popitem(last=False)
    return messages


# --------------------------------------------------------------------------------------------
# Waking Flower's message feeder

_PUSHED = threading.Event()
_FEEDER_TIMEOUT = 0.1  # Flower's own polling interval: the feeder's pace without a wake-up
_REPLIED = threading.Event()
_REPLY_WAKEUP = False  # install_reply_wakeup() is in place: replies wake the grid
_REPLY_TIMEOUT = 0.1  # the grid's pace without a wake-up (Flower's own pull interval)


def _prompt_feeder(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower's simulation feeder (LinkState -> the workers' queue, one message per node at
    a time), woken by :class:`SharedModelGrid` right after a push rather than on a timer."""
    while not f_stop.is_set():
        _PUSHED.clear()  # before the scan: a push during it wakes the next wait at once
        delivered = False
        for node_id in list(nodes_mapping.keys()):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                delivered = True
        if not delivered:  # else scan again: a node may have more than one waiting
            _PUSHED.wait(_FEEDER_TIMEOUT)


def _replace_in_vce_api(name: str, replacement: Any) -> bool:
    """Set function ``name`` of Flower's simulation engine (``vce_api``, looked up when the
    engine starts) to ``replacement``; False, changing nothing, where it is gone."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not callable(getattr(vce_api, name, None)):
        return False
    _FLOWER_ORIGINALS.setdefault(name, getattr(vce_api, name))
    setattr(vce_api, name, replacement)
    return True


def _prompt_injector(state: Any, queue: Any, f_stop: threading.Event) -> None:
    """Flower's simulation reply injector (the workers' queue -> LinkState), which also wakes
    :meth:`SharedModelGrid.receive` after every reply it stores."""
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        _REPLIED.set()


def install_reply_wakeup() -> bool:
    """Use :func:`_prompt_injector` in Flower's simulation engine; True if it is in place.

    :class:`SharedModelGrid` then waits for a reply to be stored instead of asking the
    LinkState every few ms: that polling took about 50 ms of the driver's CPU a round,
    taken from the client actors on a small machine. Like :func:`install_prompt_feeder`, it
    replaces one function of Flower 1.42's ``vce_api`` and leaves Flower alone where it is
    gone (the grid then polls at its ``pull_interval``).
    """
    global _REPLY_WAKEUP
    _REPLY_WAKEUP = _replace_in_vce_api("put_message_into_state", _prompt_injector)
    return _REPLY_WAKEUP


def install_prompt_feeder() -> bool:
    """Use :func:`_prompt_feeder` in Flower's simulation engine; True if it is in place.

    Flower's feeder polls the LinkState every 0.1 s, so each train and each evaluate phase
    waited 50 ms on average before any client started. This replaces that function of
    ``flwr.server.superlink.fleet.vce.vce_api`` (Flower 1.42, which the project pins; it is
    looked up when the engine starts), and leaves Flower alone where the function is gone.
    """
    return _replace_in_vce_api("add_messages_to_queue", _prompt_feeder)


class SharedModelGrid:
    """A simulation Grid whose outgoing messages carry shared ArrayRecords, and which wakes
    the prompt feeder after every push. Everything else, ``pull_interval`` included, is the
    wrapped grid's."""

    def __init__(self, grid: Any) -> None:
        self.__dict__["grid"] = grid
        if isinstance(getattr(grid, "pull_interval", None), float):
            # Flower's in-memory grid polls for replies every 0.1 s, a dict lookup; with
            # client messages of tens of ms that idled the actors ~0.1 s a round (without
            # install_reply_wakeup, which makes the polling moot).
            grid.pull_interval = min(grid.pull_interval, 0.005)
        # The latest record shared: a round's evaluate phase and the next round's train
        # phase send the same global model.
        self.__dict__["_shared"] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.grid, name, value)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = share_message_arrays(messages, self._shared)
        ids = list(self.grid.push_messages(messages))
        _PUSHED.set()
        return ids

    def receive(self, message_ids: Iterable[str], *, timeout: float | None = None) -> list[Message]:
        """Pull until every message in ``message_ids`` has its reply or ``timeout`` passes,
        woken by each reply stored (:func:`install_reply_wakeup`) where that is in place."""
        pull = self.grid.pull_messages
        if _REPLY_WAKEUP:
            return poll_replies(pull, message_ids, timeout, _REPLY_TIMEOUT, _REPLIED)
        return poll_replies(pull, message_ids, timeout, self.grid.pull_interval)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` passes (the
        Grid's contract, as Flower's grids keep it)."""
        return self.receive(self.push_messages(messages), timeout=timeout)


# --------------------------------------------------------------------------------------------
# Two tasks in flight per actor

ACTOR_QUEUE_DEPTH = 2  # client tasks in flight per actor: the one running, the next queued
_FLOWER_POOL: type | None = None  # Flower's own pool class, once replaced


def _pipelined_pool_class(base: type, depth: int) -> type:
    class PipelinedActorPool(base):  # type: ignore[misc, valid-type]
        """Flower's ``BasicActorPool`` with ``depth`` task slots per actor.

        Each slot is one of Flower's worker threads; an actor runs its tasks one at a time
        (Ray keeps their order), so the next client's task is already waiting in the actor
        when the current one ends. A task goes to the actor with the fewest in flight.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._lock = threading.Lock()
            super().__init__(*args, **kwargs)

        def add_actors_to_pool(self, num_actors: int) -> None:
            for _ in range(num_actors):
                self.pool.extend([self.create_actor_fn()] * depth)
            self.num_actors += num_actors * depth  # Flower's worker count

        def submit(self, actor_fn: Any, job: tuple[Any, Any, str, Any]) -> Any:
            with self._lock:
                busy: dict[int, int] = {}
                for actor in self._future_to_actor.values():
                    busy[id(actor)] = busy.get(id(actor), 0) + 1
                i = min(range(len(self.pool)), key=lambda j: busy.get(id(self.pool[j]), 0))
                actor = self.pool.pop(i)
                future = actor_fn(actor, *job)
                self._future_to_actor[future] = actor
            return future

        def add_actor_back_to_pool(self, future: Any) -> None:
            with self._lock:
                super().add_actor_back_to_pool(future)

        def terminate_all_actors(self) -> None:
            with self._lock:  # every actor once, also one whose other slot is still busy
                every = [*self.pool, *self._future_to_actor.values()]
                self.pool = list({id(a): a for a in every}.values())
            super().terminate_all_actors()

    return PipelinedActorPool


def restore_flower() -> None:
    """Undo every replacement made in this process: Flower's simulation engine as it is
    (``--transport flower`` after a ``fast`` run in the same process, e.g. a benchmark)."""
    global _REPLY_WAKEUP
    if not _FLOWER_ORIGINALS:
        return  # nothing was replaced (never imports Flower's engine)
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    for name in ("add_messages_to_queue", "put_message_into_state"):
        if name in _FLOWER_ORIGINALS:
            setattr(vce_api, name, _FLOWER_ORIGINALS[name])
    if "BasicActorPool" in _FLOWER_ORIGINALS:
        raybackend.BasicActorPool = _FLOWER_ORIGINALS["BasicActorPool"]  # type: ignore[attr-defined]
    _REPLY_WAKEUP = False


def install_pipelined_actor_pool(depth: int = ACTOR_QUEUE_DEPTH) -> bool:
    """Give every simulation actor ``depth`` client tasks at a time (1: Flower's own pool);
    True if that is in place.

    Flower's pool hands an actor its next client only after the last one's reply has come
    back to the driver: each task then waited for that round trip (a few ms on 2 cores, 10
    tasks a round per actor). This replaces the pool class that Flower's Ray backend
    (``flwr.server.superlink.fleet.vce.backend.raybackend``, Flower 1.42) builds, and leaves
    Flower alone where that name is gone. Replies, errors and ordering are Flower's.

    The price: a task queued behind a client that hangs waits with it, so a hung client can
    cost the round one more reply (the next client on its actor); with ``depth=1`` it costs
    only its own.
    """
    global _FLOWER_POOL
    if depth < 1:
        raise ValueError(f"actor queue depth must be at least 1, got {depth}")
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError:
        return False
    if _FLOWER_POOL is None:
        base = getattr(raybackend, "BasicActorPool", None)
        if not isinstance(base, type):
            return False
        _FLOWER_POOL = _FLOWER_ORIGINALS["BasicActorPool"] = base
    pool = _FLOWER_POOL if depth == 1 else _pipelined_pool_class(_FLOWER_POOL, depth)
    raybackend.BasicActorPool = pool  # type: ignore[attr-defined]
    return True
