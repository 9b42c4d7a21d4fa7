"""precode-flower's PyTorch core: PRECODE, models, data, attacks and metrics.

Nothing in this package imports the Flower framework; the Flower glue lives in
the top-level ``clients`` and ``strategies`` packages.

>>> import precode_flower
>>> model = precode_flower.extend(precode_flower.models.build("mlp", 10, (3, 32, 32)))
"""

from . import models
from .precode import (
    ConvVariationalBottleneck,
    Precoded,
    VariationalBottleneck,
    bottlenecks,
    extend,
    find_classifier,
    precode_loss,
)

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
