"""Deployment: a SuperLink and two SuperNodes on 127.0.0.1, the run submitted by server.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import server
from precode_flower import task
from precode_flower.processes import session_pids, stop_sessions

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_pyproject_declares_the_flower_app_and_every_run_config_key() -> None:
    flwr = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "precode_flower.federation.app:app",
        "clientapp": "precode_flower.clients.client_app:app",
    }
    config = flwr["config"]
    defaults = task.RunConfig().to_config()
    assert {k: config[k] for k in defaults} == defaults
    assert config["out-dir"] == ""
    # Every other key belongs to the auditor, which reads them from the run config.
    assert {k for k in config if k not in defaults} - {"out-dir", "resume", "overwrite"} <= {
        "audit",
        "audit-every",
        "audit-clients",
        "audit-iterations",
        "audit-time-limit",
        "audit-device",
        "audit-wait",
        "audit-memory-gb",
    }


def test_server_cli_flags_and_connection_config(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        server.cli(["--model", "vgg"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convnet" in err
    with pytest.raises(SystemExit):
        server.cli(["--superlink", "127.0.0.1:1"])  # neither --insecure nor TLS
    assert "--insecure" in capsys.readouterr().err
    toml = tomllib.loads(
        server.flwr_config_toml("10.0.0.1:9093", insecure=False, root_certificates="ca.pem")
    )
    assert toml["superlink"]["default"] == "target"
    target = toml["superlink"]["target"]
    assert target["address"] == "10.0.0.1:9093"
    assert target["root-certificates"] == str(Path("ca.pem").resolve())
    assert "insecure" not in target


@dataclass
class Federation:
    """Processes of a local deployment, each the leader of its own session."""

    root: Path
    link_port: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        with log.open("w") as fh:
            self.procs.append(
                subprocess.Popen(
                    args,
                    cwd=self.root,
                    # One torch thread per process: three processes share this machine's
                    # cores, and oversubscribed OpenMP threads slow torch down many times.
                    env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.logs.append(log)

    def wait_for(self, name: str, text: str, count: int = 1, timeout: float = 60) -> None:
        log = self.root / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.read_text().count(text) >= count:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        raise AssertionError(f"{name} did not log {text!r}:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in self.logs)

    def stop(self) -> None:
        """SIGTERM every session we started, then SIGKILL whatever is left in them."""
        stop_sessions([p.pid for p in self.procs], grace=8)  # a test needs no graceful exit
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def federation(tmp_path, free_port) -> Iterator[Federation]:
    """flower-superlink + 2 flower-supernode on 127.0.0.1 (insecure), stopped afterwards.

    The SuperNodes read a small copy of the embedded CIFAR-10 default through
    ``--node-config data-dir=...``: the app's FAB carries only source files.
    """
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    shutil.copy(
        REPO / "precode_flower" / "embedded" / "cifar10_default.npz", data / "cifar10_subset.npz"
    )
    fed = Federation(tmp_path, free_port())
    try:
        fed.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host", "127.0.0.1",
                "--port", str(fed.link_port),
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        fed.wait_for("superlink", "Uvicorn running on")
        for i in range(2):
            fed.start(
                f"supernode{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink", f"127.0.0.1:{fed.link_port}",
                    "--port", str(free_port()),
                    "--node-config",
                    f'partition-id={i} num-partitions=2 data-dir="{tmp_path / "data"}"',
                ],
            )  # fmt: skip
        fed.wait_for("superlink", "Activated node_id", count=2)
        yield fed
    finally:
        fed.stop()
        leftovers = [pid for p in fed.procs for pid in session_pids(p.pid)]
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.slow
def test_two_rounds_on_a_local_deployment(federation: Federation) -> None:
    out = federation.root / "run"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "server.py"),
            "--superlink", f"127.0.0.1:{federation.link_port}",
            "--insecure",
            "--clients", "2",
            "--rounds", "2",
            "--local-steps", "1",
            "--data-dir", str(federation.root / "data"),
            "--out", str(out),
        ],
        cwd=federation.root,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + federation.tail()
    assert "finished:completed" in proc.stdout
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and r["rejected"] == 0 and r["failed"] == 0 for r in rows)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert json.loads((out / "config.json").read_text())["local-steps"] == 1
    assert (out / "model.pt").exists() and (out / "accuracy.png").exists()
