"""Server-side Flower strategies: FedSGD, and the Observed wrapper for any strategy."""

from .fedsgd import FedSGD, aggregate_metrics
from .observed import ClientReply, Observed, Observer, RoundContext, RoundRecord
from .validation import ReplyValidator

__all__ = [
    "ClientReply",
    "FedSGD",
    "Observed",
    "Observer",
    "ReplyValidator",
    "RoundContext",
    "RoundRecord",
    "aggregate_metrics",
]
