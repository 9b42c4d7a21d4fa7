"""Test-only fault injection: a Flower mod that makes chosen clients fail, and a ClientApp
with it around the production functions.

The production ClientApp (``precode_flower.clients.client_app``) has no fault hook: nothing
a server sends can make it fail on purpose. Tests build :func:`faulty_client_app` instead,
with the faults fixed on the client side (``spec``), and run it in-process or in a Ray
simulation (``tests/faulty_simulate.py``).

``spec``: comma list of ``kind:partition-id[:round]``. Kinds: ``raise`` (RuntimeError),
``nan``/``inf`` (one entry of the first array), ``shape`` (the first array one row short),
``missing`` (the first array dropped), ``scale`` (every float array times 1e6), ``dtype``
(float64), ``hang`` (the reply is held for the round timeout + 5 s: it misses the round),
``never`` (the client never returns).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from precode_flower.clients import client_app as production
from precode_flower.strategies.ray_transport import share_arrays

FAULTS: tuple[str, ...] = (
    "raise", "nan", "inf", "shape", "missing", "scale", "dtype", "hang", "never",
)  # fmt: skip


def parse_faults(spec: str) -> list[tuple[str, int, int | None]]:
    """``"nan:1,raise:2:3"`` -> [("nan", 1, None), ("raise", 2, 3)] (kind, partition, round)."""
    out = []
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in FAULTS:
            raise ValueError(
                f"bad fault item {item!r}; expected kind:partition[:round] with kind one of: "
                f"{', '.join(FAULTS)}"
            )
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return out


def _corrupt(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    first = next(iter(arrays))
    if kind in ("nan", "inf"):
        arrays[first].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        arrays[first] = arrays[first][:-1]
    elif kind == "missing":
        del arrays[first]
    elif kind == "scale":
        arrays = {
            k: v * 1e6 if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()
        }
    elif kind == "dtype":
        arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
    return arrays


def fault_mod(spec: str):  # noqa: ANN201 - a Flower Mod
    """A Flower mod applying ``spec`` to this node's train replies."""
    faults = parse_faults(spec)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        config = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        server_round = int(config["server-round"])
        mine = [k for k, p, r in faults if p == pid and (r is None or r == server_round)]
        if "raise" in mine:
            raise RuntimeError(f"injected fault: partition {pid} raises")
        while "never" in mine:
            time.sleep(3600)
        reply = call_next(msg, context)
        corrupting = [k for k in mine if k not in ("hang", "never")]
        if corrupting:
            arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
            for kind in corrupting:
                arrays = _corrupt(arrays, kind)
            reply.content["arrays"] = share_arrays(arrays)
        if "hang" in mine:
            time.sleep(float(config["round-timeout"]) + 5.0)  # misses the round
        return reply

    return mod


def faulty_client_app(spec: str) -> ClientApp:
    """The production ClientApp's functions behind :func:`fault_mod`."""
    app = ClientApp(mods=[fault_mod(spec)])
    app.train()(production.train)
    app.evaluate()(production.evaluate)
    app.query()(production.query)
    return app
