"""Host buffers on huge pages (``engine.host_memory``): zero-filled tensors of the shape and
dtype asked, each its own private memory; on Linux with THP at ``madvise`` or ``always``, a
large one is backed by huge pages once touched."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from loraplex.engine import host_memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (64, 24, 576)])  # under and over 2 MiB
def test_zeros_are_zero_private_and_writable(shape, dtype):
    a, b = host_memory.zeros(shape, dtype), host_memory.zeros(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.is_contiguous()
    assert torch.count_nonzero(a) == 0
    a.fill_(1)
    assert torch.count_nonzero(b) == 0  # no memory shared between buffers
    assert torch.count_nonzero(a) == a.numel()


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no AnonHugePages line")


def thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text.split("[")[1].split("]")[0] if "[" in text else "absent"


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or thp_mode() not in ("madvise", "always"),
    reason="transparent huge pages are not offered here (not Linux, or THP off)",
)
def test_a_large_buffer_gets_huge_pages():
    before = anon_huge_kib()
    t = host_memory.zeros((64 << 20) // 4, torch.float32)  # 64 MiB
    t.fill_(1)
    # the kernel may fall back to small pages under fragmentation; most of 64 MiB it backs
    assert anon_huge_kib() - before >= 32 << 10
