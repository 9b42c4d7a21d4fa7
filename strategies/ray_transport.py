"""Model-sized messages through Flower's Ray simulation with fewer copies and less waiting.

In Flower's simulation every message to a client actor is pickled into Ray's object store
and out again in the actor: the same 16 MB global model ten times a round for training
and ten more for evaluation, at about 25 ms each on 2 cores (two copies, and page faults
on fresh shared memory). Here:

- :func:`share` puts a record's values into the object store once (``ray.put``, one copy,
  the NumPy buffers out of band) and returns a :class:`SharedArrayRecord`, whose pickled
  form is only that object's reference. Unpickled (in an actor, or in the driver for a
  reply) it is an ordinary ``ArrayRecord`` again, read from the object store with one
  copy. A record shared for many readers (the global model) is kept by each process that
  read it, so the clients an actor serves in turn copy the same model once; one meant for a
  single reader (a client's update) is not kept.
- :class:`SharedModelGrid` shares the ArrayRecords of every message the ServerApp sends,
  and wakes Flower's message feeder (see :func:`install_prompt_feeder`) right after each
  push instead of letting it poll every 0.1 s.

What a ClientApp or a strategy sees is unchanged: the same names, dtypes, shapes and
bytes. Outside a process connected to Ray (a SuperNode's ClientApp, a deployed ServerApp)
:func:`share` returns the record as it is; there Flower serialises messages to protobuf
and never pickles them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

__all__ = [
    "SharedArrayRecord",
    "SharedModelGrid",
    "install_prompt_feeder",
    "share",
    "share_message_arrays",
]

_Meta = tuple[tuple[str, str, tuple[int, ...], str], ...]  # (name, dtype, shape, stype)

# Records this process read from the object store, by object id: an actor serves many
# clients the same global model in turn (a round's evaluate phase and the next round's
# train phase send the same one), so the latest suffices.
_READ_CACHE: OrderedDict[bytes, ArrayRecord] = OrderedDict()
_READ_CACHE_SIZE = 1
_READ_LOCK = threading.Lock()


def _ray() -> Any:
    """The ``ray`` module if this process is connected to Ray, else None (never imports it)."""
    ray = sys.modules.get("ray")
    # Another thread may be importing Ray right now (Flower starts it beside the ServerApp).
    connected = getattr(ray, "is_initialized", None)
    return ray if connected is not None and connected() else None


def _rebuild(ref: Any, meta: _Meta, many_readers: bool = False) -> ArrayRecord:
    """Unpickling a :class:`SharedArrayRecord`: its values from the object store."""
    import ray

    key = ref.binary()
    cached = None
    if many_readers:
        with _READ_LOCK:
            cached = _READ_CACHE.get(key)
            if cached is not None:
                _READ_CACHE.move_to_end(key)
    if cached is None:
        buffers = ray.get(ref)  # read-only views of the shared memory: copied once here
        cached = ArrayRecord(
            {
                name: Array(dtype, shape, stype, buf.tobytes())
                for (name, dtype, shape, stype), buf in zip(meta, buffers, strict=True)
            }
        )
        if not many_readers:
            return cached
        with _READ_LOCK:
            _READ_CACHE[key] = cached
            while len(_READ_CACHE) > _READ_CACHE_SIZE:
                _READ_CACHE.popitem(last=False)
    # A record of its own (new Array objects over the same immutable bytes), so that a
    # ClientApp that changes its message's record cannot change the next client's.
    return ArrayRecord(dict(cached.items()))


def _plain(arrays: dict[str, Array]) -> ArrayRecord:
    return ArrayRecord(arrays)


class SharedArrayRecord(ArrayRecord):
    """An ``ArrayRecord`` whose values also live in Ray's object store (see :func:`share`).

    Pickled (by Ray, for a task argument or result) it is the object's reference and the
    arrays' names, dtypes, shapes and serialisation types; it unpickles as an ordinary
    ``ArrayRecord``. Changing an entry drops the shared copy, so the pickled form is never
    stale.
    """

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        ref = self.__dict__.get("_shared_ref")
        if ref is None:
            return _plain, (dict(self.items()),)
        return _rebuild, (ref, self.__dict__["_shared_meta"], self.__dict__["_many_readers"])

    def __setitem__(self, key: str, value: Array) -> None:
        self.__dict__["_shared_ref"] = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__dict__["_shared_ref"] = None
        super().__delitem__(key)


def share(record: ArrayRecord, *, many_readers: bool = False) -> ArrayRecord:
    """``record`` as a :class:`SharedArrayRecord` (its values put into Ray's object store
    once), or ``record`` itself where that cannot help: no Ray connection in this process,
    an empty record, or one already shared. ``many_readers``: several messages carry it, so
    each reading process keeps its copy for the next one."""
    ray = _ray()
    if ray is None or not record or isinstance(record, SharedArrayRecord):
        return record
    shared = SharedArrayRecord(dict(record.items()))  # the same Array objects: no copy
    meta = tuple((n, a.dtype, tuple(a.shape), a.stype) for n, a in record.items())
    buffers = [np.frombuffer(a.data, np.uint8) for a in record.values()]
    shared.__dict__["_shared_meta"] = meta
    shared.__dict__["_many_readers"] = many_readers
    shared.__dict__["_shared_ref"] = ray.put(buffers)
    return shared


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
        for key, record in list(content.array_records.items()):
            if isinstance(record, SharedArrayRecord):  # a content shared by earlier messages
                continue
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


def install_prompt_feeder() -> bool:
    """Use :func:`_prompt_feeder` in Flower's simulation engine; True if it is in place.

    Flower's feeder polls the LinkState every 0.1 s, so each train and each evaluate phase
    waited 50 ms on average before any client started. This replaces that function of
    ``flwr.server.superlink.fleet.vce.vce_api`` (Flower 1.42, which the project pins; it is
    looked up when the engine starts), and leaves Flower alone where the function is gone.
    """
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        return False
    vce_api.add_messages_to_queue = _prompt_feeder  # type: ignore[assignment]
    return True


class SharedModelGrid:
    """A simulation Grid whose outgoing messages carry shared ArrayRecords, and which wakes
    the prompt feeder after every push. Everything else, ``pull_interval`` included, is the
    wrapped grid's."""

    def __init__(self, grid: Any) -> None:
        self.__dict__["grid"] = grid
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

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` passes (the
        Grid's contract, as Flower's grids keep it)."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.grid.pull_interval)
        return replies
