"""Server-side Flower glue (``precode_flower.strategies``): FedSGD, Observed, the Auditor."""

from precode_flower.local_training import LocalTraining

from .auditor import Auditor
from .fedsgd import FedSGD, aggregate_metrics
from .observed import ClientReply, Observed, Observer, RoundContext, RoundRecord
from .validation import ReplyValidator

__all__ = [
    "Auditor",
    "ClientReply",
    "FedSGD",
    "LocalTraining",
    "Observed",
    "Observer",
    "ReplyValidator",
    "RoundContext",
    "RoundRecord",
    "aggregate_metrics",
]
