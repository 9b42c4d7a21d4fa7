"""Load: simulations with 10, 50 and 100 clients (10% of them per round), memory and time.

For each client count, ``simulate.py`` runs in a child process (its own Ray instance on
127.0.0.1, 1 CPU per client actor, so as many actors as cores) with the default model
(FedAvg, MLP, CIFAR-10 default data), ``--fraction 0.1`` for training and for client
evaluation. Every 0.2 s this script reads /proc for the child and all its descendants (the
driver, Ray's GCS, raylet and workers) and records the largest sum of their resident set
sizes (RSS; shared pages count once per process, so this overstates the memory really in
use) and of their proportional set sizes (PSS, shared pages split among the sharers).
Round times come from the run's ``rounds.jsonl``: the first round (which also starts the
actors and loads their data) and the mean of the later ones.

    python benchmarks/load.py                        # writes "## Load" in docs/BENCHMARKS.md
    python benchmarks/load.py --clients 10 --rounds 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]

from report import provenance, write_section  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS bytes, PSS bytes, processes) summed over ``root`` and its descendants."""
    tree = _children()
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(tree.get(pid, []))
    rss = pss = 0
    for pid in seen:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    return rss, pss, len(seen)


class PeakSampler(threading.Thread):
    """Samples :func:`tree_memory` of ``pid`` until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss, pss, n = tree_memory(self.pid)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, n)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_one(clients: int, rounds: int, fraction: float, out: Path) -> dict:
    """One simulation in a child process; its memory peaks and round times."""
    cmd = [
        sys.executable, str(REPO / "simulate.py"), "--no-progress",
        "--clients", str(clients),
        "--rounds", str(rounds),
        "--fraction", str(fraction),
        "--fraction-evaluate", str(fraction),
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = PeakSampler(proc.pid)
    sampler.start()
    try:
        output, _ = proc.communicate()
    finally:
        sampler.stop()
        if proc.poll() is None:  # interrupted: stop what we started
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"simulate.py --clients {clients} failed:\n{output[-3000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    later = [r["seconds"] for r in rows[1:]]
    return {
        "clients": clients,
        "per_round": max(1, int(clients * fraction)),
        "rounds": len(rows),
        "first_round_s": rows[0]["seconds"],
        "later_round_s": statistics.mean(later) if later else None,
        "wall_s": wall,
        "peak_rss_mib": sampler.peak_rss / 2**20,
        "peak_pss_mib": sampler.peak_pss / 2**20,
        "processes": sampler.peak_procs,
        "final_test_accuracy": rows[-1]["test_accuracy"],
    }


def render(results: list[dict], rounds: int, fraction: float) -> str:
    lines = [
        provenance(),
        f"`simulate.py` (FedAvg, MLP, CIFAR-10 default data, 1 local epoch) with "
        f"`--fraction {fraction:g} --fraction-evaluate {fraction:g} --rounds {rounds}`, one "
        f"Ray actor per core ({os.cpu_count()} cores). Peak memory is the largest sum over the "
        "simulation's whole process tree (driver, Ray GCS, raylet, workers) sampled from "
        "/proc every 0.2 s: RSS counts shared pages once per process (an upper bound), PSS "
        "splits them. Round 1 includes starting the actors and loading their data.",
        "",
        "| clients | per round | peak RSS (MiB) | peak PSS (MiB) | processes | round 1 (s) "
        "| later rounds, mean (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        later = f"{r['later_round_s']:.1f}" if r["later_round_s"] is not None else "n/a"
        lines.append(
            f"| {r['clients']} | {r['per_round']} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_pss_mib']:.0f} | {r['processes']} | {r['first_round_s']:.1f} | "
            f"{later} | {r['wall_s']:.0f} |"
        )
    first, last = results[0], results[-1]
    if len(results) > 1:
        factor = last["clients"] / first["clients"]
        growth = last["peak_pss_mib"] / first["peak_pss_mib"]
        lines += [
            "",
            f"From {first['clients']} to {last['clients']} clients ({factor:g}x) peak PSS grows "
            f"{growth:.2f}x: only the sampled clients run, on a fixed pool of actors (one per "
            "core), so memory depends on the actors and the model far more than on the number "
            "of clients. Later rounds take longer as more clients are sampled per round; "
            "round 1 also asks every node its partition id (one small query message each, "
            "for reproducible sampling) and starts the actors.",
        ]
    load = os.getloadavg()[0]
    lines += [
        "",
        f"Load average when this finished: {load:.1f} on {os.cpu_count()} cores"
        + (
            " (more than the cores: other jobs shared the machine, and times on an idle "
            "machine are lower)."
            if load > (os.cpu_count() or 1)
            else "."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        for n in args.clients:
            result = run_one(n, args.rounds, args.fraction, Path(tmp) / f"c{n}")
            print(json.dumps(result), flush=True)
            results.append(result)
    body = render(results, args.rounds, args.fraction)
    print(body)
    if not args.no_write:
        write_section(args.out, "Load", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
