"""Segment-grouped LoRA ops, one contract, two implementations (Punica's SGMV / BGMV).

``segments`` is a list of ``(start, length, slot)`` over the rows of the flat token batch;
``slots`` (BGMV) holds one slot per row. Slot ``-1`` means "no adapter".

- ``sgmv_shrink(x, a, segments, out)``: ``out[seg] = x[seg] @ a[slot]^T`` (slot -1: 0).
  x ``[T, in]``, a ``[S, R, in]``, out ``[T, R]`` written in place; same dtype.
- ``sgmv_expand(y, b, segments, out, offset=0)``:
  ``out[seg, offset:offset+O] += y[seg] @ b[slot]^T`` (slot -1: untouched).
  y ``[T, R]``, b ``[S, O, R]``, out ``[T, >= offset+O]`` accumulated in place.
- ``bgmv_shrink(x, a, slots, out)`` / ``bgmv_expand(y, b, slots, out, offset=0)``: the same
  with ``slots`` ``[T]`` (int64), one per row — the decode case.

The CPU implementation (``ops.cpu``) is plain torch and also runs on CUDA tensors; the
hand-written CUDA kernels (``cuda/``) take over for CUDA tensors when built. ``ops.reference``
(float64 loops) is the oracle both are tested against.
"""

from __future__ import annotations

from loraplex.ops import cpu


def _impl(t):
    if t.is_cuda:
        from loraplex.ops import cuda

        if cuda.available():
            return cuda
    return cpu


def sgmv_shrink(x, a, segments, out):
    _impl(x).sgmv_shrink(x, a, segments, out)


def sgmv_expand(y, b, segments, out, offset=0):
    _impl(y).sgmv_expand(y, b, segments, out, offset)


def bgmv_shrink(x, a, slots, out):
    _impl(x).bgmv_shrink(x, a, slots, out)


def bgmv_expand(y, b, slots, out, offset=0):
    _impl(y).bgmv_expand(y, b, slots, out, offset)


__all__ = ["bgmv_expand", "bgmv_shrink", "sgmv_expand", "sgmv_shrink"]
