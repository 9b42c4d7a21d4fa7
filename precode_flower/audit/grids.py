"""Per-round image grids: originals (where known) above each attack's reconstructions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .files import _FILE_MODE
from .jobs import _client_key

#: Most images per row of a round's image grid.
GRID_COLUMNS = 16


def write_grid(
    recon_dir: Path,
    attacks: Sequence[str],
    round: int,
    rows: list[dict[str, Any]],
    originals: dict[str, Path],
    widths: dict[str, int],
    norm: tuple[tuple[float, ...], tuple[float, ...]],
) -> Path | None:
    """Draw round ``round``'s grid to ``recon_dir/roundNNNN.png`` (owner-only); None if empty.

    ``rows`` are the round's rows, ``originals`` the saved ground truth per client, ``widths``
    each client's batch size and ``norm`` the (mean, std) the images are normalised with.
    """
    from ..plotting import image_grid

    ok = [r for r in rows if r["status"] == "ok" and r.get("reconstruction")]
    loaded = {id(r): torch.load(r["reconstruction"], weights_only=True) for r in ok}
    images = [x for x in loaded.values() if x.dim() == 4 and len(x)]
    images += [torch.load(p, weights_only=True) for p in originals.values()]
    if not images:
        return None
    shape = tuple(images[0].shape[1:])
    blank = torch.zeros(shape)
    clients = sorted(widths, key=_client_key)

    def fit(x: Tensor | None, width: int) -> Tensor:
        """Exactly ``width`` images of ``shape``; blanks (the mean image) where missing."""
        if x is None or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            x = blank.expand(0, *shape)
        x = x[:width]
        return torch.cat([x, blank.expand(width - len(x), *shape)])

    grid: dict[str, Tensor] = {}
    if originals:
        grid["original"] = torch.cat(
            [
                fit(
                    torch.load(originals[c], weights_only=True) if c in originals else None,
                    widths[c],
                )
                for c in clients
            ]
        )[:GRID_COLUMNS]
    for attack in attacks:
        parts = []
        for c in clients:
            hit = next((r for r in ok if r["attack"] == attack and str(r["client"]) == c), None)
            x = loaded[id(hit)] if hit is not None else None
            order = hit.get("match") if hit is not None else None
            if x is not None and order and len(order) == len(x):  # aligned to the originals
                x = x[torch.as_tensor(order, dtype=torch.long)]
            parts.append(fit(x, widths[c]))
        grid[attack] = torch.cat(parts)[:GRID_COLUMNS]
    path = recon_dir / f"round{round:04d}.png"
    title = f"round {round}: client(s) {', '.join(clients)}"
    image_grid(grid, norm[0], norm[1], path, title=title)
    path.chmod(_FILE_MODE)  # whatever image_grid did: reconstructions stay owner-only
    return path


# ---- workers ------------------------------------------------------------------------
