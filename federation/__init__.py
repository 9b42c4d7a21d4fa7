"""The server side of a federation (``precode_flower.federation``), one module per idea.

- :mod:`.rounds`: the round loop that replaces ``Strategy.start`` (resume, pipelining),
  the strategy of a run config and its node sampling.
- :mod:`.runlog`: ``rounds.jsonl`` and the per-round console line.
- :mod:`.run`: :func:`run_federation`, one run on a Grid, with its files and checkpoints.
- :mod:`.app`: Flower's ServerApp (``precode_flower.federation.app:app``).
- :mod:`.flags`: the command-line flags shared by ``simulate.py`` and ``server.py``.
- :mod:`.submit`: submitting the app to a running SuperLink (``server.py``, installed as
  ``precode-flower-server``).
- :mod:`.simulation`: the whole federation on one machine (``simulate.py``, installed as
  ``precode-flower-simulate``), with the ``--transport`` switch.

In the repository it lives in ``federation/`` beside the core (see
:mod:`precode_flower._layout`).
"""

from .app import make_server_app
from .flags import OneLineParser, add_training_args, config_from_args
from .rounds import PartitionOrderedGrid, make_strategy, make_validator, train_rounds
from .run import default_out_dir, load_resume_checkpoint, run_federation
from .runlog import RoundLog
from .submit import submit

__all__ = [
    "OneLineParser",
    "PartitionOrderedGrid",
    "RoundLog",
    "add_training_args",
    "config_from_args",
    "default_out_dir",
    "load_resume_checkpoint",
    "make_server_app",
    "make_strategy",
    "make_validator",
    "run_federation",
    "submit",
    "train_rounds",
]
