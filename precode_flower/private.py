"""Owner-only run outputs: directories 0o700, files 0o600, from the moment they exist.

Everything a run writes can reveal a client's data, not only the auditor's
reconstructions: from the global model after a FedSGD round with batch size 1 (in
``checkpoint.pt`` or ``model.pt``) and the seed in ``config.json`` the server's own
inversion rebuilds the client's training image exactly, and anyone who can read the
files can do the same. So every writer of a run directory goes through these functions:
a file is created with mode 0o600 (no window in which it is readable by others) and an
existing file or directory is brought to owner-only as it is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

__all__ = ["DIR_MODE", "FILE_MODE", "open_private", "private_dir", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents, which follow the umask) and make it 0o700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    path.chmod(DIR_MODE)  # an existing directory keeps its mode otherwise
    return path


def open_private(path: str | os.PathLike[str], mode: str = "w") -> IO[Any]:
    """Open ``path`` for writing (``"w"``, ``"a"``, ``"wb"``, ``"ab"``) as an owner-only file."""
    if mode not in ("w", "a", "wb", "ab"):
        raise ValueError(f"mode must be w, a, wb or ab, got {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file would otherwise keep its old mode
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Replace ``path`` atomically by an owner-only file holding ``data``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_private(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
