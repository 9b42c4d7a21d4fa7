"""Secure deployment on 127.0.0.1: TLS everywhere, SuperNode authentication, a node killed
mid-run; and the CLI's refusal to talk plain text unless told to."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import server
from precode_flower.processes import session_pids, signal_session, stop_sessions

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = REPO / "tools" / "make_certs.sh"


def _env(**extra: str) -> dict[str, str]:
    # The Flower executables start each other by name (flower-superexec, flwr-clientapp).
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": "", **extra}


def test_make_certs_creates_a_ca_signed_loopback_certificate(tmp_path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(certs), "1"], check=True, capture_output=True)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.pem"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in san and "DNS:localhost" in san
    for key in ("ca.key", "server.key", "node_0"):  # private keys are owner-only
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    assert (certs / "node_0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run(["bash", str(MAKE_CERTS), str(certs)], capture_output=True, text=True)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_server_cli_refuses_plain_text_unless_insecure(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        server.cli(["--superlink", "127.0.0.1:1"])
    assert exc.value.code == 2
    assert "refusing to connect without TLS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        server.cli(["--insecure", "--root-certificates", str(tmp_path / "ca.crt")])
    assert "contradict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        server.cli(["--root-certificates", str(tmp_path / "missing.crt")])
    assert "no such file" in capsys.readouterr().err
    # --insecure is accepted, with a warning (the submission itself fails: nothing listens).
    code = server.cli(["--insecure", "--superlink", "127.0.0.1:9", "--no-stream"])
    assert code != 0
    assert server.INSECURE_WARNING in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A TLS + node-auth deployment


@dataclass
class Processes:
    """Processes we start, each leading its own session; stopped by session id."""

    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("w") as log:
            self.procs[name] = subprocess.Popen(
                args,
                cwd=self.root,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_for(self, name: str, text: str, count: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(name).count(text) >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{name} did not log {text!r}:\n{self.tail()}")

    def tail(self, n: int = 2500) -> str:
        return "\n".join(f"--- {k}\n{self.log(k)[-n:]}" for k in self.procs)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        signal_session(self.procs[name].pid, sig)

    def stop(self) -> None:
        stop_sessions([p.pid for p in self.procs.values()], grace=15)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def secure_federation(tmp_path, free_port) -> Iterator[tuple[Processes, Path, int]]:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(certs), "3"], check=True, capture_output=True)
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    (data / "cifar10_subset.npz").write_bytes(
        (REPO / "precode_flower" / "embedded" / "cifar10_default.npz").read_bytes()
    )
    procs = Processes(tmp_path)
    port = free_port()
    try:
        procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key"),
                "--ssl-ca-certfile", str(certs / "ca.crt"),
                "--enable-supernode-auth",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        procs.wait_for("superlink", "Uvicorn running on https://")
        yield procs, certs, port
    finally:
        procs.stop()
        left = [pid for p in procs.procs.values() for pid in session_pids(p.pid)]
        assert not left, f"processes left running: {left}"


@pytest.mark.slow
def test_tls_authenticated_nodes_train_unregistered_is_rejected_killed_node_is_survived(
    secure_federation, free_port, tmp_path, reliability
) -> None:
    procs, certs, port = secure_federation
    link = f"127.0.0.1:{port}"
    # The Control API over TLS: flwr's connection config names the CA.
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        server.flwr_config_toml(link, insecure=False, root_certificates=str(certs / "ca.crt"))
    )
    for i in (0, 1):  # node_2 stays unregistered
        reg = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(certs / f"node_{i}.pub"), "target"],
            env=_env(FLWR_HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout
    data_dir = tmp_path / "data"
    for i in range(3):
        procs.start(
            f"supernode{i}",
            [
                str(BIN / "flower-supernode"),
                "--root-certificates", str(certs / "ca.crt"),
                "--superlink", link,
                "--auth-supernode-private-key", str(certs / f"node_{i}"),
                "--port", str(free_port()),
                "--node-config", f'partition-id={i} num-partitions=3 data-dir="{data_dir}"',
            ],
        )  # fmt: skip
    procs.wait_for("superlink", "Activated node_id", count=2)
    # The unregistered node is refused and gives up (Flower's exit code 305, logged; the
    # process itself exits with 1).
    assert procs.procs["supernode2"].wait(timeout=90) != 0, procs.log("supernode2")
    assert "Exit Code: 305" in procs.log("supernode2")
    assert "Failed to activate SuperNode" in procs.log("supernode2")
    assert "No SuperNode found with the given public key" in procs.log("superlink")
    # Nothing of ours listens beyond loopback.
    listening = _listen_addresses(procs)
    assert listening and all(addr in LOOPBACK for addr, _ in listening), listening

    out = tmp_path / "run"
    run = subprocess.Popen(
        [
            sys.executable, str(REPO / "server.py"),
            "--superlink", link,
            "--root-certificates", str(certs / "ca.crt"),
            "--clients", "2",
            "--rounds", "2",
            "--local-steps", "1",
            "--round-timeout", "60",
            "--data-dir", str(data_dir),
            "--out", str(out),
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        rounds = out / "rounds.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if rounds.exists() and rounds.read_text().count("\n") >= 1:
                break
            time.sleep(0.5)
        procs.kill("supernode1")  # gone without a goodbye, mid-run
        stdout, _ = run.communicate(timeout=300)
    finally:
        signal_session(run.pid, signal.SIGKILL)
    assert run.returncode == 0, stdout[-3000:] + procs.tail()
    assert "finished:completed" in stdout
    first, second = [json.loads(line) for line in rounds.read_text().splitlines()]
    assert first["clients"] == 2 and first["failed"] == first["dropped"] == 0
    # The killed node: no reply before the timeout, or the SuperLink's "node unavailable"
    # error once its heartbeat lapsed; counted once either way, named by partition.
    assert second["clients"] == 1 and second["failed"] + second["dropped"] == 1, second
    (lost,) = second["failures"] + second["dropped_nodes"]
    assert lost["partition_id"] == 1
    reliability(
        "TLS + SuperNode authentication",
        "SuperLink with `--ssl-*` and `--enable-supernode-auth`; 2 keys registered with "
        "`flwr supernode register`; SuperNodes with `--root-certificates` and "
        "`--auth-supernode-private-key`; run submitted by `server.py --root-certificates`",
        f"both authenticated nodes trained round 1 ({first['clients']} replies); the run "
        "finished:completed",
    )
    reliability(
        "unregistered SuperNode",
        "a SuperNode with a valid key that was never registered",
        "activation refused by the SuperLink (`No SuperNode found with the given public "
        "key`); the SuperNode gives up (Flower's `Exit Code: 305` in its log, the process exits "
        "non-zero) and never receives a message",
    )
    how = "no reply before the timeout" if second["dropped"] else "error reply"
    reliability(
        "SuperNode killed mid-run",
        "SIGKILL of a SuperNode's whole process group after round 1",
        f"round 2 lost only that node ({how}, node {lost['node_id']}, partition 1) and "
        f"aggregated the other {second['clients']} reply in {second['seconds']:.0f} s; "
        "the run completed",
    )


#: /proc/net/tcp{,6} spellings of 127.0.0.1, ::1 and ::ffff:127.0.0.1.
LOOPBACK = {
    "0100007F",
    "00000000000000000000000001000000",
    "0000000000000000FFFF00000100007F",
}


def _listen_addresses(procs: Processes) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that a process of ours listens on."""
    inodes: set[str] = set()
    for p in procs.procs.values():
        for pid in session_pids(p.pid):
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                addr, port = parts[1].split(":")
                found.append((addr, int(port, 16)))
    return found
