"""Large host buffers on transparent huge pages.

The CPU backend's big, long-lived tensors (the KV cache, the adapters' host tier) are read
all over at every step: over 4 KiB pages, a 256-slot step over 1,000 adapters touches
hundreds of thousands of pages (on huge pages, 8 adapters' LoRA overhead went from 27.6% to
~10% in benches/README.md). On Linux with
``transparent_hugepage`` at ``madvise`` (the common default), memory is backed by 2 MiB
pages only where asked; this asks, for the buffers loraplex owns: an anonymous mapping
(zero-filled by the kernel), ``madvise(MADV_HUGEPAGE)`` before first touch, viewed as a
tensor. Elsewhere (no ``MADV_HUGEPAGE``, a buffer under 2 MiB) it is ``torch.zeros``.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape``, on huge pages where the OS offers them."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    # private: a shared anonymous mapping is shmem, which THP's madvise mode leaves alone
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(advice)
    except OSError:  # THP off in this kernel: plain pages, still zero-filled
        pass
    # the tensor keeps the mapping alive; the kernel fills it with zeros as pages are touched
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)
