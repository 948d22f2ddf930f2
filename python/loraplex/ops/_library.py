"""Loading a torch extension built on first use, falling back with one warning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def load_or_warn(build: Callable[[], Path], what: str, fallback: str) -> bool:
    """Builds (or reuses) and loads the library ``build`` returns; on any failure warns
    naming ``what`` and ``fallback`` and returns False."""
    try:
        torch.ops.load_library(str(build()))
    except Exception as e:  # a missing toolkit, compiler or ninja raises many kinds
        warnings.warn(
            f"loraplex: {what} unavailable ({type(e).__name__}: {e}); {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True
