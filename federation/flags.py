"""Command-line flags shared by ``simulate.py`` and ``server.py``, and the RunConfig they give."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from precode_flower import checkpoint as ckpt_mod
from precode_flower import settings, task

from .run import default_out_dir, load_resume_checkpoint


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


#: Files that mark a directory as holding a run (never overwritten without ``--overwrite``).
RUN_FILES = ("checkpoint.pt", "rounds.jsonl", "model.pt", "summary.json", "config.json")


def add_training_args(parser: argparse.ArgumentParser, *, default_clients: int) -> None:
    """The training flags of simulate.py and server.py: one per :class:`task.RunConfig`
    setting, derived from its field declarations (help, type, bounds, choices), so a value
    that can never work is a one-line usage error (exit 2) -- plus the run directory's."""
    settings.add_arguments(
        parser,
        task.RunConfig,
        defaults={"clients": default_clients},
        titles={"training": "training", "reliability": "reliability"},
    )
    p = parser.add_argument_group(
        "privacy (dp-server / dp-client: Flower's DP wrappers; --secagg: SecAgg+; docs/PRIVACY.md)"
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="train with Flower's SecAgg+ secure aggregation (same as --defense secagg)",
    )
    g = parser.add_argument_group("run directory")
    g.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    g.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its last completed round (same flags; --rounds may "
        "grow); results are appended there",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in an existing --out (without it such a run is never touched)",
    )


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> task.RunConfig:
    """The RunConfig of parsed flags; invalid combinations exit via ``parser.error``."""
    try:
        secagg = ("secagg",) if getattr(args, "secagg", False) else ()
        defenses = ",".join([*(args.defenses or ()), *secagg])
        return settings.from_namespace(task.RunConfig, args, defenses=defenses or ())
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def out_dir_problem(out: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Why ``out`` cannot take this run's results, or None; creates nothing.

    A file, a directory that cannot be created or written, or (without ``resume`` and
    ``overwrite``) a directory that already holds a run's files.
    """
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    existing = out
    while not existing.exists():  # the nearest ancestor that exists must let us create it
        existing = existing.parent
    if not existing.is_dir():
        return f"{out}: cannot create it ({existing} is not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{out}: cannot create or write it ({existing} is not writable)"
    if not resume and not overwrite and out.is_dir():
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            return (
                f"{out} holds a run already ({', '.join(found)}); continue it with --resume "
                f"{out}, replace it with --overwrite, or choose another --out"
            )
    return None


def out_dir_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, local: bool = True
) -> Path:
    """``--resume DIR`` (``--out``, if given, must name the same directory), ``--out``, or
    a fresh ``runs/<timestamp>``; exits with the reason where it cannot hold the run
    (:func:`out_dir_problem`; not ``local``: only if it exists here)."""
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume DIR continues in DIR; --out must be DIR or left out")
        if args.overwrite:
            parser.error("--resume continues a run and --overwrite replaces it: choose one")
        out = Path(args.resume)
    else:
        out = Path(args.out) if args.out else default_out_dir()
    # Not ``local`` (a SuperLink writes it, maybe on another filesystem): only what is here.
    problem = None
    if local or out.exists():
        problem = out_dir_problem(out, resume=bool(args.resume), overwrite=args.overwrite)
    if problem:
        parser.error(f"--{'resume' if args.resume else 'out'} {problem}")
    return out


def check_resumable(parser: argparse.ArgumentParser, cfg: task.RunConfig, out: Path) -> None:
    """Exit with the reason if ``out`` holds no checkpoint that ``cfg`` can resume."""
    try:
        load_resume_checkpoint(cfg, out)
    except ckpt_mod.CheckpointError as err:
        parser.error(f"--resume: {err}")
