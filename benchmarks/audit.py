"""Auditor overhead: how much an audit slows the rounds, and how far its results lag behind.

Runs ``simulate.py --clients 10`` (FedAvg, MLP, CIFAR-10) with and without
``--audit ig`` at a fixed budget, alternating the two so that machine noise hits both alike,
and reports the median round time of each (round 1, which includes Ray's start-up, is left
out), their ratio, how long after a round's updates arrived its audit results were all
written (the lag), and whether any audit was lost (dropped, timed out, failed).

    python benchmarks/audit.py                 # writes "Auditor overhead" in docs/BENCHMARKS.md
    python benchmarks/audit.py --rounds 4 --repeats 1 --no-write    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import provenance, write_section  # noqa: I001  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def simulate(out: Path, rounds: int, clients: int, audit: list[str]) -> dict:
    """One simulation; its per-round times, audit rows and total wall time."""
    cmd = [sys.executable, "simulate.py", "--clients", str(clients), "--rounds", str(rounds)]
    cmd += ["--no-progress", "--out", str(out), *audit]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    rounds_rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    leakage = out / "leakage.jsonl"
    audit_rows = (
        [json.loads(line) for line in leakage.read_text().splitlines()] if leakage.exists() else []
    )
    return {"seconds": [r["seconds"] for r in rounds_rows], "audit": audit_rows, "wall": wall}


def lags(rows: list[dict]) -> dict[int, float]:
    """Per audited round: seconds from its updates' arrival to its last audit result."""
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r)
    return {
        rnd: max(r["finished_at"] for r in rs) - min(r["submitted_at"] for r in rs)
        for rnd, rs in sorted(by_round.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="plain/audited pairs")
    parser.add_argument("--attack", default="ig")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--audit-clients", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--output", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()

    audit_flags = [
        "--audit", args.attack,
        "--audit-iterations", str(args.iterations),
        "--audit-clients", str(args.audit_clients),
        "--audit-time-limit", str(args.time_limit),
        "--no-audit-ground-truth",  # as in deployment: the cost of attacking, not of scoring
    ]  # fmt: skip
    plain_rounds: list[float] = []
    audit_rounds: list[float] = []
    lag_values: list[float] = []
    walls: dict[str, list[float]] = {"plain": [], "audit": []}
    lost, expected, seconds = 0, 0, []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        for i in range(args.repeats):
            for name, flags in (("plain", []), ("audit", audit_flags)):
                out = Path(tmp) / f"{name}{i}"
                res = simulate(out, args.rounds, args.clients, flags)
                walls[name].append(res["wall"])
                (audit_rounds if flags else plain_rounds).extend(res["seconds"][1:])
                if flags:
                    rows = res["audit"]
                    want = args.rounds * min(args.audit_clients, args.clients)
                    expected += want
                    lost += sum(r["status"] != "ok" for r in rows) + max(0, want - len(rows))
                    seconds += [r["seconds"] for r in rows if r["status"] == "ok"]
                    lag_values.extend(lags(rows).values())
                loads.append(os.getloadavg()[0])
                print(f"{name} run {i}: rounds {res['seconds']} wall {res['wall']:.1f} s")
    plain = statistics.median(plain_rounds)
    audited = statistics.median(audit_rounds)
    ratio = audited / plain
    body = provenance() + "\n"
    body += (
        f"`simulate.py --clients {args.clients} --rounds {args.rounds}` (FedAvg, MLP, CIFAR-10, "
        f"2 Ray client actors on this machine) with and without `--audit {args.attack} "
        f"--audit-iterations {args.iterations} --audit-clients {args.audit_clients} "
        f"--audit-time-limit {args.time_limit:g} --no-audit-ground-truth`, {args.repeats} "
        "alternating pair(s). Round times: median over rounds 2.. (round 1 includes Ray's "
        "start-up). Lag: from a round's updates reaching the server to its last audit result.\n\n"
        "| | median round (s) | whole run incl. start-up and final wait (s) |\n"
        "|---|---|---|\n"
        f"| no audit | {plain:.2f} | {statistics.median(walls['plain']):.1f} |\n"
        f"| `--audit {args.attack}` | {audited:.2f} | {statistics.median(walls['audit']):.1f} |\n\n"
        f"Round time with the audit: **{ratio:.2f}x** (target <= 1.25x). "
        f"One attack run: median {statistics.median(seconds):.1f} s. "
        f"Audit lag: median {statistics.median(lag_values):.1f} s, max {max(lag_values):.1f} s "
        f"(= {max(lag_values) / audited:.1f} rounds). "
        f"Audits lost (dropped, timed out or failed): {lost} of {expected}.\n\n"
        f"1-minute load average during the runs (all processes on the machine, "
        f"{os.cpu_count()} CPUs): {min(loads):.1f} to {max(loads):.1f}.\n\n"
        "How to read it: the attack workers run at nice 19, so on busy CPUs training wins and "
        "the audit waits. Rounds stay nearly as fast; the audit lags behind instead and "
        "catches up in the final wait (`--audit-wait`), which is why the audited run takes "
        "longer as a whole. Whenever one round's attacks cost more CPU time than a round "
        "leaves idle, the lag grows with the run; past `max_pending` (16) queued jobs new "
        "ones would be dropped and counted. To keep up, audit fewer clients "
        "(`--audit-clients`), fewer rounds (`--audit-every`) or fewer iterations.\n"
    )
    print(body)
    if not args.no_write:
        write_section(args.output, "Auditor overhead", body)


if __name__ == "__main__":
    main()
