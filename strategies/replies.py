"""Collecting replies to messages already pushed (``Grid.send_and_receive`` in two steps),
and letting them go once they are aggregated.

Flower's grids push a phase's messages and then pull until every reply is in, one phase at
a time. Split into ``grid.push_messages`` and :func:`collect_replies`, a server can have two
phases in flight: :func:`~precode_flower.federation.rounds.train_rounds` sends round r's
evaluation and round r+1's training together, so the clients never wait for the server
between the two. :func:`release_arrays` frees a round's updates as soon as they are aggregated
(:class:`~strategies.observed.Observed` calls it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message

__all__ = ["FLOWER_PULL_INTERVAL", "collect_replies", "poll_replies", "release_arrays"]

# How often Flower's own gRPC grid asks the SuperLink for replies (it has no attribute for
# it); grids that have a ``pull_interval`` (the simulation's in-memory grid) use theirs.
FLOWER_PULL_INTERVAL = 3.0


def poll_replies(
    pull: Callable[[set[str]], Iterable[Message]],
    message_ids: Iterable[str],
    timeout: float | None,
    pause: float,
    wakeup: threading.Event | None = None,
) -> list[Message]:
    """Pull until every message in ``message_ids`` has its reply or ``timeout`` seconds have
    passed (None: no limit), waiting ``pause`` seconds between pulls, or less where
    ``wakeup`` is set (it is cleared before each pull, so a reply stored during the pull
    ends the next wait at once). Returns the replies in the order they came."""
    pending = set(message_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        if wakeup is not None:
            wakeup.clear()
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        wait = pause if deadline is None else min(pause, deadline - now)
        if wakeup is not None:
            wakeup.wait(wait)
        else:
            time.sleep(wait)
    return replies


def collect_replies(
    grid: object, message_ids: Iterable[str], timeout: float | None
) -> list[Message]:
    """The replies to messages pushed with ``grid.push_messages``, as
    ``grid.send_and_receive`` would have returned them after its push.

    A grid with a ``receive(message_ids, timeout=...)`` method (the simulation's
    :class:`~strategies.ray_transport.SharedModelGrid`, woken by each reply) does it itself;
    any other Flower grid is polled at its ``pull_interval`` (Flower's gRPC grid: every
    :data:`FLOWER_PULL_INTERVAL` seconds, as its ``send_and_receive`` does).
    """
    receive = getattr(grid, "receive", None)
    if callable(receive):
        return list(receive(message_ids, timeout=timeout))
    pause = getattr(grid, "pull_interval", FLOWER_PULL_INTERVAL)
    return poll_replies(grid.pull_messages, message_ids, timeout, pause)  # type: ignore[attr-defined]


def release_arrays(messages: Iterable[Message], keep: ArrayRecord | None = None) -> None:
    """Empty the array records in the content of messages the server is done with.

    Flower's ``RecordDict.array_records`` (and ``metric_records``, ``config_records``)
    returns a view that refers back to the ``RecordDict`` in a reference cycle, and
    Flower's strategies read every reply through such views. A reply read that way outlives
    its last reference until Python's cyclic garbage collector runs, and its arrays with
    it: in a simulation, a client's update in Ray's object store. Rounds of such updates
    filled the store, and Ray then held every new update for 2 s before spilling it to
    disk. Emptied, the records let the arrays go with the round's last reference to them.
    NumPy views taken earlier (an observer's, the auditor's) stay valid. ``keep``: a record
    to leave whole (the aggregate, should a strategy return a reply's own record).
    """
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.values():
            if isinstance(record, ArrayRecord) and record is not keep:
                record.clear()
