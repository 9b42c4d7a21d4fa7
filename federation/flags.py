"""Command-line flags shared by ``simulate.py`` and ``server.py``, and the RunConfig they give."""

from __future__ import annotations

import argparse
from pathlib import Path

from precode_flower import checkpoint as ckpt_mod
from precode_flower import data as data_mod
from precode_flower import task
from precode_flower.defenses import DEFENSES, parse_defenses
from precode_flower.models import MODELS
from precode_flower.partition import SCHEMES

from .run import default_out_dir, load_resume_checkpoint


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _defense_list(value: str) -> str:
    try:
        parse_defenses(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def add_training_args(parser: argparse.ArgumentParser, *, default_clients: int) -> None:
    """The training flags of simulate.py and server.py (defaults: :class:`task.RunConfig`)."""
    d = task.RunConfig()
    lower = str.lower
    g = parser.add_argument_group("training")
    g.add_argument(
        "--clients", type=_positive_int, default=default_clients, help="number of clients"
    )
    g.add_argument("--rounds", type=_positive_int, default=d.rounds)
    g.add_argument("--mode", type=lower, choices=task.MODES, default=d.mode)
    g.add_argument("--dataset", type=lower, choices=data_mod.DATASETS, default=d.dataset)
    g.add_argument(
        "--data-dir", default="", help="dataset directory (default: data pack, else embedded)"
    )
    g.add_argument("--model", type=lower, choices=MODELS, default=d.model)
    g.add_argument(
        "--defense",
        action="append",
        type=_defense_list,
        metavar="NAME[,NAME]",
        help=f"repeatable or comma list; one of: {', '.join(DEFENSES)} (default: none)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    g.add_argument("--local-epochs", type=float, default=d.local_epochs, help="FedAvg local epochs")
    g.add_argument(
        "--local-steps",
        type=int,
        default=d.local_steps,
        help="FedAvg local steps (>0 overrides epochs)",
    )
    g.add_argument("--lr", type=float, default=d.lr, help="client SGD learning rate (FedAvg)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="client SGD momentum")
    g.add_argument(
        "--server-lr", type=float, default=d.server_lr, help="FedSGD server learning rate"
    )
    g.add_argument("--server-momentum", type=float, default=d.server_momentum)
    g.add_argument(
        "--server-optimizer", type=lower, choices=task.SERVER_OPTIMIZERS, default=d.server_optimizer
    )
    g.add_argument("--partition", type=lower, choices=SCHEMES, default=d.partition)
    g.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
    g.add_argument("--classes-per-client", type=_positive_int, default=d.classes_per_client)
    g.add_argument(
        "--fraction", type=float, default=d.fraction, help="fraction of clients per round"
    )
    g.add_argument("--fraction-evaluate", type=float, default=d.fraction_evaluate)
    g.add_argument("--clip", type=float, default=d.clip, help="noise defense: L2 clipping bound C")
    g.add_argument("--sigma", type=float, default=d.sigma, help="noise defense: std = sigma * C")
    g.add_argument(
        "--prune-rate", type=float, default=d.prune_rate, help="prune defense: fraction zeroed"
    )
    g.add_argument(
        "--latent-dim", type=_positive_int, default=d.latent_dim, help="PRECODE latent size"
    )
    g.add_argument("--beta", type=float, default=d.beta, help="PRECODE KL weight")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--audit-ground-truth",
        action="store_true",
        help="clients also report the train-split indices they used (evaluation only)",
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds to wait for replies, per phase (train, evaluate); later replies are lost",
    )
    g.add_argument("--fault-injection", default="", help=argparse.SUPPRESS)
    g.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    r = parser.add_argument_group("reliability")
    r.add_argument(
        "--max-update-norm",
        type=float,
        default=d.max_update_norm,
        help="reject updates whose L2 norm (FedSGD: gradient; FedAvg: weights - global) "
        "exceeds this (default 0: no bound)",
    )
    r.add_argument(
        "--max-reply-mb",
        type=float,
        default=d.max_reply_mb,
        help="reject replies larger than this many MiB (default 0: twice the model + 8 MiB)",
    )
    r.add_argument(
        "--min-replies",
        type=_positive_int,
        default=d.min_replies,
        help="skip a round (model unchanged) with fewer valid replies than this",
    )
    r.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its last completed round (same flags; --rounds may "
        "grow); results are appended there",
    )


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> task.RunConfig:
    """The RunConfig of parsed flags; invalid combinations exit via ``parser.error``."""
    try:
        return task.RunConfig(
            mode=args.mode,
            dataset=args.dataset,
            data_dir=args.data_dir,
            model=args.model,
            defenses=parse_defenses(args.defense or ()),
            latent_dim=args.latent_dim,
            beta=args.beta,
            clip=args.clip,
            sigma=args.sigma,
            prune_rate=args.prune_rate,
            batch_size=args.batch_size,
            local_epochs=args.local_epochs,
            local_steps=args.local_steps,
            lr=args.lr,
            momentum=args.momentum,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            partition=args.partition,
            alpha=args.alpha,
            classes_per_client=args.classes_per_client,
            clients=args.clients,
            rounds=args.rounds,
            fraction=args.fraction,
            fraction_evaluate=args.fraction_evaluate,
            seed=args.seed,
            audit_ground_truth=args.audit_ground_truth,
            round_timeout=args.round_timeout,
            fault_injection=args.fault_injection,
            max_update_norm=args.max_update_norm,
            max_reply_mb=args.max_reply_mb,
            min_replies=args.min_replies,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def out_dir_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """``--resume DIR`` (``--out``, if given, must name the same directory), ``--out``, or
    a fresh ``runs/<timestamp>``."""
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume DIR continues in DIR; --out must be DIR or left out")
        return Path(args.resume)
    return Path(args.out) if args.out else default_out_dir()


def check_resumable(parser: argparse.ArgumentParser, cfg: task.RunConfig, out: Path) -> None:
    """Exit with the reason if ``out`` holds no checkpoint that ``cfg`` can resume."""
    try:
        load_resume_checkpoint(cfg, out)
    except ckpt_mod.CheckpointError as err:
        parser.error(f"--resume: {err}")
