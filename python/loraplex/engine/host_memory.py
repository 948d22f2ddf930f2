"""Large host buffers on transparent huge pages.

The CPU backend's big, long-lived tensors (the KV cache, the adapters' host tier) are read
all over at every step: over 4 KiB pages, a 256-slot step over 1,000 adapters touches
hundreds of thousands of pages (on huge pages, 8 adapters' LoRA overhead went from 27.6% to
~10% in benches/README.md). On Linux with
``transparent_hugepage`` at ``madvise`` (the common default), memory is backed by 2 MiB
pages only where asked; this asks, for the buffers loraplex owns: an anonymous mapping
(zero-filled by the kernel), ``madvise(MADV_HUGEPAGE)`` before first touch, viewed as a
tensor. Elsewhere (no ``MADV_HUGEPAGE``, a buffer under 2 MiB) it is ``torch.zeros``.

``populate`` commits the memory when the buffer is made, as a device's memory is. The
adapters' host tier asks for it (the CPU backend's kernels read it): a loader's first copy
into a slot no longer takes the page faults while the model runs (on this project's VM a
first touch of fresh memory ran at 0.8 GB/s, against 15 GB/s for memory touched before; in a
thousand-adapter run the loader's copies took 4.0 ms per adapter, 1.0 ms committed, see
benches/README.md), and a tier larger than the memory free fails when the engine is built
(``MemoryError``, or the kernel's OOM killer there), not in the middle of serving.
"""

from __future__ import annotations

import errno
import math
import mmap

import torch

HUGE_PAGE = 2 << 20
PAGE = 4 << 10  # the smallest page: writing one byte in each faults every page in
MADV_POPULATE_WRITE = 23  # Linux 5.14+ (Python 3.11's mmap does not name it)


def zeros(shape, dtype: torch.dtype, populate: bool = False) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape``, on huge pages where the OS offers them; with
    ``populate``, its memory committed now (``MemoryError`` if the machine lacks it)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)  # (writes every byte: committed either way)
    # private: a shared anonymous mapping is shmem, which THP's madvise mode leaves alone
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(advice)
    except OSError:  # THP off in this kernel: plain pages, still zero-filled
        pass
    # the tensor keeps the mapping alive; the kernel fills it with zeros as pages are touched
    tensor = torch.frombuffer(buf, dtype=dtype, count=numel)
    if populate:
        _populate(buf, tensor, nbytes)
    return tensor.view(shape)


def _populate(buf: mmap.mmap, tensor: torch.Tensor, nbytes: int) -> None:
    """Faults every page of ``buf`` in (huge ones where advised) before anything reads it."""
    try:
        buf.madvise(MADV_POPULATE_WRITE)
        return
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise MemoryError(
                f"cannot commit {nbytes / (1 << 30):.2f} GiB of host memory: the machine "
                "has not got it free"
            ) from None
        # EINVAL: a kernel before 5.14; fault the pages in by writing a zero into each
    tensor.view(torch.uint8)[::PAGE].zero_()
