"""precode-flower's PyTorch core: PRECODE, models, data, attacks and metrics.

Nothing in the core imports the Flower framework. The Flower glue is imported as
``precode_flower.strategies`` and ``precode_flower.clients``; in the repository it lives
beside the core, in ``strategies/`` and ``clients/`` (see :mod:`precode_flower._layout`).

>>> import precode_flower
>>> model = precode_flower.extend(precode_flower.models.build("mlp", 10, (3, 32, 32)))
"""

from . import _layout, models
from .precode import (
    ConvVariationalBottleneck,
    Precoded,
    VariationalBottleneck,
    bottlenecks,
    extend,
    find_classifier,
    precode_loss,
)

_layout.install()

__all__ = [
    "ConvVariationalBottleneck",
    "Precoded",
    "VariationalBottleneck",
    "bottlenecks",
    "extend",
    "find_classifier",
    "models",
    "precode_loss",
]
__version__ = "0.1.0"
