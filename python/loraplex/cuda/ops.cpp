// Torch bindings of the SGMV / BGMV kernels: argument checks, dtype dispatch, device guard,
// current stream, and TORCH_LIBRARY registration. The kernels themselves (sgmv.cuh) never
// see a torch header.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sgmv.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_LAST_CONTIGUOUS(x) TORCH_CHECK((x).stride(-1) == 1, #x " must be contiguous in its last dim")
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(d, x) TORCH_CHECK((x).dim() == (d), #x " must have " #d " dims, got ", (x).dim())
#define CHECK_EQ(a, b) TORCH_CHECK((a) == (b), "expected " #a " == " #b ", got ", (a), " vs ", (b))

namespace {

// float / half / bfloat16 -> the kernels' element type
#define LORAPLEX_DISPATCH(dtype, NAME, ...)                                        \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); } \
      case at::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); } \
      case at::ScalarType::BFloat16: {                                             \
        using scalar_t = __nv_bfloat16;                                            \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);             \
    }                                                                              \
  }()

loraplex::Segments segments(const at::Tensor& starts, const at::Tensor& lengths,
                            const at::Tensor& slots, int64_t max_length) {
  for (const auto* t : {&starts, &lengths, &slots}) {
    CHECK_CUDA(*t);
    CHECK_CONTIGUOUS(*t);
    CHECK_DIM(1, *t);  // [num_segments]
    TORCH_CHECK(t->scalar_type() == at::kInt, "segment tables must be int32");
  }
  CHECK_EQ(starts.size(0), lengths.size(0));
  CHECK_EQ(starts.size(0), slots.size(0));
  return {starts.data_ptr<int32_t>(), lengths.data_ptr<int32_t>(), slots.data_ptr<int32_t>(),
          static_cast<int32_t>(starts.size(0)), static_cast<int32_t>(max_length)};
}

void sgmv_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& starts,
                 const at::Tensor& lengths, const at::Tensor& slots, int64_t max_length,
                 at::Tensor& out) {
  CHECK_CUDA(x); CHECK_CUDA(a); CHECK_CUDA(out);
  CHECK_DIM(2, x);    // [T, in]
  CHECK_DIM(3, a);    // [S, R, in]
  CHECK_DIM(2, out);  // [T, R]
  CHECK_LAST_CONTIGUOUS(x); CHECK_CONTIGUOUS(a); CHECK_LAST_CONTIGUOUS(out);
  CHECK_EQ(x.size(1), a.size(2));
  CHECK_EQ(out.size(1), a.size(1));
  CHECK_EQ(x.size(0), out.size(0));
  TORCH_CHECK(x.scalar_type() == a.scalar_type() && x.scalar_type() == out.scalar_type(),
              "x, a and out must share a dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto segs = segments(starts, lengths, slots, max_length);
  auto stream = at::cuda::getCurrentCUDAStream();
  LORAPLEX_DISPATCH(x.scalar_type(), "sgmv_shrink", [&] {
    auto err = loraplex::sgmv_shrink<scalar_t>(
        reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0),
        reinterpret_cast<const scalar_t*>(a.data_ptr()),
        reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0), segs,
        static_cast<int32_t>(x.size(1)), static_cast<int32_t>(a.size(1)), stream);
    TORCH_CHECK(err == cudaSuccess, "sgmv_shrink: ", cudaGetErrorString(err));
  });
}

void sgmv_expand(const at::Tensor& y, const at::Tensor& b, const at::Tensor& starts,
                 const at::Tensor& lengths, const at::Tensor& slots, int64_t max_length,
                 at::Tensor& out, int64_t offset) {
  CHECK_CUDA(y); CHECK_CUDA(b); CHECK_CUDA(out);
  CHECK_DIM(2, y);    // [T, R]
  CHECK_DIM(3, b);    // [S, O, R]
  CHECK_DIM(2, out);  // [T, >= offset + O]
  CHECK_LAST_CONTIGUOUS(y); CHECK_CONTIGUOUS(b); CHECK_LAST_CONTIGUOUS(out);
  CHECK_EQ(y.size(1), b.size(2));
  CHECK_EQ(y.size(0), out.size(0));
  TORCH_CHECK(offset >= 0 && offset + b.size(1) <= out.size(1), "offset + O exceeds out's width");
  TORCH_CHECK(y.scalar_type() == b.scalar_type() && y.scalar_type() == out.scalar_type(),
              "y, b and out must share a dtype");
  const c10::cuda::CUDAGuard guard(y.device());
  auto segs = segments(starts, lengths, slots, max_length);
  auto stream = at::cuda::getCurrentCUDAStream();
  LORAPLEX_DISPATCH(y.scalar_type(), "sgmv_expand", [&] {
    auto err = loraplex::sgmv_expand<scalar_t>(
        reinterpret_cast<const scalar_t*>(y.data_ptr()), y.stride(0),
        reinterpret_cast<const scalar_t*>(b.data_ptr()),
        reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
        static_cast<int32_t>(offset), segs, static_cast<int32_t>(b.size(2)),
        static_cast<int32_t>(b.size(1)), stream);
    TORCH_CHECK(err == cudaSuccess, "sgmv_expand: ", cudaGetErrorString(err));
  });
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("sgmv_shrink(Tensor x, Tensor a, Tensor starts, Tensor lengths, Tensor slots, "
        "int max_length, Tensor! out) -> ()");
  m.def("sgmv_expand(Tensor y, Tensor b, Tensor starts, Tensor lengths, Tensor slots, "
        "int max_length, Tensor! out, int offset) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CUDA, m) {
  m.impl("sgmv_shrink", &sgmv_shrink);
  m.impl("sgmv_expand", &sgmv_expand);
}
