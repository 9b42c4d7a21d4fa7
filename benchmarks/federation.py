"""Federation overhead: a simulated round versus the same work in a plain PyTorch loop.

In one run, on the default ``simulate.py`` configuration (FedAvg, MLP, CIFAR-10, one local
epoch), with ``--clients`` clients, for each ``--data-source`` (default: the embedded
2,000-image CIFAR-10, then the offline data pack's 10,000 where there is one):

1. Ray start-up: ``ray.init`` of a local 127.0.0.1 instance until its CPUs are visible.
2. The simulation: ``simulate.py`` in this process (Ray actors, 1 CPU each), once per
   ``--transport`` (default: ``fast``, then ``flower``, Flower's engine as it is); per-round
   wall time from its ``rounds.jsonl``.
3. The plain loops: the same rounds without Flower or Ray: every client's update
   (:func:`precode_flower.task.compute_update`), a FedAvg mean, every client's evaluation
   and the central evaluation, in this process; once with the clients on as many threads
   as cores with one torch thread each (the actors' resources, without their processes),
   once one client at a time with torch on every core. Both are scheduled as the server
   schedules a round: round r's evaluations are queued ahead of round r+1's updates.
4. Memory: a second, shorter simulation (3 rounds) per transport, ``python simulate.py``
   in a child process, sampled from /proc every 0.2 s.

Steps 2 (every transport) and 3 alternate ``--repeats`` times, so that the load of the
shared host, which drifts over minutes, weighs on both sides alike.

The overhead ratio of a repeat is the simulated round's time over the faster plain loop's,
medians of the rounds after the first (it also starts the actors and loads each actor's
data); the figure is the median of the repeats' ratios.
Peak memory is the largest sum, over the memory run's ``simulate.py`` process and all its
descendants (Ray's GCS, raylet, workers), of the resident set size and of the proportional
set size (PSS, which splits shared pages among the processes sharing them). It is measured
in a run of its own because sampling it slows the simulation it samples.

    python benchmarks/federation.py                 # writes docs/BENCHMARKS.md
    python benchmarks/federation.py --clients 4 --rounds 3 --repeats 1 \
        --data-source embedded --transport flower --no-write
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
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

# A local Ray instance listening on 127.0.0.1 only (see simulate.py); before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import torch  # noqa: E402
from report import provenance, write_section  # noqa: E402

import simulate  # noqa: E402
from precode_flower import data as data_mod  # noqa: E402
from precode_flower import task  # noqa: E402
from precode_flower.training import evaluate  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------
# Memory of the process tree, from /proc


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = rss
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError):
        return 0, 0


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "driver (simulate.py: ServerApp)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "ClientAppActor" in cmd:
        return "client actors"
    return "Ray system processes"


class TreeMemory:
    """Samples the RSS and PSS sums of the process tree under ``root`` in a background
    thread.

    Also keeps, per role (driver, client actors, Ray's own processes), the PSS at the
    moment of the overall PSS peak.
    """

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.peak_roles: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.root)
            sizes = {p: _rss_pss(p) for p in pids}
            pss = sum(v for _, v in sizes.values())
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes.values()))
            self.peak_procs = max(self.peak_procs, len(pids))
            if pss > self.peak_pss:
                self.peak_pss = pss
                roles: dict[str, int] = {}
                for p, (_, v) in sizes.items():
                    role = _role(p, self.root)
                    roles[role] = roles.get(role, 0) + v
                self.peak_roles = roles
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# The three measurements


def torch_import_cost() -> int:
    """Private (anonymous) bytes a fresh Python process holds after ``import torch`` alone."""
    code = (
        "import torch\n"
        "for line in open('/proc/self/smaps_rollup'):\n"
        "    if line.startswith('Pss_Anon:'): print(int(line.split()[1]) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def ray_startup(temp_dir: str) -> float:
    """Seconds from ``ray.init`` of a local instance until its CPUs are visible."""
    import ray

    init_args = simulate.backend_config(ray_address=None, temp_dir=temp_dir, client_cpus=1.0)
    started = time.perf_counter()
    ray.init(**init_args["init_args"])
    while not ray.cluster_resources().get("CPU"):
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    ray.shutdown()
    return elapsed


def _simulate_args(
    clients: int,
    rounds: int,
    out: Path,
    temp_dir: str,
    client_cpus: float,
    data_source: str,
    transport: str,
) -> list[str]:
    """``simulate.py``'s flags for a benchmark run: its defaults but for these."""
    return [
        "--transport", transport,
        "--clients", str(clients),
        "--rounds", str(rounds),
        "--out", str(out),
        "--ray-temp-dir", temp_dir,
        "--client-cpus", str(client_cpus),
        "--data-source", data_source,
        "--no-progress",
    ]  # fmt: skip


def simulated_rounds(
    clients: int,
    rounds: int,
    out: Path,
    temp_dir: str,
    client_cpus: float,
    data_source: str,
    transport: str,
) -> list[float]:
    """Per-round seconds of ``simulate.py`` with its defaults (and ``--data-source``,
    ``--transport``; ``flower`` after ``fast`` in this process restores Flower's engine)."""
    code = simulate.main(
        _simulate_args(clients, rounds, out, temp_dir, client_cpus, data_source, transport)
    )
    if code != 0:
        raise RuntimeError(f"simulate.py failed with exit status {code}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows]


def simulated_memory(
    clients: int,
    rounds: int,
    out: Path,
    temp_dir: str,
    client_cpus: float,
    data_source: str,
    transport: str,
) -> TreeMemory:
    """Peak memory of ``python simulate.py`` (with its defaults and ``--data-source``) and
    everything it starts, run as a child process."""
    cmd = [
        sys.executable,
        str(REPO / "simulate.py"),
        *_simulate_args(clients, rounds, out, temp_dir, client_cpus, data_source, transport),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        with TreeMemory(proc.pid) as memory:
            output, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # interrupted: stop what we started
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(
            f"simulate.py failed with exit status {proc.returncode}:\n{output[-3000:]}"
        )
    return memory


def plain_rounds(cfg: task.RunConfig, rounds: int, workers: int, threads: int) -> list[float]:
    """The same rounds without Flower or Ray: client updates, FedAvg, evaluations.

    Like the simulation's actors (``threads`` CPUs each, as many as fit the cores),
    ``workers`` threads run the clients, each with its own model, and torch uses
    ``threads`` threads per operation (torch releases the GIL inside operations, so the
    worker threads compute in parallel). Scheduled as
    :func:`precode_flower.federation.rounds.train_rounds` does it:
    round r's client and central evaluations are queued right after its FedAvg, round
    r+1's updates right behind them, and a round ends when its evaluations are in; its
    time is from the previous round's end to its own.
    """
    torch.set_num_threads(max(1, threads))
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    model = task.build_model(cfg, bundle.num_classes, bundle.input_shape, seed=cfg.seed)
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    local = threading.local()

    def worker_model() -> torch.nn.Module:
        if not hasattr(local, "model"):
            local.model = task.build_model(cfg, bundle.num_classes, bundle.input_shape)
        return local.model

    def update(pid: int, state: OrderedDict, server_round: int) -> task.ClientUpdate:
        data = task.client_data(cfg, pid, cfg.clients)
        return task.compute_update(worker_model(), state, data, cfg, server_round)

    def evaluation(pid: int, state: OrderedDict) -> None:
        data = task.client_data(cfg, pid, cfg.clients, with_train=False)
        task.evaluate_client(worker_model(), state, data)

    def central(state: OrderedDict) -> None:
        task.load_state(model, state)
        evaluate(model, bundle.test)

    for pid in range(cfg.clients):  # partition once, as the actors do before round 1 ends
        task.client_data(cfg, pid, cfg.clients)
    times: list[float] = []
    last = time.perf_counter()

    def round_ends(evaluations: list[Future]) -> None:
        nonlocal last
        for f in evaluations:
            f.result()
        now = time.perf_counter()
        times.append(now - last)
        last = now

    with ThreadPoolExecutor(max_workers=workers) as pool:
        evaluations: list[Future] = []  # the previous round's, queued
        for server_round in range(1, rounds + 1):
            pending = [pool.submit(update, p, state, server_round) for p in range(cfg.clients)]
            if evaluations:
                round_ends(evaluations)
            updates = [f.result() for f in pending]
            total = sum(u.num_examples for u in updates)
            state = OrderedDict(
                (k, torch.from_numpy(sum(u.arrays[k] * (u.num_examples / total) for u in updates)))
                for k in state
            )
            evaluations = [pool.submit(central, state)]
            evaluations += [pool.submit(evaluation, p, state) for p in range(cfg.clients)]
        round_ends(evaluations)
    return times


@dataclass
class Measurement:
    data_source: str
    source: str
    train_per_client: int
    # Per repeat, per round (seconds):
    sim: dict[str, list[list[float]]]  # per transport
    plain: list[list[float]]  # clients on threads, one per actor
    sequential: list[list[float]]  # one client at a time, torch on every core
    # Per transport: peak_rss, peak_pss, procs (ints) and roles (PSS by role at the peak).
    memory: dict[str, dict[str, Any]]


MEMORY_ROUNDS = 3  # the memory run: the peak is reached within a round or two


def measure(args: argparse.Namespace, data_source: str, tmp: Path) -> Measurement:
    """Simulate and run the same rounds in the plain loops, ``args.repeats`` times in turn,
    then simulate again for memory.

    Memory is sampled in a run of its own: reading ``smaps_rollup`` walks each process's
    page tables under its memory lock, which slowed the timed simulation (and not the
    plain loop) by up to a fifth. That run is ``python simulate.py`` in a child process,
    the tree a user starts, without this process's data and plain-loop heap.
    """
    sim: dict[str, list[list[float]]] = {t: [] for t in args.transport}
    plain: list[list[float]] = []
    sequential: list[list[float]] = []
    workers = max(1, int((os.cpu_count() or 1) // args.client_cpus))
    for i in range(args.repeats):
        for transport in args.transport:
            run = tmp / f"run-{i}-{transport}"
            sim[transport].append(
                simulated_rounds(
                    args.clients, args.rounds, run, str(tmp / f"ray-{i}-{transport}"),
                    args.client_cpus, data_source, transport,
                )
            )  # fmt: skip
        # The plain loops use exactly the simulated run's config (data included).
        cfg = task.RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
        plain.append(plain_rounds(cfg, args.rounds, workers=workers, threads=int(args.client_cpus)))
        sequential.append(plain_rounds(cfg, args.rounds, workers=1, threads=os.cpu_count() or 1))
        torch.set_num_threads(os.cpu_count() or 1)
    bundle = data_mod.load(cfg.dataset, cfg.data_dir or None)
    memory: dict[str, dict[str, Any]] = {}
    for transport in args.transport:
        peak = simulated_memory(
            args.clients,
            min(args.rounds, MEMORY_ROUNDS),
            tmp / f"memory-run-{transport}",
            str(tmp / f"ray-memory-{transport}"),
            args.client_cpus,
            data_source,
            transport,
        )
        memory[transport] = {
            "peak_rss": peak.peak_rss,
            "peak_pss": peak.peak_pss,
            "procs": peak.peak_procs,
            "roles": dict(peak.peak_roles),
        }
    return Measurement(
        data_source, bundle.source, len(bundle.train) // args.clients, sim, plain, sequential,
        memory,
    )  # fmt: skip


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def steady(m: Measurement, repeat: int, transport: str) -> tuple[float, float]:
    """One repeat's medians of its rounds after the first: the simulation on ``transport``,
    and the faster plain loop.

    Medians, because a burst of load from the shared host spoils a round or two, not the
    figure; the faster plain loop, because the overhead is measured against the best plain
    PyTorch does here.
    """

    def median(times: list[float]) -> float:
        return statistics.median(times[1:])

    plain = min(median(m.plain[repeat]), median(m.sequential[repeat]))
    return median(m.sim[transport][repeat]), plain


def typical(m: Measurement, transport: str) -> int:
    """The repeat whose overhead ratio on ``transport`` is the median of the repeats' (of an
    even number, the higher of the middle two: the figure errs against the simulation)."""
    ratios = [s / p for s, p in (steady(m, i, transport) for i in range(len(m.plain)))]
    return sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]


def transport_section(
    m: Measurement, args: argparse.Namespace, transport: str, gib: float = 1024**3
) -> str:
    pick = typical(m, transport)
    sim_steady, plain_steady = steady(m, pick, transport)
    ratio = sim_steady / plain_steady
    sim = m.sim[transport]
    rows = "\n".join(
        f"| {r} | {s:.2f} | {p:.2f} | {q:.2f} | {s / min(p, q):.2f} |"
        for r, (s, p, q) in enumerate(
            zip(sim[pick], m.plain[pick], m.sequential[pick], strict=True), start=1
        )
    )
    repeats = "\n".join(
        f"| {i + 1} | {s:.2f} | {statistics.median(m.plain[i][1:]):.2f} | "
        f"{statistics.median(m.sequential[i][1:]):.2f} | {s / p:.2f} |"
        for i, (s, p) in enumerate(steady(m, i, transport) for i in range(len(sim)))
    )
    mem = m.memory[transport]
    pss, rss = mem["peak_pss"], mem["peak_rss"]
    breakdown = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in sorted(mem["roles"].items()))
    return f"""\
#### `--transport {transport}`

Each repeat: medians of rounds 2..{args.rounds} (the first also starts the actors).

| repeat | simulated (s) | plain, threads (s) | plain, sequential (s) | ratio to faster plain |
|---|---|---|---|---|
{repeats}

Repeat {pick + 1}, round by round:

| round | simulated (s) | plain, threads (s) | plain, sequential (s) | ratio to faster plain |
|---|---|---|---|---|
{rows}

- Overhead ratio after the first round (the median of the {len(sim)} repeats' ratios,
  each against the faster plain loop): **{ratio:.2f}** ({sim_steady:.2f} s vs
  {plain_steady:.2f} s in repeat {pick + 1}).
- Peak memory of `simulate.py`'s process tree (up to {mem["procs"]} processes):
  **{pss / gib:.2f} GiB PSS** ({pss / 1e9:.2f} GB; {rss / gib:.2f} GiB summed RSS); target
  3 GiB: {verdict(pss <= 3 * gib)}; 3 GB (10^9 bytes): {verdict(pss <= 3e9)}.
  At the peak: {breakdown}.
"""


def section(m: Measurement, args: argparse.Namespace, gib: float = 1024**3) -> str:
    lines = []
    for t in m.sim:
        sim_steady, plain_steady = steady(m, typical(m, t), t)
        lines.append(
            f"| `{t}` | {sim_steady:.2f} | {sim_steady / plain_steady:.2f} | "
            f"{m.memory[t]['peak_pss'] / gib:.2f} | {m.memory[t]['peak_rss'] / gib:.2f} |"
        )
    side = "\n".join(lines)
    return f"""\
### `--data-source {m.data_source}`: {m.train_per_client} training examples per client

Data: `{m.source}`.

Side by side (each transport's typical repeat; round time: the median of rounds
2..{args.rounds}):

| transport | round time (s) | ratio to faster plain | peak PSS (GiB) | peak summed RSS (GiB) |
|---|---|---|---|---|
{side}

{chr(10).join(transport_section(m, args, t) for t in m.sim)}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="rounds (the first is excluded; medians of the rest)",
    )
    parser.add_argument(
        "--client-cpus", type=float, default=1.0, help="CPUs per client actor (simulate.py's)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="simulation and plain loops, in turn, this often"
    )
    parser.add_argument(
        "--data-source",
        action="append",
        choices=("embedded", "auto"),
        help="simulate.py's --data-source; repeatable (default: embedded, then auto)",
    )
    parser.add_argument(
        "--transport",
        action="append",
        choices=("fast", "flower"),
        help="simulate.py's --transport; repeatable (default: fast, then flower)",
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is excluded)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.transport = list(dict.fromkeys(args.transport or ["fast", "flower"]))

    if args.child_json:  # one configuration, in a fresh process (see below)
        with tempfile.TemporaryDirectory(prefix="ray-") as tmp:
            result = measure(args, args.data_source[0], Path(tmp))
        Path(args.child_json).write_text(json.dumps(asdict(result)))
        return

    header = provenance()
    torch_bytes = torch_import_cost()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ray-") as tmp:
        startup = ray_startup(str(Path(tmp) / "startup"))
        results = []
        # Each configuration in its own process, so that memory left by one (cached data,
        # heap) does not count against the next.
        for source in args.data_source or ["embedded", "auto"]:
            child = Path(tmp) / f"{source}.json"
            subprocess.run(
                [
                    sys.executable, __file__,
                    "--clients", str(args.clients),
                    "--rounds", str(args.rounds),
                    "--client-cpus", str(args.client_cpus),
                    "--repeats", str(args.repeats),
                    "--data-source", source,
                    *(f for t in args.transport for f in ("--transport", t)),
                    "--child-json", str(child),
                ],
                check=True,
            )  # fmt: skip
            results.append(Measurement(**json.loads(child.read_text())))
    load_after = os.getloadavg()

    first, transport = results[0], args.transport[0]
    sim_first, plain_first = steady(first, typical(first, transport), transport)
    per_message = (sim_first - plain_first) / (3 * args.clients)
    body = f"""\
{header}
Configuration: `simulate.py` defaults (FedAvg, MLP, CIFAR-10, 1 local epoch, batch 32,
IID), {args.clients} clients, {args.rounds} rounds, {args.repeats} repeats (simulation and
plain loops in turn); Ray actors with {args.client_cpus:g} CPU each on {os.cpu_count()} cores.
The plain loops run the same rounds (client updates, FedAvg, client and central evaluation)
in one process: once with the clients on as many threads as there are actors (one torch
thread each), once one client at a time (torch on all cores).
Both are scheduled as the server schedules rounds: round r's client and central evaluations
are queued right after its FedAvg, round r+1's updates right behind them, and a round's
time runs from the previous round's end to the end of its evaluations. The overlap of
evaluation and the next training thus speeds up both sides, and the ratio counts only what
Flower and Ray add.
Load average (1 min) of the shared machine: {load_before[0]:.1f} before, \
{load_after[0]:.1f} after.

Ray start-up (a local instance, `ray.init` until its CPUs are visible): **{startup:.1f} s**.
The first simulated round also starts the actors, which import torch and load their data.

{chr(10).join(section(m, args) for m in results)}
How to read it: a round sends the 16 MB global model to every client twice (train,
evaluate) and gets {args.clients} updates back. `--transport flower` is Flower's simulation
engine as it is: every message is pickled into Ray's object store and out again, the
engine polls for messages and replies every 0.1 s, and an actor gets its next client once
the last reply is back. With `--transport fast` the model is put into Ray's
object store once per round and the actors read it there in place; each update is copied
into the store once, straight from the trained weights, and the server checks and
aggregates it in place, Flower's FedAvg included (`strategies/ray_transport.py`,
`strategies/arrays.py`). Each actor has its next client's task queued while it runs one,
the server sleeps until a reply arrives instead of polling, the checkpoint writer runs at
the lowest CPU priority, and round r's evaluation (clients' and central) runs while round
r+1's train messages wait behind it.
What remains, {per_message * 1e3:.0f} ms per model-sized message here ((simulated - faster
plain) / {3 * args.clients}, first data source, `--transport {transport}`), is per-client
work that the plain loop does not do:
Ray task handling and Flower's message handling, copying each update into the store (the
actor waits on Ray's raylet for it), the reply checks (every value must be finite), the
checkpoint, and the driver's and Ray's share of the 2 cores while the actors train. It is
a fixed cost per client, so the ratio depends on how much work a client does per round: it
weighs on a local epoch over 200 examples and is small next to one over 1,000. Memory: each
process that imports torch (this CUDA build, torch {torch.__version__}) holds
{torch_bytes / 1024**3:.2f} GiB of private memory after `import torch` alone; a client actor
keeps the dataset's uint8 images and normalises only the rows of the client it serves;
`--client-cpus 2` (one actor) saves an actor's share at the cost of parallel clients, and a
CPU-only torch wheel shrinks every process.
"""
    print(body)
    if not args.no_write:
        write_section(args.out, "Federation overhead", body)


if __name__ == "__main__":
    main()
