"""--secagg in deployment: Flower's SecAgg+ between a SuperLink and two SuperNodes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_deployment import REPO, Federation, federation  # noqa: F401 (the fixture)


@pytest.mark.slow
def test_secagg_rounds_on_a_local_deployment(federation: Federation) -> None:  # noqa: F811
    out = federation.root / "run"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "server.py"),
            "--superlink", f"127.0.0.1:{federation.link_port}",
            "--insecure",
            "--secagg",
            "--clients", "2",
            "--rounds", "1",  # ~3 min here, mostly starting the deployment
            "--local-steps", "1",
            "--round-timeout", "120",
            "--data-dir", str(federation.root / "data"),
            "--out", str(out),
        ],
        cwd=federation.root,
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + federation.tail()
    assert "finished:completed" in proc.stdout
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert all(r["clients"] == 2 and r["skipped"] is None and r["failed"] == 0 for r in rows)
    assert json.loads((out / "config.json").read_text())["defenses"] == "secagg"
