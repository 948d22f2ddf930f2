"""The CPU implementation: one GEMM per segment (the scheduler orders the batch so each
adapter's tokens are contiguous, so a step has at most ``max_loras + 1`` segments), writing
into ``out`` without temporaries. Per-token slots (BGMV) are grouped by slot first."""

from __future__ import annotations

import torch


def sgmv_shrink(x, a, segments, out):
    for start, length, slot in segments:
        rows = slice(start, start + length)
        if slot < 0:
            out[rows].zero_()
        else:
            torch.matmul(x[rows], a[slot].T, out=out[rows])


def sgmv_expand(y, b, segments, out, offset=0):
    width = b.shape[1]
    for start, length, slot in segments:
        if slot >= 0:
            rows = slice(start, start + length)
            out[rows, offset : offset + width].addmm_(y[rows], b[slot].T)


def _groups(slots: torch.Tensor):
    """(slot, token indices) for each adapter slot present; slot -1 excluded."""
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            yield slot, (slots == slot).nonzero().squeeze(1)


def bgmv_shrink(x, a, slots, out):
    out.zero_()
    for slot, idx in _groups(slots):
        out.index_copy_(0, idx, x[idx] @ a[slot].T)


def bgmv_expand(y, b, slots, out, offset=0):
    width = b.shape[1]
    view = out[:, offset : offset + width]
    for slot, idx in _groups(slots):
        view.index_add_(0, idx, y[idx] @ b[slot].T)
