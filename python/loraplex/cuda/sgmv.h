// Launchers for the segment-grouped LoRA kernels. Plain C++: no torch here, so the .cu files
// that implement them compile in seconds (the torch headers stay in ops.cpp).
//
// A problem is a list of segments (start, length, slot) over the rows of a flat token batch;
// slot -1 means "no adapter".
//   shrink: out[t, r]          = sum_i x[t, i] * a[slot, r, i]             (slot -1: 0)
//   expand: out[t, off + o]   += sum_r y[t, r] * b[slot, o, r]             (slot -1: untouched)
// Row strides are given in elements; the last dimension of every tensor is contiguous.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace loraplex {

struct Segments {
  const int32_t* starts;  // [num_segments]
  const int32_t* lengths;  // [num_segments]
  const int32_t* slots;   // [num_segments], -1 = no adapter
  int32_t num_segments;
  int32_t max_length;     // longest segment (grid size along tokens)
};

template <typename T>
cudaError_t sgmv_shrink(const T* x, int64_t x_stride, const T* a, T* out, int64_t out_stride,
                        Segments segs, int32_t in_features, int32_t rank, cudaStream_t stream);

template <typename T>
cudaError_t sgmv_expand(const T* y, int64_t y_stride, const T* b, T* out, int64_t out_stride,
                        int32_t out_offset, Segments segs, int32_t rank, int32_t out_features,
                        cudaStream_t stream);

}  // namespace loraplex
