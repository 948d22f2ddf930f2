// The CPU LoRA op: for one merged projection, every segment's shrink and expand in one call,
// split over tokens with at::parallel_for. float32, AVX2 + FMA (the caller checks the CPU).
//
//   lora_apply(x [T, in], a [S, k*R, in], bt [S, k*R, O], segments [n, 3] int64, out [T, O],
//              splits [k + 1])
//   for each segment (start, length, slot), slot >= 0, and each module i < k:
//     out[rows, splits[i]:splits[i+1]] += (x[rows] @ a[slot, iR:(i+1)R]^T)
//                                         @ bt[slot, iR:(i+1)R, splits[i]:splits[i+1]]
//
// bt is B transposed, block diagonal: module i's B^T sits in rows iR.., columns splits[i]..;
// the expand reads only those blocks, so a merged q/k/v costs what three separate LoRAs do.
// Short segments (decode) are cut into work items of up to kTok tokens, run in parallel by
// these AVX2 kernels: an item's shrink result stays in a stack buffer and goes straight into
// its expand. Long segments (prefill) are GEMMs big enough for ATen's BLAS, which runs them
// near the CPU's peak: one mm for the shrink, one addmm per module for the expand.

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

namespace loraplex {
namespace {

constexpr int kTok = 4;          // tokens per work item
constexpr int64_t kMaxRows = 1024;  // k * R, bounded by the stack buffer
constexpr int64_t kLong = 32;       // segments at least this long go to BLAS

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m * ldy + r] = x[m] . a[r] for m < M, r < RB (RB rows of a from `a`); n = fan-in.
// M * RB independent accumulators keep both FMA ports busy even for one token.
template <int M, int RB>
inline void shrink_block(const float* x, int64_t ldx, const float* a, int64_t n, float* y,
                         int64_t ldy) {
  __m256 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 vx[M];
    for (int m = 0; m < M; ++m) vx[m] = _mm256_loadu_ps(x + m * ldx + i);
    for (int r = 0; r < RB; ++r) {
      const __m256 va = _mm256_loadu_ps(a + r * n + i);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(vx[m], va, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t j = i; j < n; ++j) s += x[m * ldx + j] * a[r * n + j];
      y[m * ldy + r] = s;
    }
  }
}

template <int M>
void shrink(const float* x, int64_t ldx, const float* a, int64_t rows, int64_t n, float* y,
            int64_t ldy) {
  constexpr int RB = M == 1 ? 8 : M == 2 ? 4 : 2;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) shrink_block<M, RB>(x, ldx, a + r * n, n, y + r, ldy);
  for (; r < rows; ++r) shrink_block<M, 1>(x, ldx, a + r * n, n, y + r, ldy);
}

// out[m, c] += sum_{r < R} y[m * ldy + r] * bt[r * ldb + c] for c in [c0, c1), CV vectors of
// 8 columns at a time (M * CV accumulators).
template <int M, int CV>
inline void expand_block(const float* y, int64_t ldy, const float* bt, int64_t ldb, int64_t R,
                         float* out, int64_t ldo, int64_t c) {
  __m256 acc[M][CV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_loadu_ps(out + m * ldo + c + 8 * v);
  for (int64_t r = 0; r < R; ++r) {
    __m256 vb[CV];
    for (int v = 0; v < CV; ++v) vb[v] = _mm256_loadu_ps(bt + r * ldb + c + 8 * v);
    for (int m = 0; m < M; ++m) {
      const __m256 vy = _mm256_broadcast_ss(y + m * ldy + r);
      for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_fmadd_ps(vy, vb[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) _mm256_storeu_ps(out + m * ldo + c + 8 * v, acc[m][v]);
}

template <int M>
void expand(const float* y, int64_t ldy, const float* bt, int64_t ldb, int64_t R, float* out,
            int64_t ldo, int64_t c0, int64_t c1) {
  constexpr int CV = M <= 2 ? 4 : 2;
  int64_t c = c0;
  for (; c + 8 * CV <= c1; c += 8 * CV) expand_block<M, CV>(y, ldy, bt, ldb, R, out, ldo, c);
  for (; c + 8 <= c1; c += 8) expand_block<M, 1>(y, ldy, bt, ldb, R, out, ldo, c);
  for (; c < c1; ++c) {
    for (int m = 0; m < M; ++m) {
      float s = out[m * ldo + c];
      for (int64_t r = 0; r < R; ++r) s += y[m * ldy + r] * bt[r * ldb + c];
      out[m * ldo + c] = s;
    }
  }
}

struct Item {
  int64_t start;  // first token row
  int slot;
  int count;  // tokens: 1..kTok for a work item, the length for a long segment
};

template <int M>
void run_item(const Item& it, const float* x, int64_t ldx, const float* a, const float* bt,
              float* out, int64_t ldo, int64_t rows, int64_t n, int64_t O,
              const std::vector<int64_t>& splits, float* y) {
  const float* a_s = a + it.slot * rows * n;
  const float* bt_s = bt + it.slot * rows * O;
  shrink<M>(x + it.start * ldx, ldx, a_s, rows, n, y, kMaxRows);
  const int64_t k = static_cast<int64_t>(splits.size()) - 1;
  const int64_t R = rows / k;
  for (int64_t i = 0; i < k; ++i) {
    expand<M>(y + i * R, kMaxRows, bt_s + i * R * O, O, R, out + it.start * ldo, ldo,
              splits[i], splits[i + 1]);
  }
}

void lora_apply(const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                const at::Tensor& segments, const at::Tensor& out, at::IntArrayRef splits) {
  for (const at::Tensor* t : {&x, &a, &bt, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "lora_apply: x, a, bt and out must be float32 CPU tensors");
  }
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && bt.dim() == 3 && out.dim() == 2,
              "lora_apply: x [T, in], a [S, kR, in], bt [S, kR, O], out [T, O]");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous(), "lora_apply: a and bt must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "lora_apply: x and out rows must be dense");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == 3 && segments.is_contiguous(),
              "lora_apply: segments must be a contiguous int64 [n, 3] (start, length, slot)");
  const int64_t T = x.size(0), n = x.size(1), S = a.size(0), rows = a.size(1), O = bt.size(2);
  const int64_t k = static_cast<int64_t>(splits.size()) - 1;
  TORCH_CHECK(a.size(2) == n && bt.size(0) == S && bt.size(1) == rows && out.size(0) == T &&
                  out.size(1) == O,
              "lora_apply: shapes disagree: x ", x.sizes(), ", a ", a.sizes(), ", bt ",
              bt.sizes(), ", out ", out.sizes());
  TORCH_CHECK(k >= 1 && rows % k == 0 && rows <= kMaxRows && splits[0] == 0 && splits[k] == O,
              "lora_apply: splits must run 0..", O, " over k modules dividing ", rows,
              " rows (at most ", kMaxRows, ")");
  std::vector<int64_t> cols(splits.begin(), splits.end());
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(cols[i] <= cols[i + 1], "lora_apply: splits must not decrease");
  }

  std::vector<Item> items, long_segments;
  const int64_t* seg = segments.data_ptr<int64_t>();
  for (int64_t s = 0; s < segments.size(0); ++s) {
    const int64_t start = seg[3 * s], length = seg[3 * s + 1], slot = seg[3 * s + 2];
    TORCH_CHECK(start >= 0 && length >= 0 && start + length <= T, "lora_apply: segment ", s,
                " (", start, ", ", length, ") runs outside the ", T, " rows");
    TORCH_CHECK(slot < S, "lora_apply: segment ", s, " names slot ", slot, " of ", S);
    if (slot < 0 || length == 0) continue;
    if (length >= kLong) {
      long_segments.push_back({start, static_cast<int>(slot), static_cast<int>(length)});
      continue;
    }
    for (int64_t t = 0; t < length; t += kTok) {
      const int count = static_cast<int>(std::min<int64_t>(kTok, length - t));
      items.push_back({start + t, static_cast<int>(slot), count});
    }
  }
  // Long segments one after the other, each GEMM on every thread (measured: no faster run
  // side by side, one single-threaded GEMM per thread).
  const int64_t R = rows / k;
  for (const Item& it : long_segments) {
    const at::Tensor rows_out = out.narrow(0, it.start, it.count);
    const at::Tensor y = at::mm(x.narrow(0, it.start, it.count), a[it.slot].t());
    const at::Tensor b_s = bt[it.slot];
    for (int64_t i = 0; i < k; ++i) {
      const int64_t width = cols[i + 1] - cols[i];
      rows_out.narrow(1, cols[i], width)
          .addmm_(y.narrow(1, i * R, R), b_s.narrow(0, i * R, R).narrow(1, cols[i], width));
    }
  }
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    alignas(32) float y[kTok * kMaxRows];
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      switch (it.count) {
        case 1: run_item<1>(it, xp, ldx, ap, bp, op, ldo, rows, n, O, cols, y); break;
        case 2: run_item<2>(it, xp, ldx, ap, bp, op, ldo, rows, n, O, cols, y); break;
        case 3: run_item<3>(it, xp, ldx, ap, bp, op, ldo, rows, n, O, cols, y); break;
        default: run_item<4>(it, xp, ldx, ap, bp, op, ldo, rows, n, O, cols, y); break;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def("lora_apply(Tensor x, Tensor a, Tensor bt, Tensor segments, Tensor(a!) out, int[] splits) -> ()");
  m.impl("lora_apply", c10::DispatchKey::CPU, TORCH_FN(lora_apply));
}

}  // namespace loraplex
