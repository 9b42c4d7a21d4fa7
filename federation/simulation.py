"""Run a whole federation on one machine with Flower's simulation engine (Ray).

``simulate.py`` in the repository, ``precode-flower-simulate`` once installed::

    python simulate.py --clients 10                       # FedAvg, MLP, CIFAR-10, 3 rounds
    python simulate.py --mode fedsgd --defense precode --rounds 5
    python simulate.py --defense noise,prune --sigma 0.05 --partition dirichlet --alpha 0.3
    python simulate.py --rounds 10 --out runs/a      # interrupted (Ctrl-C, crash, kill) ...
    python simulate.py --rounds 10 --resume runs/a   # ... continues after the last round done

Clients are Flower ``ClientApp`` instances run by Ray actors (1 CPU each by default, so
there are as many parallel clients as cores); the ServerApp runs in this process and
evaluates the global model on the test split after each round. Results go to ``--out``
(default ``runs/<timestamp>``): ``config.json``, ``rounds.jsonl``, ``summary.json``,
``accuracy.png``, ``model.pt`` and ``checkpoint.pt`` (replaced after every round).

Ray: a private local Ray instance that listens on 127.0.0.1 only (dashboard off, temp dir
under the system temp dir, removed afterwards) unless ``--ray-address`` names a running
cluster, e.g. a single-machine one started with::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1 \\
        --port 6379 --num-cpus 2 --include-dashboard false --temp-dir /tmp/ray-head
    python simulate.py --ray-address 127.0.0.1:6379
    ray stop        # stops every Ray process of this user on the machine

Why the environment variable: Ray 2.55's ``ray.init`` replaces a loopback
``_node_ip_address`` by the machine's external address, and its gRPC servers then listen
on all interfaces. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for single-node
use) keeps the node address, and so every listener, on 127.0.0.1. simulate.py sets it for
its own instance and for loopback ``--ray-address``; a multi-machine cluster needs it unset.

Messages (``--transport``): ``flower`` runs Flower's simulation engine as it is, through
its public API only. ``fast`` (the default where it was verified, see
:func:`~precode_flower.strategies.ray_transport.fast_transport_problem`) wraps the
ServerApp's grid in :class:`~precode_flower.strategies.ray_transport.SharedModelGrid` (the
global model crosses Ray's object store once per round, not once per message, and the
clients' updates once each), wakes Flower's simulation feeder after each push
(:func:`~precode_flower.strategies.ray_transport.install_prompt_feeder`) and the server
after each reply (:func:`~precode_flower.strategies.ray_transport.install_reply_wakeup`),
and queues each actor's next client task while it runs one
(:func:`~precode_flower.strategies.ray_transport.install_pipelined_actor_pool`). Both give
bitwise the same models (tests/test_simulation.py); ``benchmarks/federation.py
--transport`` measures their round times. On a Flower whose internals differ from the
verified ones the default falls back to ``flower`` with a one-line warning.

Data: by default (CIFAR-10, no ``--data-dir``) the small CIFAR-10 embedded in the package
(2,000 train / 500 test images), which keeps the default run well under a minute and a
half on 2 cores; it is linked into ``<out>/data`` and the run's ``data-dir`` names that
directory, so clients, server and auditor read the same examples. ``--data-source auto``
uses :func:`precode_flower.data.load`'s lookup instead (``--data-dir``, else the offline
data pack, else the embedded default). On a multi-machine Ray cluster pass a
``--data-dir`` that every machine can read. ``run_simulation`` ignores the
pyproject run config, so the config is passed to the ServerApp directly and reaches the
clients in each round's ConfigRecord.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import precode_flower
from precode_flower import data, heap, task
from precode_flower.private import private_dir
from precode_flower.strategies.auditor import (
    add_audit_args,
    audit_from_args,
    simulation_ground_truth,
)
from precode_flower.strategies.ray_transport import (
    ACTOR_QUEUE_DEPTH,
    TRANSPORTS,
    fast_transport_problem,
)

from .flags import (
    OneLineParser,
    add_training_args,
    check_resumable,
    config_from_args,
    out_dir_from_args,
)

LOOPBACK = {"127.0.0.1", "localhost"}


# Ray's object store carries every model-sized message (Ray's default: 30% of RAM). Its
# shared pages, once touched, stay resident, so it is sized to what a round keeps there at
# once (object_store_mb): the round's updates, which the server reads in place until it has
# aggregated them (Observed then lets them go: strategies.replies.release_arrays), and the
# global model, twice (the old one may still be read while the new one is written). Where
# more is needed, Ray waits 2 s and then spills to disk.
DEFAULT_OBJECT_STORE_MB = 256  # the least object_store_mb gives
MIN_OBJECT_STORE_MB = 75  # Ray's minimum


def object_store_mb(cfg: task.RunConfig) -> int:
    """MiB of object store a round of ``cfg`` needs (with half again as slack for the
    store's own allocator), at least :data:`DEFAULT_OBJECT_STORE_MB`."""
    per_round = max(1, math.ceil(cfg.fraction * cfg.clients))
    needed = 1.5 * (per_round + 2) * task.model_bytes(cfg)
    return max(DEFAULT_OBJECT_STORE_MB, math.ceil(needed / 2**20))


def backend_config(
    *,
    ray_address: str | None,
    temp_dir: str | None,
    client_cpus: float,
    verbose: bool = False,
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB,
) -> dict[str, Any]:
    """Flower's Ray backend config: local 127.0.0.1 instance, or an existing cluster."""
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
    }
    if ray_address:
        init_args["address"] = ray_address
        host = ray_address.rsplit(":", 1)[0]
        if host in LOOPBACK:
            init_args["_node_ip_address"] = "127.0.0.1"
        # The cluster has its own temp dir and dashboard setting; ray.init refuses both here.
        del init_args["include_dashboard"]
    else:
        init_args["_node_ip_address"] = "127.0.0.1"
        init_args["num_cpus"] = os.cpu_count() or 1
        init_args["object_store_memory"] = object_store_mb << 20
        if temp_dir:
            init_args["_temp_dir"] = temp_dir
    return {
        "init_args": init_args,
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
    }


class _DropDeprecation(logging.Filter):
    """Hide Flower's notice that ``run_simulation`` is deprecated (we use it on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("precode_flower",):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for h in flwr_logger.handlers:
        h.addFilter(_DropDeprecation())


def embedded_data_dir(out: Path) -> Path:
    """A data dir (``out/data``) holding the package's embedded CIFAR-10 default.

    The run's ``data-dir`` then names it, so every reader of the config (clients, the
    server's evaluation, the auditor's ground truth) loads the same examples.
    """
    source = Path(precode_flower.__file__).resolve().parent / "embedded" / "cifar10_default.npz"
    target = out.resolve() / "data" / "cifar10" / "cifar10_subset.npz"
    for directory in (out, out / "data", target.parent):  # owner-only, as all of a run
        private_dir(directory)
    if target.is_symlink() and not target.exists():
        target.unlink()  # a link left by a checkout that has moved or gone: link anew
    if not target.exists():
        try:
            target.symlink_to(source)
        except OSError:  # no symlinks here: copy the 7 MB file
            shutil.copyfile(source, target)
    return target.parent.parent


def _data_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    source = args.data_source
    if source is None:  # the quick default: the embedded CIFAR-10 unless told otherwise
        return "embedded" if args.dataset == "cifar10" and not args.data_dir else "auto"
    if source == "embedded" and (args.dataset != "cifar10" or args.data_dir):
        parser.error("--data-source embedded: only cifar10 has an embedded default (no --data-dir)")
    return source


def build_parser(prog: str = "simulate.py") -> OneLineParser:
    parser = OneLineParser(
        prog=prog, description="Simulate a PRECODE federation with Flower + Ray."
    )
    add_training_args(parser, default_clients=10)
    add_audit_args(parser, simulation=True)
    r = parser.add_argument_group("simulation")
    r.add_argument(
        "--ray-address", default=None, help="run on an existing Ray cluster (host:port or auto)"
    )
    r.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs per client actor (<= the machine's; fewer means more parallel clients)",
    )
    r.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help="object store of the local Ray instance in MiB (messages in flight live there; "
        f"default: room for a round's updates and two models, at least {DEFAULT_OBJECT_STORE_MB})",
    )
    r.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=None,
        help="fast: fewer copies and wake-ups instead of polling (replaces parts of Flower's "
        "simulation engine; the default where verified for the installed Flower); flower: "
        "Flower's engine as it is",
    )
    r.add_argument(
        "--actor-queue-depth",
        type=int,
        default=None,
        help=f"--transport fast: client tasks queued per actor (default {ACTOR_QUEUE_DEPTH}: "
        "the next one waits in the actor while it runs one, but also behind a client that "
        "hangs; 1: Flower's pool)",
    )
    r.add_argument(
        "--ray-temp-dir",
        default=None,
        help="temp dir of the local Ray instance (default: a fresh tmp dir, removed afterwards)",
    )
    r.add_argument(
        "--data-source",
        choices=("embedded", "auto"),
        default=None,
        help="embedded: the package's small CIFAR-10 (2,000 train / 500 test; the default for "
        "cifar10 without --data-dir); auto: --data-dir, else the offline data pack, else embedded",
    )
    r.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def choose_transport(parser: argparse.ArgumentParser, requested: str | None) -> str:
    """``requested``, or without one ``fast`` where it is verified for the installed Flower
    and else ``flower`` (with a one-line warning); ``--transport fast`` where it is not
    verified exits with the reason."""
    if requested == "flower":
        return "flower"
    problem = fast_transport_problem()
    if problem is None:
        return "fast"
    if requested == "fast":
        parser.error(f"--transport fast: {problem}")
    print(f"WARNING: {problem}; using --transport flower", file=sys.stderr, flush=True)
    return "flower"


def _ray_address_problem(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing can be a Ray cluster at ``host:port``, or None; ``ray.init`` itself would
    retry a dead address without end."""
    if address == "auto":
        return None  # Ray finds a local cluster by its own files, or fails at once
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return f"--ray-address {address}: expected host:port or auto"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        return (
            f"--ray-address {address}: no Ray cluster answers there "
            f"({err.strerror or type(err).__name__}); start one or leave --ray-address out"
        )
    return None


#: Seconds a simulation may take to shut down once its ServerApp is done; longer means a
#: client never returned (its actor still runs), and simulate.py stops Ray and exits.
SHUTDOWN_GRACE = 15.0


def _rows(out: Path) -> list[str]:
    path = out / "rounds.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _stop_when_stuck(
    finished: threading.Event,
    returned: threading.Event,
    out: Path,
    rounds: int,
    own_tmp: str | None,
) -> None:
    """After the ServerApp is done, give the simulation :data:`SHUTDOWN_GRACE` seconds to
    return; then report the clients still running, stop Ray and end the process (exit 0
    if every round was done)."""
    finished.wait()
    if returned.wait(SHUTDOWN_GRACE):
        return
    rows = _rows(out)
    last = json.loads(rows[-1]) if rows else {}
    nodes = [
        f"node {d.get('node_id')} (partition {d.get('partition_id')})"
        for d in last.get("dropped_nodes", [])
    ]
    print(
        f"simulate.py: client(s) still running after the run ended {SHUTDOWN_GRACE:g} s ago "
        f"({', '.join(nodes) or 'unknown'}: no reply in the last round); a client that never "
        f"returns cannot end by itself: stopping Ray and exiting; results in {out}",
        file=sys.stderr,
        flush=True,
    )
    import ray

    stopper = threading.Thread(target=ray.shutdown, daemon=True)
    stopper.start()
    stopper.join(30)
    if own_tmp:
        shutil.rmtree(own_tmp, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0 if len(rows) == rounds else 1)


def main(
    argv: Sequence[str] | None = None, *, prog: str = "simulate.py", client_app: Any = None
) -> int:
    """``simulate.py``'s command line; returns the exit status. ``client_app``: another
    ClientApp than precode-flower's (the tests' fault-injecting one)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:  # --audit turns the evaluation channel on, unless --no-audit-ground-truth
        args.audit_ground_truth = simulation_ground_truth(args)
    except ValueError as err:
        parser.error(str(err))
    cfg = config_from_args(parser, args)
    cpus = os.cpu_count() or 1
    if not 0 < args.client_cpus <= cpus and args.ray_address is None:
        parser.error(f"--client-cpus must be in (0, {cpus}] on this machine")
    if args.actor_queue_depth is not None and args.actor_queue_depth < 1:
        parser.error(f"--actor-queue-depth must be at least 1, got {args.actor_queue_depth}")
    if args.actor_queue_depth is not None and args.transport == "flower":
        parser.error("--actor-queue-depth: only with --transport fast (Flower's pool has one)")
    if args.object_store_mb is not None and args.object_store_mb < MIN_OBJECT_STORE_MB:
        parser.error(f"--object-store-mb must be at least {MIN_OBJECT_STORE_MB} (Ray's minimum)")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.ray_address is None or args.ray_address.rsplit(":", 1)[0] in LOOPBACK:
        # Must be set before Ray is imported; see the module docstring.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray tip
    # Ray's processes are multi-threaded; glibc then keeps up to 8 malloc arenas per core
    # per process, and the client actors' freed message buffers stay resident. Two arenas
    # cut the actors' memory by about a fifth (see docs/BENCHMARKS.md, Federation overhead).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    try:
        heap.limit_malloc_arenas(int(os.environ["MALLOC_ARENA_MAX"]))
    except ValueError:
        pass  # a malformed value in the environment: glibc ignores it there too
    # After the environment above (the check imports Ray), before any worker starts.
    transport = choose_transport(parser, args.transport)
    if args.ray_address is not None:
        problem = _ray_address_problem(args.ray_address)
        if problem:
            parser.error(problem)
    out = out_dir_from_args(parser, args)  # a file, unwritable, or a run not to overwrite
    if _data_source(parser, args) == "embedded":
        cfg = dataclasses.replace(cfg, data_dir=str(embedded_data_dir(out)))
    try:  # a bad data dir or an impossible partitioning: one line, before Ray starts
        task.partition_sizes(cfg)
    except (FileNotFoundError, ValueError) as err:
        parser.error("; ".join(line.strip() for line in str(err).splitlines() if line.strip()))
    if args.resume:  # a missing, corrupted or foreign checkpoint: exit 2 before Ray starts
        check_resumable(parser, cfg, out)

    _configure_logging(args.verbose)
    try:  # starts the audit workers; fails here on a senseless budget or device
        # Test images as the re-identification pool: no client trains on them.
        references = (
            data.reference_pool(data.load(cfg.dataset, cfg.data_dir or None))
            if args.audit and cfg.audit_ground_truth
            else None
        )
        audit = audit_from_args(
            args, out, ground_truth=cfg.audit_ground_truth, references=references
        )
    except ValueError as err:
        parser.error(str(err))

    # Imported after the flags are checked: Flower, Ray and torch take seconds to import.
    from flwr.simulation import run_simulation

    from precode_flower.clients.client_app import app as production_client_app
    from precode_flower.strategies import ray_transport

    from .app import make_server_app

    grid_wrapper = None
    if transport == "flower":
        ray_transport.restore_flower()  # a fast run earlier in this process replaced parts
    if transport == "fast":
        ray_transport.install_prompt_feeder()  # clients start right after each push
        ray_transport.install_reply_wakeup()  # the server waits for replies, no polling
        # The next client's task waits in the actor.
        ray_transport.install_pipelined_actor_pool(args.actor_queue_depth or ACTOR_QUEUE_DEPTH)
        grid_wrapper = ray_transport.SharedModelGrid  # the global model crosses Ray's store once

    own_tmp = temp_dir = None
    if args.ray_address is None:
        temp_dir = args.ray_temp_dir
        if temp_dir is None:
            # Short path: Ray's unix sockets live under it (path length limit ~107 bytes).
            temp_dir = own_tmp = tempfile.mkdtemp(prefix="ray-")
        temp_dir = str(Path(temp_dir).resolve())
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        os.environ["RAY_TMPDIR"] = temp_dir  # also Ray's files outside the session dir
    store_mb = args.object_store_mb
    if store_mb is None:  # (an existing cluster brings its own store: not used there)
        store_mb = object_store_mb(cfg) if args.ray_address is None else DEFAULT_OBJECT_STORE_MB
    started = time.perf_counter()
    finished, returned = threading.Event(), threading.Event()
    threading.Thread(
        target=_stop_when_stuck,
        args=(finished, returned, out, cfg.rounds, own_tmp),
        name="shutdown-watchdog",
        daemon=True,
    ).start()
    try:
        run_simulation(
            server_app=make_server_app(
                cfg,
                out,
                observers=[audit] if audit else (),
                progress=not args.no_progress,
                resume=bool(args.resume),
                grid_wrapper=grid_wrapper,
                on_finish=finished.set,
            ),
            client_app=client_app or production_client_app,
            num_supernodes=cfg.clients,
            backend_name="ray",
            backend_config=backend_config(
                ray_address=args.ray_address,
                temp_dir=temp_dir,
                client_cpus=args.client_cpus,
                verbose=args.verbose,
                object_store_mb=store_mb,
            ),
            verbose_logging=args.verbose,
        )
    finally:
        returned.set()
        finished.set()  # (an error before the ServerApp finished: the watchdog just ends)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
    rounds = out / "rounds.jsonl"
    done = len(rounds.read_text().splitlines()) if rounds.exists() else 0
    seconds = time.perf_counter() - started
    print(
        f"{done}/{cfg.rounds} rounds in {seconds:.1f} s ({transport} transport); results in {out}"
    )
    return 0 if done == cfg.rounds else 1


def script() -> int:
    """The ``precode-flower-simulate`` console script."""
    return main(prog="precode-flower-simulate")
