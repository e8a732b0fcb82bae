// Attention of a few query rows over a key/value cache (a decode step), for ops.cpp. No torch
// headers here.
//
// Per (batch, key/value head): the scores of each query row against every key, scaled, the
// masked ones left out; a softmax over the rest (the row's maximum subtracted, the exponentials
// summed in float32); the weighted sum of the values. The R query rows of a head are the
// grouped-query heads that share it (sdpa's GQA folding), so each key and value is read once
// for all of them. A row whose mask lets no key through gives zeros, as torch's CPU flash
// kernel does. Everything accumulates in float32; bfloat16 inputs are widened exactly and the
// output rounded once (to nearest even).
//
// It replaces torch's `_scaled_dot_product_flash_attention_for_cpu` in the decode step, whose
// blocking for long queries costs ~17-26 us per call on one query row against ~3 here
// (SmolLM2: 9 query heads, 3 key/value heads, 144 cache slots, head size 64; 30 calls a step).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && !defined(FMK_PORTABLE_ONLY)
#define FMK_ATTN_AVX512 1
#include <immintrin.h>
#else
#define FMK_ATTN_AVX512 0
#endif

namespace fmk {

namespace {

inline float load1(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even; a NaN stays a (quiet) NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// `n` floats of a row (float32 or bfloat16) widened into dst
void widen(const void* src, int64_t offset, int64_t n, bool bf16, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load1(src, offset + i, bf16);
}

#if FMK_ATTN_AVX512
// exp(x) for x <= 0 (x - max of a row), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial in r, scaled by 2^n; within 2 ulp of the true value, 0 below -104.
inline __m512 exp_le0(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline float dot_simd(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline void axpy_simd(float a, const float* x, float* y, int64_t n) {  // y += a * x
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i)));
  }
}

// p[j] = exp(s[j] - mx) for the S scores of a row (masked ones hold -inf: exp gives 0); their sum
float softmax_numerators_simd(float* s, int64_t S, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= S; j += 16) {
    const __m512 e = exp_le0(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  float total = _mm512_reduce_add_ps(sum);
  if (j < S) {
    const __mmask16 k = static_cast<__mmask16>((1u << (S - j)) - 1);
    const __m512 e = exp_le0(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m));
    _mm512_mask_storeu_ps(s + j, k, e);
    total += _mm512_mask_reduce_add_ps(k, e);
  }
  return total;
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
float softmax_numerators(float* s, int64_t S, float mx) {
  float total = 0.0f;
  for (int64_t j = 0; j < S; ++j) total += (s[j] = std::exp(s[j] - mx));
  return total;
}

// `simd` (simd_enabled(), read once per call): the AVX-512 code, else the plain loops
inline float dot_any(bool simd, const float* a, const float* b, int64_t n) {
#if FMK_ATTN_AVX512
  if (simd) return dot_simd(a, b, n);
#endif
  return dot(a, b, n);
}
inline void axpy_any(bool simd, float a, const float* x, float* y, int64_t n) {
#if FMK_ATTN_AVX512
  if (simd) return axpy_simd(a, x, y, n);
#endif
  axpy(a, x, y, n);
}
inline float softmax_numerators_any(bool simd, float* s, int64_t S, float mx) {
#if FMK_ATTN_AVX512
  if (simd) return softmax_numerators_simd(s, S, mx);
#endif
  return softmax_numerators(s, S, mx);
}

}  // namespace

void decode_attention(const AttnProblem& a, int64_t bh0, int64_t bh1) {
  const int64_t R = a.R, S = a.S, D = a.D;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool simd = simd_enabled();
  std::vector<float> q(static_cast<size_t>(R * D)), kv(a.bf16 ? static_cast<size_t>(S * D) : 0),
      scores(static_cast<size_t>(R * S)), acc(static_cast<size_t>(D));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    for (int64_t r = 0; r < R; ++r) widen(a.q, b * a.q_sb + h * a.q_sh + r * D, D, a.bf16, q.data() + r * D);
    // keys (then values) as float32 rows: read in place, or widened once for the R rows
    auto rows = [&](const void* base, int64_t offset) -> const float* {
      if (!a.bf16) return static_cast<const float*>(base) + offset;
      widen(base, offset, S * D, true, kv.data());
      return kv.data();
    };
    const float* keys = rows(a.k, b * a.k_sb + h * a.k_sh);
    const bool* mask = a.mask + b * a.m_sb + h * a.m_sh;
    for (int64_t r = 0; r < R; ++r) {
      float* s = scores.data() + r * S;
      const bool* mr = mask + r * a.m_sr;
      for (int64_t j = 0; j < S; ++j) s[j] = mr[j * a.m_ss] ? dot_any(simd, q.data() + r * D, keys + j * D, D) * a.scale : neg_inf;
    }
    const float* values = rows(a.v, b * a.v_sb + h * a.v_sh);
    for (int64_t r = 0; r < R; ++r) {
      float* s = scores.data() + r * S;
      const float mx = *std::max_element(s, s + S);
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (mx != neg_inf) {
        const float inv = 1.0f / softmax_numerators_any(simd, s, S, mx);
        for (int64_t j = 0; j < S; ++j)
          if (s[j] != 0.0f) axpy_any(simd, s[j], values + j * D, acc.data(), D);
        for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
      }
      const int64_t o = (bh * R + r) * D;  // out is contiguous [B, H, R, D]
      if (a.bf16)
        for (int64_t d = 0; d < D; ++d) static_cast<uint16_t*>(a.out)[o + d] = to_bf16(acc[d]);
      else
        std::memcpy(static_cast<float*>(a.out) + o, acc.data(), static_cast<size_t>(D) * sizeof(float));
    }
  }
}

}  // namespace fmk
