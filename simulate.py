"""Run a whole federation on one machine with Flower's simulation engine (Ray).

    python simulate.py --clients 10                       # FedAvg, MLP, CIFAR-10, 3 rounds
    python simulate.py --mode fedsgd --defense precode --rounds 5
    python simulate.py --rounds 10 --resume runs/a   # continue an interrupted run
    python simulate.py --transport flower            # Flower's simulation engine as it is

The code, and what every flag does, is :mod:`precode_flower.federation.simulation`
(``federation/simulation.py``; installed, the same command is ``precode-flower-simulate``).
This file is its entry point from the repository root and keeps the names that were
importable from ``simulate`` before.
"""

from __future__ import annotations

import sys

from precode_flower.federation.simulation import (
    DEFAULT_OBJECT_STORE_MB,
    LOOPBACK,
    MIN_OBJECT_STORE_MB,
    backend_config,
    build_parser,
    choose_transport,
    embedded_data_dir,
    main,
    object_store_mb,
)

__all__ = [
    "DEFAULT_OBJECT_STORE_MB",
    "LOOPBACK",
    "MIN_OBJECT_STORE_MB",
    "backend_config",
    "build_parser",
    "choose_transport",
    "embedded_data_dir",
    "main",
    "object_store_mb",
]

if __name__ == "__main__":
    sys.exit(main())
