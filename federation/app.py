"""Flower's ServerApp: ``app`` for ``flwr run`` and the SuperLink, and one for simulations.

``app`` (the ``serverapp`` component in pyproject.toml) reads the run config
(``[tool.flwr.app.config]``, overridable with ``--run-config``; ``out-dir``, ``resume``,
``overwrite`` and the ``audit*`` keys besides :class:`~precode_flower.task.RunConfig`'s) and runs
:func:`~precode_flower.federation.run.run_federation` on the Grid it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from precode_flower import task
from precode_flower.strategies import Observer
from precode_flower.strategies.auditor import audit_from_run_config

from .flags import out_dir_problem
from .run import default_out_dir, load_resume_checkpoint, run_federation


def make_server_app(
    cfg: task.RunConfig,
    out_dir: str | Path,
    *,
    observers: Sequence[Observer] = (),
    progress: bool = True,
    resume: bool = False,
    grid_wrapper: Callable[[Grid], Grid] | None = None,
    on_finish: Callable[[], None] | None = None,
) -> ServerApp:
    """A ServerApp that runs ``cfg`` (for ``run_simulation``, which ignores run configs).

    ``grid_wrapper``: applied to the Grid that Flower gives the app (simulate.py's
    :class:`~precode_flower.strategies.ray_transport.SharedModelGrid`). ``on_finish``: called
    when the app's work is done (simulate.py then bounds how long the engine may take to
    stop: a client that never returns would keep it waiting).
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        if grid_wrapper is not None:
            grid = grid_wrapper(grid)
        try:
            run_federation(
                grid, cfg, out_dir, observers=observers, progress=progress, resume=resume
            )
        finally:
            if on_finish is not None:
                on_finish()

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run`` / the SuperLink: the config comes from the run config."""
    cfg = task.RunConfig.from_mapping(context.run_config)
    out = str(cfg.extra.get("out-dir") or "") or default_out_dir()
    resume = str(cfg.extra.get("resume", False)).strip().lower() in ("1", "true", "yes")
    if resume and not cfg.extra.get("out-dir"):
        raise ValueError("resume needs out-dir: the run directory holding checkpoint.pt")
    overwrite = str(cfg.extra.get("overwrite", False)).strip().lower() in ("1", "true", "yes")
    problem = out_dir_problem(Path(out), resume=resume, overwrite=overwrite)
    if problem:  # never replace a run's results unasked
        raise ValueError(f"out-dir {problem.replace('--resume', 'resume=true')}")
    if resume:  # fail before the audit starts workers
        load_resume_checkpoint(cfg, out)
    # The honest-but-curious audit, if the run config asks for it (no ground truth here).
    audit = audit_from_run_config(context.run_config, out, seed=cfg.seed)
    run_federation(
        grid, cfg, out, observers=[audit] if audit else (), progress=False, resume=resume
    )
