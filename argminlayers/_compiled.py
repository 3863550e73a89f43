"""Optional compiled extensions (Cython, built by ``make env`` or ``pip install -e .``).

Each one speeds up work that its Python module also does in NumPy or torch: a checkout
without a C compiler imports nothing here and runs the same steps slower.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import ModuleType


def load_compiled(module: str, fallback: str) -> ModuleType | None:
    """The extension ``module`` (dotted name), or ``None`` where it was not built, or where it is
    older than its ``.pyx`` source (a checkout that changed the source since the build: said
    once, with ``fallback``, what runs meanwhile, until ``make env`` rebuilds it)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    built = Path(mod.__file__)
    source = built.parent / (module.rpartition(".")[2] + ".pyx")
    if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
        warnings.warn(f"{built} is older than its source {source.name}: rebuild it with `make env` (or "
                      f"`pip install -e .`); {fallback} meanwhile", RuntimeWarning, stacklevel=3)
        return None
    return mod
