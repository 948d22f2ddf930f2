"""The CPU implementation: one GEMM per segment (the scheduler orders the batch so each
adapter's tokens are contiguous, so a step has at most ``max_loras + 1`` segments), writing
into ``out`` without temporaries. Per-token slots (BGMV) are grouped by slot first."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class PaddedLayout:
    """The adapter segments of a step as a grid: one row per slot in ``lo..hi`` (the slot
    stacks' rows, taken as a view), ``max_len`` columns. Each segment's tokens fill its slot's
    row; the rest is padding. With it a projection's LoRA is one batched GEMM per stage instead
    of one GEMM per segment — the decode case, where segments are short and many."""

    lo: int
    hi: int
    index: torch.Tensor  # [n, L] flat-batch row per cell (0 for padding)
    valid: torch.Tensor  # [n, L] bool
    rows: torch.Tensor  # [N] index[valid]: where the valid cells go back
    # no padding at all (equal, back-to-back segments on consecutive slots — always so for a
    # single adapter): the grid is a view of rows dense_start.., no gather or scatter needed
    dense_start: int | None = None


def padded_layout(segments, max_waste: float = 1.0) -> PaddedLayout | None:
    """The grid for ``segments`` (slot -1 ones dropped), or None when padding would add more
    than ``max_waste`` times the real rows (then the per-segment loop is cheaper), or when a
    slot has several segments (the scheduler never makes those; the loop handles them)."""
    segs = [s for s in segments if s[2] >= 0 and s[1] > 0]
    if not segs or len({s[2] for s in segs}) < len(segs):
        return None
    lo, hi = min(s[2] for s in segs), max(s[2] for s in segs)
    width = max(s[1] for s in segs)
    real = sum(s[1] for s in segs)
    if (hi - lo + 1) * width > (1 + max_waste) * real:
        return None
    ordered = sorted(segs)
    back_to_back = all(a[0] + a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
    consecutive = [s[2] for s in ordered] == list(range(lo, hi + 1))
    dense = back_to_back and consecutive and all(s[1] == width for s in segs)
    index = torch.zeros(hi - lo + 1, width, dtype=torch.long)
    valid = torch.zeros(hi - lo + 1, width, dtype=torch.bool)
    for start, length, slot in segs:
        index[slot - lo, :length] = torch.arange(start, start + length)
        valid[slot - lo, :length] = True
    start = ordered[0][0] if dense else None
    return PaddedLayout(lo, hi, index, valid, index[valid], start)


def _grid(t: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """Rows of ``t`` as the dense grid ``[n, L, width]`` (a view)."""
    n, width = layout.index.shape
    assert layout.dense_start is not None
    return t[layout.dense_start : layout.dense_start + n * width].view(n, width, -1)


def shrink_padded(x, a, layout: PaddedLayout) -> torch.Tensor:
    """``[n, L, R]``: each grid cell's row of x times its slot's A (padding cells: garbage)."""
    grid = _grid(x, layout) if layout.dense_start is not None else x[layout.index]
    return torch.bmm(grid, a[layout.lo : layout.hi + 1].transpose(1, 2))


def expand_padded(y, b, layout: PaddedLayout, out, offset=0) -> None:
    """``out[row, offset:offset+O] += y[cell] @ b[slot]^T`` for the valid cells."""
    b_t = b[layout.lo : layout.hi + 1].transpose(1, 2)
    if layout.dense_start is not None and offset == 0 and b.shape[1] == out.shape[1]:
        _grid(out, layout).baddbmm_(y, b_t)  # in place, no temporaries
        return
    out[:, offset : offset + b.shape[1]].index_add_(0, layout.rows, torch.bmm(y, b_t)[layout.valid])
