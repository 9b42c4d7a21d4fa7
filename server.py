"""The server side of a federation: submit the PRECODE app to a running Flower SuperLink.

The code lives in :mod:`precode_flower.federation` (``federation/`` in the repository): the
round loop (:mod:`~precode_flower.federation.rounds`), one run on a Grid
(:mod:`~precode_flower.federation.run`), Flower's ServerApp
(:mod:`~precode_flower.federation.app`, the ``serverapp`` component), the shared flags
(:mod:`~precode_flower.federation.flags`) and the submission
(:mod:`~precode_flower.federation.submit`). This file is its entry point from the
repository root, and keeps the names that were importable from ``server`` before the split.

``python server.py --superlink HOST:PORT --root-certificates ca.pem [training flags]``
(or ``--insecure``, with a warning, for plain-text local tests) submits the app to a
running SuperLink (which runs the ServerApp) and streams its log until the run ends.
docs/DEPLOYMENT.md shows the secure deployment (TLS, SuperNode authentication). Insecure,
step by step (all on 127.0.0.1)::

    flower-superlink --insecure --host 127.0.0.1 --port 9093 \\
        --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \\
        --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9095 \\
        --node-config "partition-id=1 num-partitions=2"
    python server.py --superlink 127.0.0.1:9093 --insecure --clients 2 --rounds 2 --out runs/demo
"""

from __future__ import annotations

import sys

from precode_flower.federation.app import app, main, make_server_app
from precode_flower.federation.flags import (
    OneLineParser,
    add_training_args,
    check_resumable,
    config_from_args,
    out_dir_from_args,
)
from precode_flower.federation.rounds import (
    PartitionOrderedGrid,
    make_strategy,
    make_validator,
    train_rounds,
)
from precode_flower.federation.run import default_out_dir, load_resume_checkpoint, run_federation
from precode_flower.federation.runlog import RoundLog
from precode_flower.federation.submit import (
    APP_DIR,
    INSECURE_WARNING,
    build_parser,
    cli,
    flwr_config_toml,
    submit,
)

__all__ = [
    "APP_DIR",
    "INSECURE_WARNING",
    "OneLineParser",
    "PartitionOrderedGrid",
    "RoundLog",
    "add_training_args",
    "app",
    "build_parser",
    "check_resumable",
    "cli",
    "config_from_args",
    "default_out_dir",
    "flwr_config_toml",
    "load_resume_checkpoint",
    "main",
    "make_server_app",
    "make_strategy",
    "make_validator",
    "out_dir_from_args",
    "run_federation",
    "submit",
    "train_rounds",
]

if __name__ == "__main__":
    sys.exit(cli())
