"""The CUDA kernels as torch ops (``torch.ops.loraplex.*``): built on first use (JIT, cached
per torch version), with fake implementations so they trace under torch.compile. If they
cannot be built, one warning, and the torch path serves CUDA tensors instead."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loraplex.ops._library import load_or_warn

_state: dict[str, bool] = {}


def available() -> bool:
    if "ok" not in _state:
        _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    from loraplex.ops import cuda_build

    cache = Path(os.environ.get("LORAPLEX_CUDA_CACHE", Path.home() / ".cache" / "loraplex"))
    ok = load_or_warn(
        lambda: cuda_build.build(cache / f"cuda-torch{torch.__version__}"),
        "CUDA SGMV kernels",
        "CUDA tensors take the torch path",
    )
    if ok:
        _register_fakes()
    return ok


def _register_fakes() -> None:
    for name in ("sgmv_shrink", "sgmv_expand"):
        torch.library.register_fake(f"loraplex::{name}")(lambda *args, **kwargs: None)


def _tables(segments, device):
    t = torch.tensor(segments, dtype=torch.int32).reshape(-1, 3)
    starts, lengths, slots = (c.contiguous().to(device) for c in t.unbind(1))
    return starts, lengths, slots, int(t[:, 1].max()) if len(t) else 0


def sgmv_shrink(x, a, segments, out):
    starts, lengths, slots, longest = _tables(segments, x.device)
    torch.ops.loraplex.sgmv_shrink(x, a, starts, lengths, slots, longest, out)


def sgmv_expand(y, b, segments, out, offset=0):
    starts, lengths, slots, longest = _tables(segments, y.device)
    torch.ops.loraplex.sgmv_expand(y, b, starts, lengths, slots, longest, out, offset)


def _per_token(slots):
    n = slots.shape[0]
    starts = torch.arange(n, dtype=torch.int32, device=slots.device)
    return starts, torch.ones_like(starts), slots.to(torch.int32).contiguous(), 1 if n else 0


def bgmv_shrink(x, a, slots, out):
    torch.ops.loraplex.sgmv_shrink(x, a, *_per_token(slots), out)


def bgmv_expand(y, b, slots, out, offset=0):
    torch.ops.loraplex.sgmv_expand(y, b, *_per_token(slots), out, offset)
