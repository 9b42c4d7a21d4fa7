"""Import the Flower glue as ``precode_flower.strategies``, ``.clients`` and ``.federation``.

The repository keeps the Flower glue beside the core (``strategies/``, ``clients/``,
``federation/`` at the root), while an installed package holds it inside
``precode_flower/`` (``package-dir`` in pyproject.toml), so that no generic top-level name
is ever installed. A source tree that is not installed that way, a checkout run from its
root or a Flower app bundle (FAB) that a SuperLink unpacks, would otherwise find
``precode_flower`` but not its glue; this finder maps the glue names onto the directories
beside the package, and only for a precode-flower tree.
This module imports nothing from Flower.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

#: Subpackages that live at the repository root in a source tree.
GLUE = ("strategies", "clients", "federation")


class _SourceTreeGlue(importlib.abc.MetaPathFinder):
    """Finds ``precode_flower.<glue>`` in ``<root>/<glue>/`` of a precode-flower source tree."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in GLUE:
            return None
        init = self.root / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def _is_source_tree(root: Path) -> bool:
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return 'name = "precode-flower"' in text


def source_root() -> Path | None:
    """The precode-flower source tree this package sits in (its root), or None if installed."""
    here = Path(__file__).resolve().parent
    if all((here / name).is_dir() for name in GLUE):
        return None
    return here.parent if _is_source_tree(here.parent) else None


def install() -> None:
    """Add the finder when this package sits in a source tree rather than an install."""
    root = source_root()
    if root is None:
        return  # installed layout: the glue is inside the package
    if not any(isinstance(f, _SourceTreeGlue) for f in sys.meta_path):
        # Ahead of setuptools' editable finder, so a tree's own glue wins over another install's.
        sys.meta_path.insert(0, _SourceTreeGlue(root))
