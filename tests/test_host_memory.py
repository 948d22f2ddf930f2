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


def rss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no Rss line")


@pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists() or not hasattr(mmap, "MADV_HUGEPAGE"),
    reason="needs Linux's /proc/self/smaps_rollup and mmap.madvise",
)
@pytest.mark.parametrize("advice", ["populate_write", "unknown to the kernel"])
def test_populate_commits_the_memory_when_made(advice, monkeypatch):
    """``populate`` faults every page in before anything touches the buffer (the adapters'
    host tier: no page faults while the model runs); a kernel without
    ``MADV_POPULATE_WRITE`` (EINVAL, as for any advice it does not know) gets the pages
    written instead. Without it, an untouched buffer holds no memory."""
    if advice != "populate_write":
        monkeypatch.setattr(host_memory, "MADV_POPULATE_WRITE", 9999)
    nbytes = 64 << 20
    before = rss_kib()
    lazy = host_memory.zeros(nbytes // 4, torch.float32)
    made_lazy = rss_kib()
    eager = host_memory.zeros((nbytes // 4 // 576, 576), torch.float32, populate=True)
    made_eager = rss_kib()
    assert made_lazy - before < 8 << 10
    assert made_eager - made_lazy >= (nbytes >> 10) * 15 // 16
    assert eager.shape == (nbytes // 4 // 576, 576) and torch.count_nonzero(eager) == 0
    assert torch.count_nonzero(lazy) == 0
