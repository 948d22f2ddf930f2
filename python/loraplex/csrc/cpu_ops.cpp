// The C++ CPU ops, float32 activations with AVX2 + FMA + F16C (the caller checks the CPU); the
// LoRA items also in AVX-512 where the CPU has it (chosen at run time, `set_wide`).
//
// lora_apply, the LoRA of one merged projection: every segment's shrink and expand in one
// call, split over tokens with at::parallel_for.
//
//   lora_apply(x [T, in], a [S, k*R, in], bt [S, k*R or R, O], segments [n, 3] int64,
//              out [T, O], splits [k + 1])
//   for each segment (start, length, slot), slot >= 0, and each module i < k:
//     out[rows, splits[i]:splits[i+1]] += (x[rows] @ a[slot, iR:(i+1)R]^T)
//                                         @ bt[slot, iR:(i+1)R, splits[i]:splits[i+1]]
//   (bt [S, k*R, O]: B transposed, block diagonal, module i's B^T in rows iR.., columns
//   splits[i]..; or packed, bt [S, R, O]: module i's B^T in rows 0..R, the same columns,
//   the modules side by side and no zeros between them: rows iR.. above read rows 0..R.)
// The expand reads only those blocks, so a merged q/k/v costs what three separate LoRAs do;
// packed, it also reads no row that ends in zeros the hardware prefetcher would pull in with
// it (q/k/v from memory, 256 one-token items: 908-937 -> 786 µs a call), and a
// slot is a third smaller for q/k/v, half for gate/up.
// Short segments (decode) are cut into work items of up to kTok tokens, run in parallel by
// these AVX2 kernels: an item's shrink result stays in a stack buffer and goes straight into
// its expand. Long segments (prefill) are GEMMs big enough for ATen's BLAS, which runs them
// near the CPU's peak: one mm for the shrink, one addmm per module for the expand.
// The adapter weights a and bt are float32, bfloat16 or float16 (lora_dtype): the kernels
// widen them to float32 as they load (decode reads half the bytes in 16 bits), and every
// product and sum is float32 either way.
//
// paged_decode_attention: attention of one query token per sequence over the paged KV cache,
// reading each sequence's keys and values where they lie instead of gathering copies.

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace loraplex {
namespace {

constexpr int kTok = 4;          // tokens per work item
constexpr int64_t kMaxRows = 1024;  // k * R, bounded by the stack buffer
constexpr int64_t kLong = 128;      // segments at least this long go to BLAS

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 weights widened to float32: bfloat16 is float32's top half, float16 goes through F16C
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Decode reads each adapter's weights once per step, from memory, a few rows at a time (2
// rows per block at four tokens): too few streams for the hardware prefetcher, which also
// starts over at each 4 KiB page. So each block prefetches the next one's rows (`next`) at
// the pace it reads its own, and each expand chunk the next chunk's columns: 4-token decode
// over 8 of 1,024 slots measured ~25% faster in float32, ~40% in bfloat16. Not for 1-token
// items (8 rows a block, streams enough): there it measured no faster alone and slower end to
// end (a thousand adapters, one request each). Never past the item's own weights.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// One-token items with 16-bit weights (lora_dtype) stream each row of their adapter without
// the block prefetch above, and their demand (a 64-byte line every other vector) runs too
// slowly for the hardware prefetcher: each vector of the row ahead is requested kAhead
// elements (four lines) early. 256 one-token q/k/v items over distinct slots of 4,096 (from
// memory), bfloat16, 2 threads, µs a call: AVX-512 657-670 -> 558-580, AVX2 835-853 ->
// 609-633. Float32 items gained nothing from it (826-845 against 829: their demand alone
// keeps the prefetcher ahead), so they do not.
template <int M, typename W>
constexpr bool kStreamAhead = M == 1 && sizeof(W) == 2;
constexpr int64_t kAhead = 128;

// y[m * ldy + r] = x[m] . a[r] for m < M, r < RB (RB rows of a from `a`); n = fan-in.
// M * RB independent accumulators keep both FMA ports busy even for one token. `next`: the
// RB rows read after these (prefetched as these are read), or null.
template <int M, int RB, typename W>
inline void shrink_block(const float* x, int64_t ldx, const W* a, int64_t n, float* y,
                         int64_t ldy, const W* next) {
  __m256 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (next != nullptr && (i & 15) == 0) {  // one prefetch per 64 bytes of float32
      for (int r = 0; r < RB; ++r) prefetch(next + r * n + i);
    }
    if (kStreamAhead<M, W> && (i & 31) == 0 && i + kAhead < n) {  // (a 16-bit line: 32)
      for (int r = 0; r < RB; ++r) prefetch(a + r * n + i + kAhead);
    }
    __m256 vx[M];
    for (int m = 0; m < M; ++m) vx[m] = _mm256_loadu_ps(x + m * ldx + i);
    for (int r = 0; r < RB; ++r) {
      const __m256 va = load8(a + r * n + i);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(vx[m], va, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t j = i; j < n; ++j) s += x[m * ldx + j] * static_cast<float>(a[r * n + j]);
      y[m * ldy + r] = s;
    }
  }
}

template <int M, typename W>
void shrink(const float* x, int64_t ldx, const W* a, int64_t rows, int64_t n, float* y,
            int64_t ldy) {
  constexpr int RB = M == 1 ? 8 : M == 2 ? 4 : 2;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    const W* next = M > 1 && r + 2 * RB <= rows ? a + (r + RB) * n : nullptr;
    shrink_block<M, RB>(x, ldx, a + r * n, n, y + r, ldy, next);
  }
  for (; r < rows; ++r) {
    shrink_block<M, 1>(x, ldx, a + r * n, n, y + r, ldy, static_cast<const W*>(nullptr));
  }
}

// out[m, c] += sum_{r < R} y[m * ldy + r] * bt[r * ldb + c] for c in [c0, c1), CV vectors of
// 8 columns at a time (M * CV accumulators); `ahead`: prefetch the next chunk's columns.
template <int M, int CV, typename W>
inline void expand_block(const float* y, int64_t ldy, const W* bt, int64_t ldb, int64_t R,
                         float* out, int64_t ldo, int64_t c, bool ahead, int64_t stream_end) {
  if (ahead) {
    for (int64_t r = 0; r < R; ++r) {
      for (int v = 0; v < CV; v += 2) prefetch(bt + r * ldb + c + 8 * CV + 8 * v);
    }
  }
  __m256 acc[M][CV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_loadu_ps(out + m * ldo + c + 8 * v);
  for (int64_t r = 0; r < R; ++r) {
    if (kStreamAhead<M, W>) {
      for (int v = 0; v < CV; v += 4) {
        if (c + 8 * v + kAhead < stream_end) prefetch(bt + r * ldb + c + 8 * v + kAhead);
      }
    }
    __m256 vb[CV];
    for (int v = 0; v < CV; ++v) vb[v] = load8(bt + r * ldb + c + 8 * v);
    for (int m = 0; m < M; ++m) {
      const __m256 vy = _mm256_broadcast_ss(y + m * ldy + r);
      for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_fmadd_ps(vy, vb[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) _mm256_storeu_ps(out + m * ldo + c + 8 * v, acc[m][v]);
}

template <int M, typename W>
void expand(const float* y, int64_t ldy, const W* bt, int64_t ldb, int64_t R, float* out,
            int64_t ldo, int64_t c0, int64_t c1, int64_t stream_end) {
  constexpr int CV = M <= 2 ? 4 : 2;
  int64_t c = c0;
  for (; c + 8 * CV <= c1; c += 8 * CV) {
    expand_block<M, CV>(y, ldy, bt, ldb, R, out, ldo, c, M > 1 && c + 16 * CV <= c1,
                        stream_end);
  }
  for (; c + 8 <= c1; c += 8) {
    expand_block<M, 1>(y, ldy, bt, ldb, R, out, ldo, c, false, stream_end);
  }
  for (; c < c1; ++c) {
    for (int m = 0; m < M; ++m) {
      float s = out[m * ldo + c];
      for (int64_t r = 0; r < R; ++r) s += y[m * ldy + r] * static_cast<float>(bt[r * ldb + c]);
      out[m * ldo + c] = s;
    }
  }
}

// The same kernels 16 lanes wide, for CPUs with AVX-512 (chosen at run time: the library is
// built for AVX2). Items whose adapter's weights stay in cache (a prefill-like segment cut
// into 4-token items; a few adapters shared by many decode tokens) are bound by the FMAs,
// and twice the lanes do twice the work per instruction; 32 registers hold 4 rows (or 64
// columns) a block for 4 tokens. The op alone, float32 (576 -> rank 16 -> 1536, 2 threads,
// Xeon VM): 4-token decode over 8 adapters 21.7 -> 13.4 us, 100-token segments over 8
// adapters 463 -> 291 us, 24-token segments over 64 of 1,024 slots (rank 8) 321 -> 253 us;
// 1-token items reading their adapters from memory gain nothing (220 us either way).
// They repeat the AVX2 kernels' shape at twice the width: separate functions, since a
// function's target (AVX-512 here) cannot depend on a template parameter.
// (The zero-masked forms of the intrinsics below: their plain forms start from an
// "undefined" register that GCC 12 flags as uninitialized under -Werror. Same instructions.)
#define LORAPLEX_WIDE __attribute__((target("avx512f")))
constexpr __mmask16 kAll = 0xffff;

LORAPLEX_WIDE inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LORAPLEX_WIDE inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i w = _mm512_maskz_cvtepu16_epi32(kAll, h);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, w, 16));
}
LORAPLEX_WIDE inline __m512 load16(const c10::Half* p) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

LORAPLEX_WIDE inline float hsum16(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xf, d, 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xf, d, 1));
  return hsum(_mm256_add_ps(lo, hi));
}

template <int M, int RB, typename W>
LORAPLEX_WIDE inline void shrink_block16(const float* x, int64_t ldx, const W* a, int64_t n,
                                         float* y, int64_t ldy, const W* next) {
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (next != nullptr) {
      for (int r = 0; r < RB; ++r) prefetch(next + r * n + i);
    }
    if (kStreamAhead<M, W> && (i & 31) == 0 && i + kAhead < n) {
      for (int r = 0; r < RB; ++r) prefetch(a + r * n + i + kAhead);
    }
    __m512 vx[M];
    for (int m = 0; m < M; ++m) vx[m] = _mm512_loadu_ps(x + m * ldx + i);
    for (int r = 0; r < RB; ++r) {
      const __m512 va = load16(a + r * n + i);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(vx[m], va, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum16(acc[m][r]);
      for (int64_t j = i; j < n; ++j) s += x[m * ldx + j] * static_cast<float>(a[r * n + j]);
      y[m * ldy + r] = s;
    }
  }
}

template <int M, typename W>
LORAPLEX_WIDE void shrink16(const float* x, int64_t ldx, const W* a, int64_t rows, int64_t n,
                            float* y, int64_t ldy) {
  constexpr int RB = M == 1 ? 8 : 4;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    const W* next = M > 1 && r + 2 * RB <= rows ? a + (r + RB) * n : nullptr;
    shrink_block16<M, RB>(x, ldx, a + r * n, n, y + r, ldy, next);
  }
  for (; r < rows; ++r) {
    shrink_block16<M, 1>(x, ldx, a + r * n, n, y + r, ldy, static_cast<const W*>(nullptr));
  }
}

template <int M, int CV, typename W>
LORAPLEX_WIDE inline void expand_block16(const float* y, int64_t ldy, const W* bt, int64_t ldb,
                                         int64_t R, float* out, int64_t ldo, int64_t c,
                                         bool ahead, int64_t stream_end) {
  if (ahead) {
    for (int64_t r = 0; r < R; ++r) {
      for (int v = 0; v < CV; ++v) prefetch(bt + r * ldb + c + 16 * CV + 16 * v);
    }
  }
  __m512 acc[M][CV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = _mm512_loadu_ps(out + m * ldo + c + 16 * v);
  for (int64_t r = 0; r < R; ++r) {
    if (kStreamAhead<M, W>) {  // (stream_end: Dims::stream_end)
      for (int v = 0; v < CV; v += 2) {
        if (c + 16 * v + kAhead < stream_end) prefetch(bt + r * ldb + c + 16 * v + kAhead);
      }
    }
    __m512 vb[CV];
    for (int v = 0; v < CV; ++v) vb[v] = load16(bt + r * ldb + c + 16 * v);
    for (int m = 0; m < M; ++m) {
      const __m512 vy = _mm512_set1_ps(y[m * ldy + r]);
      for (int v = 0; v < CV; ++v) acc[m][v] = _mm512_fmadd_ps(vy, vb[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < CV; ++v) _mm512_storeu_ps(out + m * ldo + c + 16 * v, acc[m][v]);
}

// columns c0..c1 in blocks of 64, then 16; the last few (under 16) by the AVX2 kernel.
// `stream_end`: where the columns of these rows that the item reads end (Dims::stream_end)
template <int M, typename W>
LORAPLEX_WIDE void expand16(const float* y, int64_t ldy, const W* bt, int64_t ldb, int64_t R,
                            float* out, int64_t ldo, int64_t c0, int64_t c1,
                            int64_t stream_end) {
  constexpr int CV = 4;
  int64_t c = c0;
  for (; c + 16 * CV <= c1; c += 16 * CV) {
    expand_block16<M, CV>(y, ldy, bt, ldb, R, out, ldo, c, M > 1 && c + 32 * CV <= c1,
                          stream_end);
  }
  for (; c + 16 <= c1; c += 16) {
    expand_block16<M, 1>(y, ldy, bt, ldb, R, out, ldo, c, false, stream_end);
  }
  if (c < c1) expand<M>(y, ldy, bt, ldb, R, out, ldo, c, c1, stream_end);
}

struct Item {
  int64_t start;  // first token row
  int slot;
  int count;  // tokens: 1..kTok for a work item, the length for a long segment
};

// The weights' shape: a [S, rows, n], bt [S, bt_rows, O]; bt_rows = rows (block diagonal)
// or rows / k (packed).
struct Dims {
  int64_t rows, n, bt_rows, O;
  // where module i's rows of B^T start in a slot's bt (R of them)
  int64_t bt_row(int64_t i, int64_t R) const { return bt_rows == rows ? i * R : 0; }
  // where the columns of module i's rows that an item reads end: its own (block diagonal),
  // or the row's (packed: the next modules' columns follow in the same rows)
  int64_t stream_end(const std::vector<int64_t>& splits, int64_t i) const {
    return bt_rows == rows ? splits[i + 1] : O;
  }
};

template <int M, typename W>
void run_item(const Item& it, const float* x, int64_t ldx, const W* a, const W* bt,
              float* out, int64_t ldo, const Dims& d, const std::vector<int64_t>& splits,
              float* y) {
  const W* a_s = a + it.slot * d.rows * d.n;
  const W* bt_s = bt + it.slot * d.bt_rows * d.O;
  shrink<M>(x + it.start * ldx, ldx, a_s, d.rows, d.n, y, kMaxRows);
  const int64_t k = static_cast<int64_t>(splits.size()) - 1;
  const int64_t R = d.rows / k;
  for (int64_t i = 0; i < k; ++i) {
    expand<M>(y + i * R, kMaxRows, bt_s + d.bt_row(i, R) * d.O, d.O, R, out + it.start * ldo,
              ldo, splits[i], splits[i + 1], d.stream_end(splits, i));
  }
}

template <int M, typename W>
LORAPLEX_WIDE void run_item16(const Item& it, const float* x, int64_t ldx, const W* a,
                              const W* bt, float* out, int64_t ldo, const Dims& d,
                              const std::vector<int64_t>& splits, float* y) {
  const W* a_s = a + it.slot * d.rows * d.n;
  const W* bt_s = bt + it.slot * d.bt_rows * d.O;
  shrink16<M>(x + it.start * ldx, ldx, a_s, d.rows, d.n, y, kMaxRows);
  const int64_t k = static_cast<int64_t>(splits.size()) - 1;
  const int64_t R = d.rows / k;
  for (int64_t i = 0; i < k; ++i) {
    expand16<M>(y + i * R, kMaxRows, bt_s + d.bt_row(i, R) * d.O, d.O, R,
                out + it.start * ldo, ldo, splits[i], splits[i + 1], d.stream_end(splits, i));
  }
}

// AVX-512 kernels where the CPU has them, unless turned off (set_wide: tests run both)
bool wide_kernels = __builtin_cpu_supports("avx512f");

bool set_wide(bool on) {
  wide_kernels = on && __builtin_cpu_supports("avx512f");
  return wide_kernels;
}

// The short items, over weights of type W.
template <typename W>
void run_items(const std::vector<Item>& items, const at::Tensor& x, const at::Tensor& a,
               const at::Tensor& bt, const at::Tensor& out, int64_t rows,
               const std::vector<int64_t>& cols) {
  const Dims d{rows, x.size(1), bt.size(1), bt.size(2)};
  const float* xp = x.data_ptr<float>();
  const W* ap = a.data_ptr<W>();
  const W* bp = bt.data_ptr<W>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  const bool wide = wide_kernels;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    alignas(64) float y[kTok * kMaxRows];
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      if (wide) {
        switch (it.count) {
          case 1: run_item16<1>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
          case 2: run_item16<2>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
          case 3: run_item16<3>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
          default: run_item16<4>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
        }
        continue;
      }
      switch (it.count) {
        case 1: run_item<1>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
        case 2: run_item<2>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
        case 3: run_item<3>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
        default: run_item<4>(it, xp, ldx, ap, bp, op, ldo, d, cols, y); break;
      }
    }
  });
}

void lora_apply(const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                const at::Tensor& segments, const at::Tensor& out, at::IntArrayRef splits) {
  for (const at::Tensor* t : {&x, &a, &bt, &out}) {
    TORCH_CHECK(t->device().is_cpu(), "lora_apply: x, a, bt and out must be CPU tensors");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "lora_apply: x and out must be float32");
  const at::ScalarType wt = a.scalar_type();
  TORCH_CHECK(bt.scalar_type() == wt &&
                  (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf),
              "lora_apply: a and bt must share one dtype, float32, bfloat16 or float16; got ",
              a.scalar_type(), " and ", bt.scalar_type());
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && bt.dim() == 3 && out.dim() == 2,
              "lora_apply: x [T, in], a [S, kR, in], bt [S, kR or R, O], out [T, O]");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous(), "lora_apply: a and bt must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "lora_apply: x and out rows must be dense");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == 3 && segments.is_contiguous(),
              "lora_apply: segments must be a contiguous int64 [n, 3] (start, length, slot)");
  const int64_t T = x.size(0), n = x.size(1), S = a.size(0), rows = a.size(1), O = bt.size(2);
  const int64_t k = static_cast<int64_t>(splits.size()) - 1;
  TORCH_CHECK(k >= 1 && rows % k == 0 && rows <= kMaxRows && splits[0] == 0 && splits[k] == O,
              "lora_apply: splits must run 0..", O, " over k modules dividing ", rows,
              " rows (at most ", kMaxRows, ")");
  TORCH_CHECK(a.size(2) == n && bt.size(0) == S &&
                  (bt.size(1) == rows || bt.size(1) == rows / k) && out.size(0) == T &&
                  out.size(1) == O,
              "lora_apply: shapes disagree: x ", x.sizes(), ", a ", a.sizes(), ", bt ",
              bt.sizes(), " (block diagonal [S, kR, O] or packed [S, R, O]), out ",
              out.sizes());
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
  // Several long segments: one per thread, each GEMM single-threaded (ATen runs ops inside a
  // parallel region on one thread), measured 1.2-1.5x faster than one after the other on two
  // cores. A single one runs inline (grain 2), its GEMMs on every thread. The workers run
  // ATen ops, so they take the caller's thread-local state (inference mode among it).
  const int64_t R = rows / k;
  const Dims d{rows, n, bt.size(1), O};
  const int64_t num_long = static_cast<int64_t>(long_segments.size());
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_long, num_long > 1 ? 1 : 2, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t s = begin; s < end; ++s) {
      const Item& it = long_segments[s];
      const at::Tensor rows_out = out.narrow(0, it.start, it.count);
      const at::Tensor y =
          at::mm(x.narrow(0, it.start, it.count), a[it.slot].to(at::kFloat).t());
      const at::Tensor b_s = bt[it.slot].to(at::kFloat);
      for (int64_t i = 0; i < k; ++i) {
        const int64_t width = cols[i + 1] - cols[i];
        rows_out.narrow(1, cols[i], width)
            .addmm_(y.narrow(1, i * R, R),
                    b_s.narrow(0, d.bt_row(i, R), R).narrow(1, cols[i], width));
      }
    }
  });
  if (wt == at::kBFloat16) {
    run_items<c10::BFloat16>(items, x, a, bt, out, rows, cols);
  } else if (wt == at::kHalf) {
    run_items<c10::Half>(items, x, a, bt, out, rows, cols);
  } else {
    run_items<float>(items, x, a, bt, out, rows, cols);
  }
}

// e^x for x <= 0 (softmax arguments after subtracting the max), 8 lanes: Cephes' expf
// (range reduction by ln 2, degree-5 polynomial), relative error ~1e-7; x < -87 gives ~0.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// acc[i] += w * v[i], i < n
inline void axpy(float w, const float* v, float* acc, int64_t n) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_fmadd_ps(vw, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i));
    _mm256_storeu_ps(acc + i, sum);
  }
  for (; i < n; ++i) acc[i] += w * v[i];
}

// Softmax of p[0..n) in place; returns nothing, the row sums to 1.
inline void softmax(float* p, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) p[j] *= inv;
}

// One query token per sequence (decode). For sequence b (query row rows[b]) and each query
// head h, attends keys key_start[b] .. key_end[b] of its cache slots slots[b, :], with the
// KV head h / (H / Hkv) (grouped-query attention):
//   out[rows[b], h] = softmax(q[rows[b], h] . k[slot, g] * scale) @ v[slot, g]
// q, out [T, H, D] (dense last dim), k_cache, v_cache [N, Hkv, D] contiguous, slots [B, Lk],
// rows, key_start, key_end [B], all int64.
void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& rows, const at::Tensor& key_start,
                            const at::Tensor& key_end, double scale, const at::Tensor& out) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3,
                "paged_decode_attention: q, k_cache, v_cache, out must be float32 CPU [*, *, D]");
  }
  for (const at::Tensor* t : {&slots, &rows, &key_start, &key_end}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "paged_decode_attention: slots, rows, key_start, key_end: contiguous int64");
  }
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t N = k_cache.size(0), Hkv = k_cache.size(1);
  const int64_t B = rows.size(0), Lk = slots.size(1);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == D,
              "paged_decode_attention: k_cache and v_cache must be contiguous [N, Hkv, ", D, "]");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && out.sizes() == q.sizes(),
              "paged_decode_attention: q and out must be [T, H, D] with dense rows");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "paged_decode_attention: ", H,
              " query heads do not group over ", Hkv, " KV heads");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && key_start.numel() == B &&
                  key_end.numel() == B,
              "paged_decode_attention: slots [B, Lk], key_start and key_end [B] for B = ", B);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* lo = key_start.data_ptr<int64_t>();
  const int64_t* hi = key_end.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < T, "paged_decode_attention: row ", row[b], " of ", T);
    TORCH_CHECK(0 <= lo[b] && lo[b] < hi[b] && hi[b] <= Lk, "paged_decode_attention: keys ",
                lo[b], "..", hi[b], " of sequence ", b, " outside 0..", Lk, " or empty");
    for (int64_t j = lo[b]; j < hi[b]; ++j) {
      TORCH_CHECK(slot[b * Lk + j] >= 0 && slot[b * Lk + j] < N, "paged_decode_attention: ",
                  "cache slot ", slot[b * Lk + j], " of ", N);
    }
  }
  const int64_t group = H / Hkv;
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const float sc = static_cast<float>(scale);
  // one work item per (sequence, KV head): its keys and values are read once for the group
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc(group * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, g = item % Hkv, n = hi[b] - lo[b];
      const int64_t* sl = slot + b * Lk + lo[b];
      p.resize(group * n);
      for (int64_t j = 0; j < n; ++j) {
        const float* key = kp + (sl[j] * Hkv + g) * D;
        for (int64_t h = 0; h < group; ++h) {
          p[h * n + j] = dot(qp + row[b] * qs0 + (g * group + h) * qs1, key, D) * sc;
        }
      }
      for (int64_t h = 0; h < group; ++h) softmax(p.data() + h * n, n);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* value = vp + (sl[j] * Hkv + g) * D;
        for (int64_t h = 0; h < group; ++h) axpy(p[h * n + j], value, acc.data() + h * D, D);
      }
      for (int64_t h = 0; h < group; ++h) {
        std::copy(acc.begin() + h * D, acc.begin() + (h + 1) * D,
                  op + row[b] * os0 + (g * group + h) * os1);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def("lora_apply(Tensor x, Tensor a, Tensor bt, Tensor segments, Tensor(a!) out, "
        "int[] splits) -> ()");
  m.impl("lora_apply", c10::DispatchKey::CPU, TORCH_FN(lora_apply));
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, "
        "Tensor rows, Tensor key_start, Tensor key_end, float scale, Tensor(a!) out) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
  m.def("set_wide(bool on) -> bool", &set_wide);
}

}  // namespace loraplex
