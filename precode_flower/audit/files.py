"""Owner-only output files and the ``leakage.jsonl`` rows (strict JSON, resumable)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

_DIR_MODE = 0o700
_FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) and make it owner-only (0o700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(_DIR_MODE)
    return path


def _private_open(path: str | os.PathLike[str], mode: str = "w") -> IO[Any]:
    """Open for writing a file that is owner-only (0o600) from creation, never briefly public.

    ``mode`` is ``"w"``, ``"a"``, ``"wb"`` or ``"ab"``.
    """
    if mode not in ("w", "a", "wb", "ab"):
        raise ValueError(f"mode must be w, a, wb or ab, got {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = os.open(path, flags, _FILE_MODE)
    os.fchmod(fd, _FILE_MODE)  # an existing file would otherwise keep its old mode
    return os.fdopen(fd, mode)


def _save_private(obj: Any, path: Path) -> None:
    with _private_open(path, "wb") as f:
        torch.save(obj, f)


def _json_safe(value: Any) -> Any:
    """Tensors/arrays to lists and NaN/inf to None (strict JSON), recursively."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an existing ``leakage.jsonl`` (none if it is missing; torn lines skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and {"round", "client", "attack"} <= row.keys():
            row.setdefault("defense", "none")
            rows.append(row)
    return rows


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The last row per (round, client, attack), in first-seen order (resumed runs)."""
    latest: dict[tuple[Any, str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["round"], str(r["client"]), str(r["attack"]))] = dict(r)
    return list(latest.values())
