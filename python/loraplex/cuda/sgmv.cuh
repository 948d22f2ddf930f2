// Kernel templates for sgmv.h, in the Punica manner: shrink splits the input dimension over
// a warp's lanes (16-byte vector loads where aligned) and reduces with shuffles; expand tiles
// the output dimension over threads, with the segment's low-rank rows staged in shared memory.
// Accumulation is always in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sgmv.h"

namespace loraplex {
namespace detail {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

constexpr int kWarp = 32;
constexpr int kShrinkWarps = 4;     // rank rows per shrink block (one per warp)
constexpr int kTokensPerBlock = 8;  // tokens per block along a segment
constexpr int kExpandThreads = 128; // output columns per expand block
constexpr int kMaxRank = 512;    // rank columns staged at a time: kTokensPerBlock * kMaxRank
                                 // floats (16 KiB) of shared memory

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Dot product of two rows of length n, lanes striding over VEC-element vectors.
template <typename T, int VEC>
__device__ __forceinline__ float row_dot(const T* __restrict__ u, const T* __restrict__ w, int n) {
  float acc = 0.f;
  if constexpr (VEC > 1) {
    using Vec = uint4;  // 16 bytes
    const int num_vec = n / VEC;
    for (int v = threadIdx.x % kWarp; v < num_vec; v += kWarp) {
      Vec uv = reinterpret_cast<const Vec*>(u)[v];
      Vec wv = reinterpret_cast<const Vec*>(w)[v];
      const T* ue = reinterpret_cast<const T*>(&uv);
      const T* we = reinterpret_cast<const T*>(&wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += to_float(ue[e]) * to_float(we[e]);
    }
  } else {
    for (int i = threadIdx.x % kWarp; i < n; i += kWarp) acc += to_float(u[i]) * to_float(w[i]);
  }
  return warp_sum(acc);
}

// grid: (segment, rank tile of kShrinkWarps rows, token tile of kTokensPerBlock)
template <typename T, int VEC>
__global__ void sgmv_shrink_kernel(const T* __restrict__ x, int64_t x_stride,
                                   const T* __restrict__ a, T* __restrict__ out,
                                   int64_t out_stride, Segments segs, int in_features, int rank) {
  const int seg = blockIdx.x;
  const int r = blockIdx.y * kShrinkWarps + threadIdx.x / kWarp;
  const int first = blockIdx.z * kTokensPerBlock;
  const int length = segs.lengths[seg];
  if (r >= rank || first >= length) return;
  const int slot = segs.slots[seg];
  const int start = segs.starts[seg];
  const int last = min(first + kTokensPerBlock, length);
  const T* w = slot >= 0 ? a + (static_cast<int64_t>(slot) * rank + r) * in_features : nullptr;
  for (int t = start + first; t < start + last; ++t) {
    float v = w != nullptr ? row_dot<T, VEC>(x + t * x_stride, w, in_features) : 0.f;
    if (threadIdx.x % kWarp == 0) out[t * out_stride + r] = from_float<T>(v);
  }
}

// grid: (segment, output tile of kExpandThreads columns, token tile of kTokensPerBlock)
template <typename T>
__global__ void sgmv_expand_kernel(const T* __restrict__ y, int64_t y_stride,
                                   const T* __restrict__ b, T* __restrict__ out,
                                   int64_t out_stride, int out_offset, Segments segs, int rank,
                                   int out_features) {
  __shared__ float ys[kTokensPerBlock][kMaxRank];
  const int seg = blockIdx.x;
  const int slot = segs.slots[seg];
  const int first = blockIdx.z * kTokensPerBlock;
  const int length = segs.lengths[seg];
  if (slot < 0 || first >= length) return;
  const int start = segs.starts[seg];
  const int count = min(kTokensPerBlock, length - first);
  const int o = blockIdx.y * kExpandThreads + threadIdx.x;
  const bool active = o < out_features;  // every thread stages; only these accumulate
  const T* w = b + (static_cast<int64_t>(slot) * out_features + (active ? o : 0)) * rank;
  float acc[kTokensPerBlock] = {};
  // the segment's low-rank rows pass through shared memory kMaxRank columns at a time
  for (int k0 = 0; k0 < rank; k0 += kMaxRank) {
    const int chunk = min(kMaxRank, rank - k0);
    __syncthreads();  // everyone is done with the previous chunk
    for (int k = threadIdx.x; k < count * chunk; k += blockDim.x) {
      const int64_t row = start + first + k / chunk;
      ys[k / chunk][k % chunk] = to_float(y[row * y_stride + k0 + k % chunk]);
    }
    __syncthreads();
    if (!active) continue;
    for (int k = 0; k < chunk; ++k) {
      const float wk = to_float(w[k0 + k]);
#pragma unroll
      for (int i = 0; i < kTokensPerBlock; ++i) acc[i] += ys[i][k] * wk;
    }
  }
  if (!active) return;
  for (int i = 0; i < count; ++i) {
    T* dst = out + (start + first + i) * out_stride + out_offset + o;
    *dst = from_float<T>(to_float(*dst) + acc[i]);
  }
}

}  // namespace detail

template <typename T>
cudaError_t sgmv_shrink(const T* x, int64_t x_stride, const T* a, T* out, int64_t out_stride,
                        Segments segs, int32_t in_features, int32_t rank, cudaStream_t stream) {
  using namespace detail;
  if (segs.num_segments == 0 || segs.max_length == 0 || rank == 0) return cudaSuccess;
  dim3 grid(segs.num_segments, (rank + kShrinkWarps - 1) / kShrinkWarps,
            (segs.max_length + kTokensPerBlock - 1) / kTokensPerBlock);
  dim3 block(kShrinkWarps * kWarp);
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = in_features % kVec == 0 && x_stride % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a) % 16 == 0;
  if (aligned) {
    sgmv_shrink_kernel<T, kVec><<<grid, block, 0, stream>>>(x, x_stride, a, out, out_stride, segs,
                                                            in_features, rank);
  } else {
    sgmv_shrink_kernel<T, 1><<<grid, block, 0, stream>>>(x, x_stride, a, out, out_stride, segs,
                                                         in_features, rank);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t sgmv_expand(const T* y, int64_t y_stride, const T* b, T* out, int64_t out_stride,
                        int32_t out_offset, Segments segs, int32_t rank, int32_t out_features,
                        cudaStream_t stream) {
  using namespace detail;
  if (segs.num_segments == 0 || segs.max_length == 0 || out_features == 0) return cudaSuccess;
  dim3 grid(segs.num_segments, (out_features + kExpandThreads - 1) / kExpandThreads,
            (segs.max_length + kTokensPerBlock - 1) / kTokensPerBlock);
  sgmv_expand_kernel<T><<<grid, kExpandThreads, 0, stream>>>(y, y_stride, b, out, out_stride,
                                                             out_offset, segs, rank, out_features);
  return cudaGetLastError();
}

}  // namespace loraplex

// One line per dtype in each tiny .cu file.
#define LORAPLEX_INSTANTIATE(T)                                                               \
  template cudaError_t loraplex::sgmv_shrink<T>(const T*, int64_t, const T*, T*, int64_t,      \
                                                loraplex::Segments, int32_t, int32_t,          \
                                                cudaStream_t);                                 \
  template cudaError_t loraplex::sgmv_expand<T>(const T*, int64_t, const T*, T*, int64_t,      \
                                                int32_t, loraplex::Segments, int32_t, int32_t, \
                                                cudaStream_t);
