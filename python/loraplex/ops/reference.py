"""The torch reference for the segment-grouped LoRA ops: a loop of per-segment matmuls in
float64. It is the CPU fallback's specification and the tests' oracle (product code)."""

from __future__ import annotations


def sgmv_shrink(x, a, segments, out):
    """out[seg] = x[seg] @ a[slot]^T for each (start, length, slot); slot -1 rows get 0."""
    for start, length, slot in segments:
        rows = slice(start, start + length)
        if slot < 0:
            out[rows] = 0
        else:
            out[rows] = (x[rows].double() @ a[slot].double().T).to(out.dtype)


def sgmv_expand(y, b, segments, out, offset=0):
    """out[seg, offset:offset+O] += y[seg] @ b[slot]^T; slot -1 rows untouched."""
    width = b.shape[1]
    for start, length, slot in segments:
        if slot < 0:
            continue
        rows = slice(start, start + length)
        delta = y[rows].double() @ b[slot].double().T
        out[rows, offset : offset + width] = (
            out[rows, offset : offset + width].double() + delta
        ).to(out.dtype)


def bgmv_shrink(x, a, slots, out):
    """out[t] = x[t] @ a[slots[t]]^T; slot -1 gives 0."""
    sgmv_shrink(x, a, [(t, 1, int(s)) for t, s in enumerate(slots.tolist())], out)


def bgmv_expand(y, b, slots, out, offset=0):
    """out[t, offset:offset+O] += y[t] @ b[slots[t]]^T; slot -1 untouched."""
    sgmv_expand(y, b, [(t, 1, int(s)) for t, s in enumerate(slots.tolist())], out, offset)
