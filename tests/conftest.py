"""Shared fixtures: an isolated Flower/Ray environment, free ports, in-process Flower messaging."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def flower_env() -> Iterator[Path]:
    """Telemetry off; Flower's home and Ray's temp dir in a fresh, short tmp dir.

    Short because Ray puts unix sockets under its temp dir (path limit ~107 bytes).
    """
    root = Path(tempfile.mkdtemp(prefix="pf-"))
    env = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_HOME": str(root / "flwr"),
        "RAY_TMPDIR": str(root / "ray"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    (root / "flwr").mkdir()
    (root / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for as many distinct free ports as needed."""
    given: set[int] = set()

    def take() -> int:
        while (port := find_free_port()) in given:
            pass
        given.add(port)
        return port

    return take


@contextlib.contextmanager
def _fixed_task_identity() -> Iterator[None]:
    """Flower's TaskIdentity, which strategies need to build messages outside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def task_identity() -> Iterator[None]:
    """A fixed TaskIdentity for one test (strategies build messages outside a ServerApp)."""
    with _fixed_task_identity():
        yield


@pytest.fixture(scope="module")
def module_task_identity() -> Iterator[None]:
    """The same for module-scoped fixtures."""
    with _fixed_task_identity():
        yield


def make_message(content, message_type: str, *, src: int = 1, dst: int = 5, round_: int = 1):
    """An instruction Message with explicit metadata (no TaskIdentity needed)."""
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=7,
        message_id=f"m-{src}-{dst}-{round_}-{time.monotonic_ns()}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id=str(round_),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


class InProcessGrid:
    """A Flower Grid stand-in that runs a ClientApp in this process, one node per partition.

    ``faulty`` maps a node id to a function rewriting that node's train replies (or raising).
    """

    def __init__(self, client_app, num_nodes: int, *, faulty=None, node_config=None) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.node_ids = [101 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=7,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.faulty = faulty or {}
        self.sent: list = []
        self.replies: dict = {}  # message id -> reply, until pulled

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable) -> list[str]:
        """Runs each message's ClientApp now; its reply waits for :meth:`pull_messages`."""
        from flwr.app import Error, Message

        ids = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            # The reply must point back at a message with an id, as the SuperLink assigns.
            msg_id = f"in-{nid}-{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            try:
                reply = self.app(msg, self.contexts[nid])
                if nid in self.faulty and msg.metadata.message_type == "train":
                    reply = self.faulty[nid](reply)
            except Exception as err:  # as the simulation engine: an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if reply is not None:  # None: the node dropped out
                self.replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list:
        got = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        # Replies arrive in an order unrelated to the request order.
        return got[::-1]

    def receive(self, message_ids: Iterable[str], *, timeout: float | None = None) -> list:
        # Every reply there will be is in once push_messages returns: no waiting for more.
        return self.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        return self.receive(self.push_messages(messages), timeout=timeout)


@pytest.fixture
def inprocess_grid() -> type[InProcessGrid]:
    return InProcessGrid


# --- docs/RELIABILITY.md: the fault table is rendered from what the tests observed ---------

_RELIABILITY_ROWS: list[dict] = []
_REPORTS: dict[str, str] = {}


@pytest.fixture
def reliability(request):
    """``reliability(fault, injection, observed)`` records one row of docs/RELIABILITY.md.

    ``observed`` must be built from the values the test checked. With
    ``PRECODE_RELIABILITY_TABLE=docs/RELIABILITY.md`` the session renders the table there
    (``tools/reliability_table.py``), with each row's test outcome.
    """

    def record(fault: str, injection: str, observed: str) -> None:
        _RELIABILITY_ROWS.append(
            {
                "fault": fault,
                "injection": injection,
                "observed": observed,
                "test": request.node.nodeid,
            }
        )

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" or report.outcome != "passed":
        _REPORTS[item.nodeid] = report.outcome
    return report


def pytest_sessionfinish(session, exitstatus) -> None:
    target = os.environ.get("PRECODE_RELIABILITY_TABLE")
    if not target or not _RELIABILITY_ROWS:
        return
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "reliability_table", Path(__file__).resolve().parents[1] / "tools/reliability_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{**r, "outcome": _REPORTS.get(r["test"], "unknown")} for r in _RELIABILITY_ROWS]
    Path(target).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    module.write_table(rows, Path(target))


@pytest.fixture
def run_simulate() -> Callable[..., subprocess.CompletedProcess]:
    """Runs ``python simulate.py --no-progress ARGS`` from the repository, output captured;
    ``faults="kind:partition[:round],..."`` runs it with the test-only fault-injecting
    ClientApp instead (tests/faults.py, through tests/faulty_simulate.py)."""

    def run(args: list[str], timeout: float, faults: str | None = None):
        script = ["simulate.py"]
        if faults is not None:
            script = [str(REPO / "tests" / "faulty_simulate.py"), "--faults", faults]
        return subprocess.run(
            [sys.executable, *script, "--no-progress", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
