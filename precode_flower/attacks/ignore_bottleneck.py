"""``ignore-bottleneck``: the adaptive attack on PRECODE models.

Inverting Gradients (:mod:`.ig`) matching only the gradients of the parameters used before
the first PRECODE bottleneck (:func:`base.parameters_before_bottleneck`). Their gradients
still carry the input (e.g. the first Linear layer's weight gradient is an outer product with
it), while the bottleneck's noise, which the server cannot reproduce, only rescales them.

Options: every option of ``ig`` with the same defaults (cost "cosine", tv 1e-6, Adam lr 0.01,
signed, step schedule, boxed, 7000 iterations, 1 restart, init "randn", ...), except
``layers``, which this attack sets itself (passing it raises ValueError).

Models without a PRECODE bottleneck raise ValueError: the attack is defined by the bottleneck,
and silently falling back to plain ``ig`` would mislabel results (run ``ig`` for those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..precode import bottlenecks
from .base import AttackCase, AttackResult, parameters_before_bottleneck, register
from .ig import IGOptions, run_ig
from .memory import gradient_matching_memory


def matched_parameters(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the parameters whose gradients ``ignore-bottleneck`` matches."""
    if not bottlenecks(model):
        raise ValueError(
            "ignore-bottleneck applies only to PRECODE models (with a variational bottleneck); "
            "this model has none, use 'ig' instead"
        )
    names = parameters_before_bottleneck(model, input_shape)
    if not names:
        raise ValueError(
            "ignore-bottleneck: no parameter is used before the first PRECODE bottleneck, "
            "so there is no gradient to match"
        )
    return names


def _applies(model: nn.Module, input_shape: Sequence[int]) -> str | None:
    try:
        matched_parameters(model, input_shape)
    except ValueError as err:
        return str(err)
    return None


@register("ignore-bottleneck", memory=gradient_matching_memory, applies=_applies)
def ignore_bottleneck(case: AttackCase, **options: Any) -> AttackResult:
    """Inverting Gradients on the pre-bottleneck gradients only (options: those of ``ig``)."""
    if "layers" in options:
        raise ValueError("ignore-bottleneck chooses the matched layers itself; drop 'layers'")
    opts = IGOptions.from_options(options, "ignore-bottleneck")
    opts.layers = matched_parameters(case.model, case.input_shape)
    return run_ig("ignore-bottleneck", case, opts)
