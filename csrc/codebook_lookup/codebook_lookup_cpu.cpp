// Nearest-code search on the CPU: argmin_k ||z - e_k||^2 for each row of z, fp32 accumulation.
//
// The codebook is packed into panels of NR codes stored dimension-major ([panel][d][NR]) so the
// inner loop is NR contiguous floats; each micro-tile keeps MR rows x NR codes of dot products in
// registers and a running (min, argmin) per lane. Score = 0.5 ||e||^2 - z.e, which orders codes as
// the squared distance does (||z||^2 is constant per row). Ties go to the lowest index: a lane only
// replaces its best on a strictly smaller score, and the final cross-lane reduction prefers the
// lower index among equal scores. Padded codes score +inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "codebook_lookup.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SEED_FAST_NO_AVX512)
#include <immintrin.h>
#define SEED_FAST_HAVE_AVX512_KERNEL 1
#endif

namespace seed_fast {
namespace {

constexpr int64_t MR = 4;   // rows of z per micro-tile
constexpr int64_t NR = 32;  // codes per panel
// Up to this many rows, skip packing the codebook (its cost would dominate) and use argmin_small_n.
constexpr int64_t kSmallN = 64;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SEED_FAST_NO_CLONES)
#define SEED_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEED_FAST_CPU_CLONES
#endif

// Panels are a transpose of the codebook in (NR codes x TD dims) tiles, so the source rows and the
// destination lines a tile touches stay in L1 (a row-by-row copy strided the destination by NR
// floats and thrashed L1 for large D). Half squared norms are summed with 8 independent partial
// sums per code, so the loop is not one long latency chain.
void pack_codebook(const float* cb, int64_t K, int64_t D, float* panels, float* half_norm) {
  const int64_t P = (K + NR - 1) / NR;
  constexpr int64_t TD = 16;
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = panels + p * D * NR;
      const int64_t valid = std::min<int64_t>(NR, K - p * NR);
      for (int64_t d0 = 0; d0 < D; d0 += TD) {
        const int64_t d1 = std::min(D, d0 + TD);
        for (int64_t j = 0; j < valid; ++j) {
          const float* e = cb + (p * NR + j) * D;
          for (int64_t d = d0; d < d1; ++d) dst[d * NR + j] = e[d];
        }
        for (int64_t j = valid; j < NR; ++j)
          for (int64_t d = d0; d < d1; ++d) dst[d * NR + j] = 0.f;
      }
      for (int64_t j = 0; j < NR; ++j) {
        if (j >= valid) {
          half_norm[p * NR + j] = std::numeric_limits<float>::infinity();
          continue;
        }
        const float* e = cb + (p * NR + j) * D;
        float part[8] = {};
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
          for (int64_t l = 0; l < 8; ++l) part[l] += e[d + l] * e[d + l];
        for (; d < D; ++d) part[0] += e[d] * e[d];
        half_norm[p * NR + j] =
            0.5f * (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
      }
    }
  });
}

// A growing per-thread scratch buffer: the packed codebook is rebuilt each call, but its pages are
// faulted in once, not on every call (50 MB for K = 16384, D = 768).
float* scratch_floats(size_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local size_t cap = 0;
  if (n > cap) {
    buf.reset(new float[n]);  // uninitialized: pack_codebook writes every element
    cap = n;
  }
  return buf.get();
}

// Rows [r0, r0 + MR) of z against panels [p0, p1) (rows past N repeat the last row; their results
// are dropped). Merges into the rows' running best (row_v, row_i): strictly smaller wins, so an
// earlier chunk (lower indices) keeps ties.
SEED_FAST_CPU_CLONES
void argmin_micro(const float* z, int64_t N, int64_t D, int64_t r0, const float* panels, const float* half_norm,
                  int64_t p0, int64_t p1, float* row_v, int32_t* row_i) {
  const float* zr[MR];
  for (int64_t r = 0; r < MR; ++r) zr[r] = z + std::min(r0 + r, N - 1) * D;
  float best_v[MR][NR];
  int32_t best_i[MR][NR];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < NR; ++j) {
      best_v[r][j] = std::numeric_limits<float>::infinity();
      best_i[r][j] = static_cast<int32_t>(p0 * NR + j);
    }
  for (int64_t p = p0; p < p1; ++p) {
    const float* pp = panels + p * D * NR;
    float acc[MR][NR] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* e = pp + d * NR;
#pragma GCC unroll 4
      for (int64_t r = 0; r < MR; ++r) {
        const float zv = zr[r][d];
#pragma GCC ivdep
        for (int64_t j = 0; j < NR; ++j) acc[r][j] += zv * e[j];
      }
    }
    const float* h = half_norm + p * NR;
    const int32_t base = static_cast<int32_t>(p * NR);
    for (int64_t r = 0; r < MR; ++r) {
#pragma GCC ivdep
      for (int64_t j = 0; j < NR; ++j) {
        const float s = h[j] - acc[r][j];
        const bool better = s < best_v[r][j];
        best_v[r][j] = better ? s : best_v[r][j];
        best_i[r][j] = better ? base + static_cast<int32_t>(j) : best_i[r][j];
      }
    }
  }
  for (int64_t r = 0; r < MR; ++r) {
    float v = best_v[r][0];
    int32_t i = best_i[r][0];
    for (int64_t j = 1; j < NR; ++j) {
      if (best_v[r][j] < v || (best_v[r][j] == v && best_i[r][j] < i)) {
        v = best_v[r][j];
        i = best_i[r][j];
      }
    }
    if (v < row_v[r]) {
      row_v[r] = v;
      row_i[r] = i;
    }
  }
}

#ifdef SEED_FAST_HAVE_AVX512_KERNEL
// argmin_micro written with AVX-512 intrinsics (NR = 32 codes = two zmm lanes per row): the
// compiler-vectorized version above keeps its running bests on the stack. Here every row's 2
// accumulators, 2 best scores and 2 best indices stay in registers (24 zmm for MR = 4). Each
// accumulator starts at 0.5 ||e||^2 and the dot product is subtracted by FNMA, so the score needs
// no extra instruction; the update is one compare into a mask and two masked moves.
static_assert(MR == 4 && NR == 32, "the AVX-512 micro-kernel is written for MR = 4, NR = 32");

__attribute__((target("avx512f")))
void argmin_micro_avx512(const float* z, int64_t N, int64_t D, int64_t r0, const float* panels,
                         const float* half_norm, int64_t p0, int64_t p1, float* row_v, int32_t* row_i) {
  const float* z0 = z + std::min(r0 + 0, N - 1) * D;
  const float* z1 = z + std::min(r0 + 1, N - 1) * D;
  const float* z2 = z + std::min(r0 + 2, N - 1) * D;
  const float* z3 = z + std::min(r0 + 3, N - 1) * D;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 v00 = inf, v01 = inf, v10 = inf, v11 = inf, v20 = inf, v21 = inf, v30 = inf, v31 = inf;
  __m512i idx0 = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                  _mm512_set1_epi32(static_cast<int32_t>(p0 * NR)));
  __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
  const __m512i step = _mm512_set1_epi32(static_cast<int32_t>(NR));
  __m512i i00 = idx0, i01 = idx1, i10 = idx0, i11 = idx1, i20 = idx0, i21 = idx1, i30 = idx0, i31 = idx1;
  for (int64_t p = p0; p < p1; ++p) {
    const float* pp = panels + p * D * NR;
    const __m512 h0 = _mm512_loadu_ps(half_norm + p * NR);
    const __m512 h1 = _mm512_loadu_ps(half_norm + p * NR + 16);
    __m512 a00 = h0, a01 = h1, a10 = h0, a11 = h1, a20 = h0, a21 = h1, a30 = h0, a31 = h1;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 e0 = _mm512_loadu_ps(pp + d * NR);
      const __m512 e1 = _mm512_loadu_ps(pp + d * NR + 16);
      __m512 b = _mm512_set1_ps(z0[d]);
      a00 = _mm512_fnmadd_ps(b, e0, a00);
      a01 = _mm512_fnmadd_ps(b, e1, a01);
      b = _mm512_set1_ps(z1[d]);
      a10 = _mm512_fnmadd_ps(b, e0, a10);
      a11 = _mm512_fnmadd_ps(b, e1, a11);
      b = _mm512_set1_ps(z2[d]);
      a20 = _mm512_fnmadd_ps(b, e0, a20);
      a21 = _mm512_fnmadd_ps(b, e1, a21);
      b = _mm512_set1_ps(z3[d]);
      a30 = _mm512_fnmadd_ps(b, e0, a30);
      a31 = _mm512_fnmadd_ps(b, e1, a31);
    }
#define SEED_FAST_UPDATE(a, v, i, idx)                      \
  {                                                         \
    const __mmask16 m = _mm512_cmp_ps_mask(a, v, _CMP_LT_OQ); \
    v = _mm512_mask_mov_ps(v, m, a);                        \
    i = _mm512_mask_mov_epi32(i, m, idx);                   \
  }
    SEED_FAST_UPDATE(a00, v00, i00, idx0)
    SEED_FAST_UPDATE(a01, v01, i01, idx1)
    SEED_FAST_UPDATE(a10, v10, i10, idx0)
    SEED_FAST_UPDATE(a11, v11, i11, idx1)
    SEED_FAST_UPDATE(a20, v20, i20, idx0)
    SEED_FAST_UPDATE(a21, v21, i21, idx1)
    SEED_FAST_UPDATE(a30, v30, i30, idx0)
    SEED_FAST_UPDATE(a31, v31, i31, idx1)
#undef SEED_FAST_UPDATE
    idx0 = _mm512_add_epi32(idx0, step);
    idx1 = _mm512_add_epi32(idx1, step);
  }
  alignas(64) float bv[MR][NR];
  alignas(64) int32_t bi[MR][NR];
  _mm512_store_ps(&bv[0][0], v00); _mm512_store_ps(&bv[0][16], v01);
  _mm512_store_ps(&bv[1][0], v10); _mm512_store_ps(&bv[1][16], v11);
  _mm512_store_ps(&bv[2][0], v20); _mm512_store_ps(&bv[2][16], v21);
  _mm512_store_ps(&bv[3][0], v30); _mm512_store_ps(&bv[3][16], v31);
  _mm512_store_si512(&bi[0][0], i00); _mm512_store_si512(&bi[0][16], i01);
  _mm512_store_si512(&bi[1][0], i10); _mm512_store_si512(&bi[1][16], i11);
  _mm512_store_si512(&bi[2][0], i20); _mm512_store_si512(&bi[2][16], i21);
  _mm512_store_si512(&bi[3][0], i30); _mm512_store_si512(&bi[3][16], i31);
  for (int64_t r = 0; r < MR; ++r) {
    float v = bv[r][0];
    int32_t i = bi[r][0];
    for (int64_t j = 1; j < NR; ++j) {
      if (bv[r][j] < v || (bv[r][j] == v && bi[r][j] < i)) {
        v = bv[r][j];
        i = bi[r][j];
      }
    }
    if (v < row_v[r]) {
      row_v[r] = v;
      row_i[r] = i;
    }
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

// Small-N path (one or two images): the rows of z are the vector lanes (z transposed into
// [D][SR] panels, cheap), codes stream from the row-major codebook (no packing), MC codes per step.
// Each lane keeps its row's running best; codes arrive in increasing order, so strict < keeps ties
// on the lowest index.
constexpr int64_t SR = 32;  // rows of z per lane panel
constexpr int64_t MC = 4;   // codes per step

// Returns false when a code's squared norm is not finite (NaN / inf in the codebook).
SEED_FAST_CPU_CLONES
bool argmin_codes(const float* zt, int64_t D, const float* cb, int64_t k0, int64_t k1, float* best_v,
                  int32_t* best_i) {
  bool finite = true;
  for (int64_t k = k0; k < k1; k += MC) {
    const int64_t mc = std::min(MC, k1 - k);
    const float* e[MC];
    for (int64_t c = 0; c < MC; ++c) e[c] = cb + std::min(k + c, k1 - 1) * D;
    float acc[MC][SR] = {};
    float nrm[MC] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* zd = zt + d * SR;
#pragma GCC unroll 4
      for (int64_t c = 0; c < MC; ++c) {
        const float ev = e[c][d];
        nrm[c] += ev * ev;
#pragma GCC ivdep
        for (int64_t j = 0; j < SR; ++j) acc[c][j] += ev * zd[j];
      }
    }
    for (int64_t c = 0; c < mc; ++c) {
      const float h = 0.5f * nrm[c];
      finite &= std::isfinite(h);
      const int32_t idx = static_cast<int32_t>(k + c);
#pragma GCC ivdep
      for (int64_t j = 0; j < SR; ++j) {
        const float s = h - acc[c][j];
        const bool better = s < best_v[j];
        best_v[j] = better ? s : best_v[j];
        best_i[j] = better ? idx : best_i[j];
      }
    }
  }
  return finite;
}

// Returns false, writing nothing, when z or a code's squared norm is not finite.
bool argmin_small_n(const float* z, int64_t N, int64_t D, const float* cb, int64_t K, int64_t* out) {
  const int64_t panels = (N + SR - 1) / SR;
  std::vector<float> zt(static_cast<size_t>(panels * D * SR), 0.f);
  float zsum = 0.f;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t d = 0; d < D; ++d) {
      const float v = z[i * D + d];
      zt[(i / SR) * D * SR + d * SR + i % SR] = v;
      zsum += (v * v) * 0.f;  // stays 0 unless some value is NaN / inf or its square overflows
    }
  if (zsum != 0.f) return false;
  // Contiguous code ranges per task; merged in range order so ties stay on the lowest index.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 2, K / 512));
  const int64_t per = (K + tasks - 1) / tasks;
  std::vector<float> bv(static_cast<size_t>(tasks * panels * SR), std::numeric_limits<float>::infinity());
  std::vector<int32_t> bi(static_cast<size_t>(tasks * panels * SR), 0);
  std::atomic<bool> bad_codebook{false};
  at::parallel_for(0, tasks * panels, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t task = t / panels, panel = t % panels;
      const int64_t k0 = task * per, k1 = std::min(K, k0 + per);
      if (k0 < k1 && !argmin_codes(zt.data() + panel * D * SR, D, cb, k0, k1, &bv[t * SR], &bi[t * SR]))
        bad_codebook.store(true, std::memory_order_relaxed);
    }
  });
  if (bad_codebook.load()) return false;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t panel = i / SR, lane = i % SR;
    float v = std::numeric_limits<float>::infinity();
    int32_t best = 0;
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t = task * panels + panel;
      if (bv[t * SR + lane] < v) {
        v = bv[t * SR + lane];
        best = bi[t * SR + lane];
      }
    }
    out[i] = best;
  }
  return true;
}

// Inputs the kernel found not finite: with an error flag, sets it (the caller names the input and
// raises); without one, raises, naming the first input holding NaN / inf and counting them, or
// saying that finite z or codebook squared norms overflow float32. Either way run only then.
at::Tensor report_non_finite(const at::Tensor& z, const at::Tensor& codebook, int32_t* error_flag,
                             at::Tensor out) {
  if (error_flag != nullptr) {
    *error_flag = 1;
    return out.zero_();  // indices stay in range
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"z", &z}, {"codebook", &codebook}}) {
    const int64_t bad = t->numel() - at::isfinite(*t).sum().item<int64_t>();
    TORCH_CHECK(bad == 0, "codebook_lookup: ", name, " contains ", bad, " NaN/inf value(s)");
  }
  TORCH_CHECK(false, "codebook_lookup: the squared norms overflow float32 (z or codebook values above ~1e19)");
  return out;
}

}  // namespace

std::string codebook_argmin_cpu_isa() {
#ifdef SEED_FAST_HAVE_AVX512_KERNEL
  if (cpu_has_avx512()) return "avx512";
#endif
  return "generic";
}

// The kernel behind both operators; error_flag: see report_non_finite.
static at::Tensor argmin_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa,
                             int32_t* error_flag) {
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "generic",
              "codebook_argmin_cpu: isa must be 'auto', 'avx512' or 'generic', got '", isa, "'");
  TORCH_CHECK(isa != "avx512" || codebook_argmin_cpu_isa() == "avx512",
              "codebook_argmin_cpu: isa='avx512' asked, but this build or CPU has no AVX-512 kernel");
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(),
              "codebook_argmin_cpu: tensors must be on the CPU, got ", z.device(), " and ", codebook.device());
  TORCH_CHECK(z.dim() == 2, "codebook_argmin_cpu: z must be (N, D), got ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "codebook_argmin_cpu: codebook must be (K, D), got ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), "codebook_argmin_cpu: z has D=", z.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "codebook_argmin_cpu: the codebook is empty");
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - NR,
              "codebook_argmin_cpu: K=", codebook.size(0), " is above the int32 index range");
  for (const auto* t : {&z, &codebook}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                "codebook_argmin_cpu: inputs must be float32, float16 or bfloat16, got ", st);
  }
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto out = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;
  const auto zf = z.to(at::kFloat).contiguous();
  const auto cf = codebook.to(at::kFloat).contiguous();
  if (N <= kSmallN) {
    if (!argmin_small_n(zf.data_ptr<float>(), N, D, cf.data_ptr<float>(), K, out.data_ptr<int64_t>()))
      return report_non_finite(z, codebook, error_flag, out);
    return out;
  }
  const int64_t P = (K + NR - 1) / NR;
  float* panels = scratch_floats(static_cast<size_t>(P * D * NR + P * NR));
  float* half_norm = panels + P * D * NR;
  pack_codebook(cf.data_ptr<float>(), K, D, panels, half_norm);
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) finite &= std::isfinite(half_norm[k]);
  const float* zp = zf.data_ptr<float>();
  float zsum = 0.f;
  for (int64_t i = 0; i < N * D; ++i) zsum += (zp[i] * zp[i]) * 0.f;  // 0 unless NaN / inf or a square overflows
  if (!finite || zsum != 0.f) return report_non_finite(z, codebook, error_flag, out);
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t blocks = (N + MR - 1) / MR;
  // Codes are swept in chunks of about kChunkBytes of packed codebook (L2-resident) across all of a
  // thread's rows before the next chunk, instead of streaming the whole codebook per micro-tile
  // (which made large D memory-bound).
  constexpr int64_t kChunkBytes = 512 * 1024;
  const int64_t chunk_panels = std::max<int64_t>(1, kChunkBytes / (D * NR * static_cast<int64_t>(sizeof(float))));
  auto micro = argmin_micro;  // compiler-vectorized, one clone per x86-64 level (or plain C++)
#ifdef SEED_FAST_HAVE_AVX512_KERNEL
  if (isa != "generic" && cpu_has_avx512()) micro = argmin_micro_avx512;
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> row_v(static_cast<size_t>((b1 - b0) * MR), std::numeric_limits<float>::infinity());
    std::vector<int32_t> row_i(static_cast<size_t>((b1 - b0) * MR), 0);
    for (int64_t p0 = 0; p0 < P; p0 += chunk_panels) {
      const int64_t p1 = std::min(P, p0 + chunk_panels);
      for (int64_t b = b0; b < b1; ++b)
        micro(zp, N, D, b * MR, panels, half_norm, p0, p1, &row_v[(b - b0) * MR],
                     &row_i[(b - b0) * MR]);
    }
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < MR && b * MR + r < N; ++r) op[b * MR + r] = row_i[(b - b0) * MR + r];
  });
  return out;
}

at::Tensor codebook_argmin_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa) {
  return argmin_cpu(z, codebook, isa, nullptr);
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       const std::optional<at::Tensor>& error_flag,
                                                       c10::string_view isa) {
  int32_t* flag = nullptr;
  if (error_flag.has_value()) {
    TORCH_CHECK(error_flag->device().is_cpu() && error_flag->scalar_type() == at::kInt && error_flag->numel() >= 1 &&
                error_flag->is_contiguous(),
                "codebook_lookup_cpu: error_flag must be a contiguous int32 CPU tensor, got ",
                error_flag->scalar_type(), " on ", error_flag->device());
    flag = error_flag->data_ptr<int32_t>();
  }
  auto indices = argmin_cpu(z, codebook, isa, flag);
  return {indices, at::embedding(codebook, indices)};
}

}  // namespace seed_fast
