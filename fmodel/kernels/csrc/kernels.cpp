// fmodel's CPU decode kernels (see kernels.h). No torch headers here.
//
// SIMD layouts prepared once per call (x is small next to the weights: the weights are read
// as they are stored, x is rearranged to fit them):
//   int4, act_int8: a 64-byte chunk of a packed row holds columns 128c .. 128c+127, even ones in
//     the low nibbles, odd ones in the high nibbles. xl holds q per chunk de-interleaved
//     (128 int8: the 64 even columns, then the 64 odd ones), so that one vpdpbusd multiplies the
//     low nibbles with the even columns and another the high nibbles with the odd ones. Int32
//     lane L of a chunk then sums columns 128c + 8L .. 8L+7, all in one activation block and one
//     weight group when the group size is a multiple of 8.
//   int4, weight-only: per 128-column chunk, x[128c + 8L + j] at 16j + L (float): lane L of the
//     chunk's 64 bytes holds columns 8L .. 8L+7 as its 8 nibbles.
//   int8, act_int8: q in its own order, rows padded to 64; vpdpbusd wants an unsigned operand, so
//     the weight is offset by 128 (q ^ 0x80) and each lane starts from -128 * (its sum of q):
//     the lane's integer is exactly sum(w * q). Lane L of a 64-column chunk sums 4 columns.
//   int8, weight-only: x padded to 16 columns (float).
// The act_int8 result is sum over lanes of float(int dot) * scale(lane's group) * d(lane's
// block), plus sum over groups of zero[g] * gs[g] (gs[g] = sum of d * q over the group's
// columns): llama.cpp's Q4_1 x Q8_1 formula, with float32 scales instead of float16.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    !defined(FMK_PORTABLE_ONLY)
#define FMK_AVX512 1
#include <immintrin.h>
#else
#define FMK_AVX512 0
#endif

namespace fmk {

namespace {
std::atomic<bool> g_portable{false};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
bool use_simd() { return FMK_AVX512 && !g_portable.load(std::memory_order_relaxed); }
#if FMK_AVX512
inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif
}  // namespace

float to_f32(float v) { return v; }
float to_f32(f16 v) {
  // IEEE half -> float, exact (normals, subnormals, infinities, NaNs)
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1Fu, man = v.bits & 0x3FFu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise the mantissa
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400u));
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

bool simd_compiled() { return FMK_AVX512; }
bool simd_enabled() { return use_simd(); }
const char* simd_name() { return use_simd() ? "avx512vnni" : "portable"; }
void set_portable(bool portable) { g_portable.store(portable); }

// --------------------------------------------------------------------------- preparation

#if FMK_AVX512
namespace {
// quantize_q8 in 16-lane steps; the same float32 operations as the loop below, so the same bits
void quantize_q8_avx512(const float* x, int64_t M, int64_t K, int8_t* q, float* d) {
  const int64_t KB = cdiv(K, 32);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < KB; ++b) {
      const int64_t k0 = b * 32;
      const __mmask16 k_lo = mask16(K - k0), k_hi = mask16(std::max<int64_t>(K - k0 - 16, 0));
      const __m512 lo = _mm512_maskz_loadu_ps(k_lo, xr + k0), hi = _mm512_maskz_loadu_ps(k_hi, xr + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
      const float db = amax / 127.0f;
      const __m512 id = _mm512_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
      const __m512i lim = _mm512_set1_epi32(127);
      auto q16 = [&](__m512 v) {
        const __m512i i = _mm512_cvtps_epi32(
            _mm512_roundscale_ps(_mm512_mul_ps(v, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(i, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim)));
      };
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * KB * 32 + k0), q16(lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * KB * 32 + k0 + 16), q16(hi));
      d[m * KB + b] = db;
    }
  }
}
}  // namespace
#endif

void quantize_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* d) {
#if FMK_AVX512
  if (use_simd()) return quantize_q8_avx512(x, M, K, q, d);
#endif
  const int64_t KB = cdiv(K, 32);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < KB; ++b) {
      const int64_t k0 = b * 32, k1 = std::min(K, k0 + 32);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float db = amax / 127.0f;
      const float id = db != 0.0f ? 1.0f / db : 0.0f;
      int8_t* qb = q + m * KB * 32 + k0;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = std::nearbyint(xr[k] * id);  // round half to even (the default mode)
        qb[k - k0] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      }
      for (int64_t k = k1; k < k0 + 32; ++k) qb[k - k0] = 0;
      d[m * KB + b] = db;
    }
  }
}

namespace {

// The SIMD kernel's way to find a lane's weight group: a fixed pattern of 1, 2 or 4 groups
// per chunk, a gather from a table, or the portable kernel (-1).
int lane_mode(int64_t G, int64_t group, int64_t chunk_cols, int64_t lane_cols, bool fits) {
  if (!use_simd() || !fits) return -1;
  if (G == 1 || group % chunk_cols == 0) return 1;
  if (group * 2 == chunk_cols) return 2;
  if (group * 4 == chunk_cols) return 4;
  if (group % lane_cols == 0) return 0;
  return -1;
}

struct Layout {
  int64_t KB, Kp, lanes, chunk, lane_cols;
  bool a8, int4;
};

Layout layout(Kind kind, const Problem& p) {
  Layout l{};
  l.KB = cdiv(p.K, 32);
  l.a8 = kind == Kind::int4_a8 || kind == Kind::int8_a8;
  l.int4 = kind == Kind::int4_w || kind == Kind::int4_a8;
  switch (kind) {
    case Kind::int4_a8: l.chunk = 128; l.lane_cols = 8; break;
    case Kind::int8_a8: l.chunk = 64; l.lane_cols = 4; break;
    case Kind::int4_w: l.chunk = 128; l.lane_cols = 8; break;
    case Kind::int8_w: l.chunk = 16; l.lane_cols = 16; break;
  }
  l.Kp = up(p.K, l.chunk);
  l.lanes = l.Kp / l.lane_cols;
  return l;
}

struct Carver {
  char* p;
  int64_t used = 0;
  template <class T>
  T* take(int64_t n) {
    T* r = reinterpret_cast<T*>(p ? p + used : nullptr);
    used += up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64);
    return r;
  }
};

Scratch carve(Kind kind, const Problem& p, Carver& c) {
  const Layout l = layout(kind, p);
  Scratch s;
  s.Kp = l.Kp;
  s.gs = c.take<float>(p.M * p.G);
  if (l.a8) {
    s.q = c.take<int8_t>(p.M * l.KB * 32);
    s.d = c.take<float>(p.M * l.KB);
    s.xl = c.take<int8_t>(p.M * l.Kp);
    s.dl = c.take<float>(p.M * l.lanes);
    if (kind == Kind::int8_a8) s.corr = c.take<int32_t>(p.M * l.lanes);
  } else {
    s.xl = c.take<float>(p.M * l.Kp);
  }
  s.idx = c.take<int32_t>(l.lanes);
  return s;
}

}  // namespace

int64_t scratch_bytes(Kind kind, const Problem& p) {
  Carver c{nullptr};
  carve(kind, p, c);
  return c.used;
}

Scratch prepare(Kind kind, const Problem& p, void* buffer) {
  Carver c{static_cast<char*>(buffer)};
  Scratch s = carve(kind, p, c);
  const Layout l = layout(kind, p);
  const int64_t M = p.M, K = p.K, G = p.G, group = p.group;
  // the SIMD kernels need each lane inside one group: a single group, or groups a multiple of
  // the lane width (act_int8: 8 or 4 columns) or of the block (weight-only: 32 or 16 columns)
  if (l.a8 || kind == Kind::int4_w)
    s.mode = lane_mode(G, group, l.chunk, l.lane_cols, G == 1 || group % l.lane_cols == 0);
  else
    s.mode = use_simd() && (G == 1 || group % l.chunk == 0) ? 1 : -1;
  if (l.a8) {
    quantize_q8(p.x, M, K, s.q, s.d);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = s.q + m * l.KB * 32;
      const float* d = s.d + m * l.KB;
      float* gs = s.gs + m * G;
      for (int64_t g = 0; g < G; ++g) {
        // sum of d * q over the group, block by block (each block's integer sum is exact)
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        float acc = 0.0f;
        for (int64_t k = k0; k < k1;) {
          const int64_t b = k / 32, kb1 = std::min(k1, (b + 1) * 32);
          int32_t isum = 0;
          for (; k < kb1; ++k) isum += q[k];
          acc += d[b] * static_cast<float>(isum);
        }
        gs[g] = acc;
      }
      if (s.mode < 0) continue;
      int8_t* xl = static_cast<int8_t*>(s.xl) + m * l.Kp;
      float* dl = s.dl + m * l.lanes;
      if (kind == Kind::int4_a8) {
        for (int64_t cb = 0; cb < l.Kp; cb += 128)
          for (int64_t i = 0; i < 64; ++i) {
            const int64_t ke = cb + 2 * i, ko = ke + 1;
            xl[cb + i] = ke < l.KB * 32 ? q[ke] : 0;
            xl[cb + 64 + i] = ko < l.KB * 32 ? q[ko] : 0;
          }
      } else {
        for (int64_t k = 0; k < l.Kp; ++k) xl[k] = k < l.KB * 32 ? q[k] : 0;
        int32_t* corr = s.corr + m * l.lanes;
        for (int64_t L = 0; L < l.lanes; ++L) {
          int32_t sum = 0;
          for (int64_t j = 0; j < 4; ++j) sum += xl[L * 4 + j];
          corr[L] = -128 * sum;
        }
      }
      for (int64_t L = 0; L < l.lanes; ++L) {
        const int64_t b = L * l.lane_cols / 32;
        dl[L] = b < l.KB ? d[b] : 0.0f;
      }
    }
  } else {
    for (int64_t m = 0; m < M; ++m) {
      const float* x = p.x + m * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        float acc = 0.0f;
        for (int64_t k = k0; k < k1; ++k) acc += x[k];
        s.gs[m * G + g] = acc;
      }
      if (s.mode < 0) continue;
      float* xl = static_cast<float*>(s.xl) + m * l.Kp;
      if (kind == Kind::int4_w) {
        for (int64_t cb = 0; cb < l.Kp; cb += 128)
          for (int64_t j = 0; j < 8; ++j)
            for (int64_t L = 0; L < 16; ++L) {
              const int64_t k = cb + 8 * L + j;
              xl[cb + 16 * j + L] = k < K ? x[k] : 0.0f;
            }
      } else {
        for (int64_t k = 0; k < l.Kp; ++k) xl[k] = k < K ? x[k] : 0.0f;
      }
    }
  }
  if (s.mode == 0)
    for (int64_t L = 0; L < l.lanes; ++L)
      s.idx[L] = static_cast<int32_t>(std::min<int64_t>(L * l.lane_cols / group, G - 1));
  return s;
}

// --------------------------------------------------------------------------- portable kernels

namespace {

// act_int8, any layout: the columns split into runs inside one activation block and one weight
// group; each run's integer dot product and integer sum are exact.
template <class Weight, class S>
void a8_portable(const Problem& p, const Scratch& s, const Weight& wq, const S* scale, const S* zero,
                 int64_t n0, int64_t n1) {
  const int64_t KB = cdiv(p.K, 32);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* q = s.q + m * KB * 32;
      const float* d = s.d + m * KB;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K;) {
        const int64_t b = k / 32, g = k / p.group;
        const int64_t k1 = std::min({p.K, (b + 1) * 32, (g + 1) * p.group});
        int32_t dot = 0, sum = 0;
        for (; k < k1; ++k) {
          dot += static_cast<int32_t>(wq(n, k)) * q[k];
          sum += q[k];
        }
        acc += to_f32(scale[n * p.G + g]) * d[b] * static_cast<float>(dot);
        if (zero) acc += to_f32(zero[n * p.G + g]) * d[b] * static_cast<float>(sum);
      }
      p.out[m * p.N + n] = acc;
    }
}

template <class Weight, class S>
void w_portable(const Problem& p, const Scratch& s, const Weight& wq, const S* scale, const S* zero,
                int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float acc = 0.0f;
      for (int64_t g = 0; g < p.G; ++g) {
        const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
        float t = 0.0f;
        for (int64_t k = k0; k < k1; ++k) t += static_cast<float>(wq(n, k)) * x[k];
        acc += to_f32(scale[n * p.G + g]) * t;
        if (zero) acc += to_f32(zero[n * p.G + g]) * s.gs[m * p.G + g];
      }
      p.out[m * p.N + n] = acc;
    }
}

struct Int4At {
  const uint8_t* w;
  int64_t KB2;
  int operator()(int64_t n, int64_t k) const {
    const uint8_t b = w[n * KB2 + k / 2];
    return (k & 1) ? (b >> 4) : (b & 15);
  }
};
struct Int8At {
  const int8_t* w;
  int64_t K;
  int operator()(int64_t n, int64_t k) const { return w[n * K + k]; }
};

}  // namespace

#if FMK_AVX512
// --------------------------------------------------------------------------- AVX-512 kernels
namespace {

// Output rows [n0, n1) in passes of MB x-rows and NR weight rows: the weight chunk loaded
// once serves MB rows of x; NR rows give independent dependency chains.
template <class Kern>
void drive(const Kern& k, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    if (left >= 4) {
      k.template run<4, 1>(m0, n0, n1);
      m0 += 4;
    } else if (left >= 2) {
      const int64_t n = n0 + (n1 - n0) / 2 * 2;
      k.template run<2, 2>(m0, n0, n);
      k.template run<2, 1>(m0, n, n1);
      m0 += 2;
    } else {
      const int64_t n = n0 + (n1 - n0) / 4 * 4;
      k.template run<1, 4>(m0, n0, n);
      k.template run<1, 1>(m0, n, n1);
      m0 += 1;
    }
  }
}

// Output rows [n0, n1) read one weight row at a time, for 4, 2 or 1 rows of x per pass.
template <class Kern>
void drive_seq(const Kern& k, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    if (left >= 4) {
      k.template seq<4>(m0, n0, n1);
      m0 += 4;
    } else if (left >= 2) {
      k.template seq<2>(m0, n0, n1);
      m0 += 2;
    } else {
      k.template seq<1>(m0, n0, n1);
      m0 += 1;
    }
  }
}

// Software prefetch of the weight rows a call reads next: the rows are read NR at a time,
// chunk by chunk, an access pattern the hardware prefetchers follow poorly (measured: the
// 1536 x 576 int4 layer 1.3-1.9x faster from L3; 4 KiB ahead was no better). `ahead`: rows
// ahead, at least 2 KiB and 2 NR.
inline int64_t rows_ahead(int64_t row_bytes, int nr) {
  return std::max<int64_t>(2 * nr, (2048 + row_bytes - 1) / std::max<int64_t>(row_bytes, 1));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// a row's scales (and zeros) `ahead` rows on: its first and last cache line
template <class S>
inline void prefetch_row(const S* s, int64_t G) {
  if (!s) return;
  prefetch(s);
  prefetch(s + G - 1);
}

inline __mmask64 mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

inline float scalar(const float* s) { return *s; }
inline float scalar(const f16* s) { return _cvtsh_ss(s->bits); }
// up to 4 scales (mask: which) as floats
inline __m128 load4(const float* s, __mmask8 k) { return _mm_maskz_loadu_ps(k, s); }
inline __m128 load4(const f16* s, __mmask8 k) { return _mm_cvtph_ps(_mm_maskz_loadu_epi16(k, s)); }
inline __m512 load16(const float* s, __mmask16 k) { return _mm512_maskz_loadu_ps(k, s); }
inline __m512 load16(const f16* s, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s)); }

// The scale of each of the 16 lanes of chunk c of a row's scales s (k: the valid groups of the
// chunk, for MODE 2 / 4).
template <int MODE, class S>
inline __m512 lane_scales(const S* s, int64_t c, int64_t chunk, int64_t G, int64_t group, const int32_t* idx,
                          __mmask8 k) {
  if constexpr (MODE == 1) {
    return _mm512_set1_ps(scalar(s + (G == 1 ? 0 : c * chunk / group)));
  } else if constexpr (MODE == 2 || MODE == 4) {
    const __m512i pick = MODE == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                   : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(load4(s + c * MODE, k)));
  } else {
    static_assert(std::is_same_v<S, float>, "gather mode reads float32 scales only");
    return _mm512_i32gather_ps(_mm512_loadu_si512(idx + c * 16), s, 4);
  }
}

// which of a chunk's MODE groups exist: all but in the last chunk
inline __mmask8 group_mask(int mode, int64_t c, int64_t C, int64_t G) {
  if (mode != 2 && mode != 4) return 0xFF;
  return c < C - 1 ? static_cast<__mmask8>((1u << mode) - 1) : static_cast<__mmask8>((1u << (G - c * mode)) - 1);
}

// acc += zero[0:G] * gs[0:G] lane-wise (the zero points' term, reduced with the rest)
template <class S>
inline __m512 add_zero_term(__m512 acc, const S* z, const float* gs, int64_t G) {
  int64_t g = 0;
  for (; g + 16 <= G; g += 16) acc = _mm512_fmadd_ps(load16(z + g, 0xFFFF), _mm512_loadu_ps(gs + g), acc);
  if (g < G) {
    const __mmask16 k = mask16(G - g);
    acc = _mm512_fmadd_ps(load16(z + g, k), _mm512_maskz_loadu_ps(k, gs + g), acc);
  }
  return acc;
}

template <int MODE, class S>
struct Int4A8 {
  const Problem& p;
  const Scratch& s;
  const uint8_t* w;
  const S* scale;
  const S* zero;
  template <int MB, int NR>
  void run(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t KB2 = (p.K + 1) / 2, C = s.Kp / 128, G = p.G, Kp = s.Kp, lanes = Kp / 8;
    const __mmask64 last = mask64(KB2 - 64 * (C - 1));
    const int64_t ahead = rows_ahead(KB2, NR);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int8_t* xl = static_cast<const int8_t*>(s.xl) + m0 * Kp;
    const float* dl = s.dl + m0 * lanes;
    for (int64_t n = n0; n + NR <= n1; n += NR) {
      const int64_t pn = std::min(n + ahead, p.N - NR);  // the rows to prefetch
      for (int r = 0; r < NR; ++r) {
        prefetch_row(scale + (pn + r) * G, G);
        prefetch_row(zero ? zero + (pn + r) * G : zero, G);
      }
      __m512 acc[NR][MB];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __mmask64 k = c == C - 1 ? last : ~__mmask64(0);
        const __mmask8 gk = group_mask(MODE, c, C, G);
        __m512i xe[MB], xo[MB];
        __m512 dv[MB];
        for (int m = 0; m < MB; ++m) {
          xe[m] = _mm512_loadu_si512(xl + m * Kp + c * 128);
          xo[m] = _mm512_loadu_si512(xl + m * Kp + c * 128 + 64);
          dv[m] = _mm512_loadu_ps(dl + m * lanes + c * 16);
        }
        for (int r = 0; r < NR; ++r) {
          prefetch(w + (pn + r) * KB2 + c * 64);
          const __m512i b = _mm512_maskz_loadu_epi8(k, w + (n + r) * KB2 + c * 64);
          const __m512i lo = _mm512_and_si512(b, m4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
          const __m512 sv = lane_scales<MODE>(scale + (n + r) * G, c, 128, G, p.group, s.idx, gk);
          for (int m = 0; m < MB; ++m) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe[m]);
            dot = _mm512_dpbusd_epi32(dot, hi, xo[m]);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, dv[m]), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) {
          const __m512 a = add_zero_term(acc[r][m], zero + (n + r) * G, s.gs + (m0 + m) * G, G);
          p.out[(m0 + m) * p.N + n + r] = _mm512_reduce_add_ps(a);
        }
    }
  }
};

template <int MODE, class S>
struct Int8A8 {
  const Problem& p;
  const Scratch& s;
  const int8_t* w;
  const S* scale;
  const S* zero;
  template <int MB, int NR>
  void run(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t K = p.K, C = s.Kp / 64, G = p.G, Kp = s.Kp, lanes = Kp / 4;
    const __mmask64 last = mask64(K - 64 * (C - 1));
    const int64_t ahead = rows_ahead(K * static_cast<int64_t>(sizeof(*w)), NR);
    const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
    const int8_t* xl = static_cast<const int8_t*>(s.xl) + m0 * Kp;
    const float* dl = s.dl + m0 * lanes;
    const int32_t* corr = s.corr + m0 * lanes;
    for (int64_t n = n0; n + NR <= n1; n += NR) {
      const int64_t pn = std::min(n + ahead, p.N - NR);  // the rows to prefetch
      for (int r = 0; r < NR; ++r) {
        prefetch_row(scale + (pn + r) * G, G);
        prefetch_row(zero ? zero + (pn + r) * G : zero, G);
      }
      __m512 acc[NR][MB];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __mmask64 k = c == C - 1 ? last : ~__mmask64(0);
        const __mmask8 gk = group_mask(MODE, c, C, G);
        __m512i xq[MB], cv[MB];
        __m512 dv[MB];
        for (int m = 0; m < MB; ++m) {
          xq[m] = _mm512_loadu_si512(xl + m * Kp + c * 64);
          cv[m] = _mm512_loadu_si512(corr + m * lanes + c * 16);
          dv[m] = _mm512_loadu_ps(dl + m * lanes + c * 16);
        }
        for (int r = 0; r < NR; ++r) {
          // q + 128 as unsigned (masked-off bytes become 128, against x's zero padding)
          prefetch(w + (pn + r) * K + c * 64);
          const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, w + (n + r) * K + c * 64), off);
          const __m512 sv = lane_scales<MODE>(scale + (n + r) * G, c, 64, G, p.group, s.idx, gk);
          for (int m = 0; m < MB; ++m) {
            const __m512i dot = _mm512_dpbusd_epi32(cv[m], u, xq[m]);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, dv[m]), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) {
          __m512 a = acc[r][m];
          if (zero) a = add_zero_term(a, zero + (n + r) * G, s.gs + (m0 + m) * G, G);
          p.out[(m0 + m) * p.N + n + r] = _mm512_reduce_add_ps(a);
        }
    }
  }
};

// Weight-only int4: a 64-byte chunk of a row (128 columns) is read once; int32 lane L holds the
// 8 nibbles of columns 128c + 8L .. 8L+7, the j-th (bits 4j..4j+3) being column 8L + j. Each
// nibble position becomes floats by a 16-entry table (vpermps reads only an index's low 4
// bits, so a shift alone selects the nibble), multiplied with x laid out to match (xl[c][j][L]
// = x[128c + 8L + j]) in two float32 chains, then scaled per lane by its group's scale (lanes
// never straddle a group: the group size is a multiple of 8) and accumulated across chunks.
template <int MODE, class S>
struct Int4W {
  const Problem& p;
  const Scratch& s;
  const uint8_t* w;
  const S* scale;
  const S* zero;
  template <int MB, int NR>
  void run(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t KB2 = (p.K + 1) / 2, C = s.Kp / 128, G = p.G, Kp = s.Kp;
    const __mmask64 last = mask64(KB2 - 64 * (C - 1));
    const int64_t ahead = rows_ahead(KB2, NR);
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float* xl = static_cast<const float*>(s.xl) + m0 * Kp;
    for (int64_t n = n0; n + NR <= n1; n += NR) {
      const int64_t pn = std::min(n + ahead, p.N - NR);  // the rows to prefetch
      for (int r = 0; r < NR; ++r) {
        prefetch_row(scale + (pn + r) * G, G);
        prefetch_row(zero ? zero + (pn + r) * G : zero, G);
      }
      __m512 acc[NR][MB];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __mmask64 k = c == C - 1 ? last : ~__mmask64(0);
        const __mmask8 gk = group_mask(MODE, c, C, G);
        const float* xc = xl + c * 128;
        for (int r = 0; r < NR; ++r) {
          prefetch(w + (pn + r) * KB2 + c * 64);
          const __m512i b = _mm512_maskz_loadu_epi8(k, w + (n + r) * KB2 + c * 64);
          __m512 te[MB], to[MB];
          for (int m = 0; m < MB; ++m) te[m] = to[m] = _mm512_setzero_ps();
          for (int j = 0; j < 8; j += 2) {
            const __m512 we = _mm512_permutexvar_ps(j == 0 ? b : _mm512_srli_epi32(b, 4 * j), lut);
            const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4 * j + 4), lut);
            for (int m = 0; m < MB; ++m) {
              te[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xc + m * Kp + j * 16), te[m]);
              to[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xc + m * Kp + j * 16 + 16), to[m]);
            }
          }
          const __m512 sv = lane_scales<MODE>(scale + (n + r) * G, c, 128, G, p.group, s.idx, gk);
          for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(te[m], to[m]), sv, acc[r][m]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) {
          const __m512 a = add_zero_term(acc[r][m], zero + (n + r) * G, s.gs + (m0 + m) * G, G);
          p.out[(m0 + m) * p.N + n + r] = _mm512_reduce_add_ps(a);
        }
    }
  }
};

template <class S>
struct Int8W {
  const Problem& p;
  const Scratch& s;
  const int8_t* w;
  const S* scale;
  const S* zero;
  template <int MB, int NR>
  void run(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t K = p.K, B = s.Kp / 16, G = p.G, Kp = s.Kp;
    const int64_t per_group = G == 1 ? B : p.group / 16;
    const __mmask16 last = mask16(K - 16 * (B - 1));
    const int64_t ahead = rows_ahead(K * static_cast<int64_t>(sizeof(*w)), NR);
    const float* xl = static_cast<const float*>(s.xl) + m0 * Kp;
    for (int64_t n = n0; n + NR <= n1; n += NR) {
      const int64_t pn = std::min(n + ahead, p.N - NR);  // the rows to prefetch
      for (int r = 0; r < NR; ++r) {
        prefetch_row(scale + (pn + r) * G, G);
        prefetch_row(zero ? zero + (pn + r) * G : zero, G);
      }
      __m512 acc[NR][MB];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 t[NR][MB];
        for (int r = 0; r < NR; ++r)
          for (int m = 0; m < MB; ++m) t[r][m] = _mm512_setzero_ps();
        const int64_t b1 = std::min(B, (g + 1) * per_group);
        for (int64_t b = g * per_group; b < b1; ++b) {
          const __mmask16 k = last;
          __m512 xv[MB];
          for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(xl + m * Kp + b * 16);
          for (int r = 0; r < NR; ++r) {
            if ((b & 3) == 0) prefetch(w + (pn + r) * K + b * 16);
            const int8_t* src = w + (n + r) * K + b * 16;
            const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                b == B - 1 ? _mm_maskz_loadu_epi8(k, src) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
            for (int m = 0; m < MB; ++m) t[r][m] = _mm512_fmadd_ps(wv, xv[m], t[r][m]);
          }
        }
        for (int r = 0; r < NR; ++r) {
          const __m512 sv = _mm512_set1_ps(scalar(scale + (n + r) * G + g));
          for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(t[r][m], sv, acc[r][m]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) {
          __m512 a = acc[r][m];
          if (zero) a = add_zero_term(a, zero + (n + r) * G, s.gs + (m0 + m) * G, G);
          p.out[(m0 + m) * p.N + n + r] = _mm512_reduce_add_ps(a);
        }
    }
  }
};

inline __m512 load_w(const float* w, __mmask16 k) { return _mm512_maskz_loadu_ps(k, w); }
inline __m512 load_w(const uint16_t* w, __mmask16 k) {
  // bfloat16 -> float32 is exact: the 16 bits become the high half of the float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, w)), 16));
}

// Dense weights are read strictly in address order: one weight row at a time, start to end,
// each 16-column vector multiplied into the MB rows of x (two chains per row of x). Measured
// on a Zen 5 core over SmolLM2's 211 projections: ~32 GB/s this way against 23-25 GB/s when
// NR rows are read chunk by chunk side by side with software prefetch (`drive`'s scheme),
// whose interleaved streams the hardware prefetchers follow less well.
template <class T>
struct Dense {
  const Problem& p;
  const T* w;
  template <int MB>
  void seq(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t K = p.K, B = K / 16;
    const __mmask16 tail = mask16(K - 16 * B);
    const float* x = p.x + m0 * K;
    for (int64_t n = n0; n < n1; ++n) {
      const T* wr = w + n * K;
      __m512 acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 2 <= B; b += 2) {
        const __m512 w0 = load_w(wr + b * 16, 0xFFFF), w1 = load_w(wr + b * 16 + 16, 0xFFFF);
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + b * 16), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + b * 16 + 16), acc[m][1]);
        }
      }
      for (; b < B; ++b) {
        const __m512 w0 = load_w(wr + b * 16, 0xFFFF);
        for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + b * 16), acc[m][0]);
      }
      if (tail) {
        const __m512 w0 = load_w(wr + B * 16, tail);
        for (int m = 0; m < MB; ++m)
          acc[m][1] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tail, x + m * K + B * 16), acc[m][1]);
      }
      for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    }
  }
};

#if defined(__AVX512BF16__)
#define FMK_BF16_DOT 1
// bfloat16 weights times an x that is itself exactly bfloat16 (xb: its bits, rows padded with
// zeros to Kp = 32 * ceil(K / 32)): vdpbf16ps multiplies 32 pairs and adds them into 16 float32
// lanes per instruction, instead of widening each weight and an FMA per 16. The products of
// two bfloat16 values are exact in float32; the instruction flushes denormal inputs and
// results to zero (a difference of at most 2**-126 per product).
struct DenseBf16Dot {
  const Problem& p;
  const uint16_t* w;
  const uint16_t* xb;
  int64_t Kp;
  // one weight row at a time, in address order (see Dense::seq)
  template <int MB>
  void seq(int64_t m0, int64_t n0, int64_t n1) const {
    const int64_t K = p.K, B = K / 32, rest = K - 32 * B;
    const __mmask32 tail = rest ? static_cast<__mmask32>((1u << rest) - 1) : 0;
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* wr = w + n * K;
      __m512 acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 2 <= B; b += 2) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + b * 32);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + b * 32 + 32);
        for (int m = 0; m < MB; ++m) {
          const uint16_t* xm = xb + (m0 + m) * Kp + b * 32;
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xm));
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(xm + 32));
        }
      }
      // the last whole block, then the masked tail (x is zero-padded to Kp: its full load is safe)
      for (; b < B; ++b) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + b * 32);
        for (int m = 0; m < MB; ++m)
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xb + (m0 + m) * Kp + b * 32));
      }
      if (tail) {
        const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + B * 32);
        for (int m = 0; m < MB; ++m)
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w0, (__m512bh)_mm512_loadu_si512(xb + (m0 + m) * Kp + B * 32));
      }
      for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    }
  }
};
#else
#define FMK_BF16_DOT 0
#endif

template <template <int, class> class Kern, class W, class S>
void run_mode(int mode, const Problem& p, const Scratch& s, const W* w, const S* scale, const S* zero, int64_t n0,
              int64_t n1) {
  switch (mode) {
    case 1: drive(Kern<1, S>{p, s, w, scale, zero}, p.M, n0, n1); break;
    case 2: drive(Kern<2, S>{p, s, w, scale, zero}, p.M, n0, n1); break;
    case 4: drive(Kern<4, S>{p, s, w, scale, zero}, p.M, n0, n1); break;
    default:
      if constexpr (std::is_same_v<S, float>) drive(Kern<0, S>{p, s, w, scale, zero}, p.M, n0, n1);
      break;
  }
}

}  // namespace
#endif  // FMK_AVX512

// --------------------------------------------------------------------------- entry points

namespace {

template <class S>
void int4_typed(Kind kind, const Problem& p, const Scratch& s, const uint8_t* packed, const S* scale, const S* zero,
                int64_t n0, int64_t n1) {
#if FMK_AVX512
  // the gather mode reads float32 scales only: float16 ones with such groups run the loops
  if (s.mode > 0 || (s.mode == 0 && std::is_same_v<S, float>)) {
    if (kind == Kind::int4_a8)
      run_mode<Int4A8>(s.mode, p, s, packed, scale, zero, n0, n1);
    else
      run_mode<Int4W>(s.mode, p, s, packed, scale, zero, n0, n1);
    return;
  }
#endif
  const Int4At at{packed, (p.K + 1) / 2};
  if (kind == Kind::int4_a8)
    a8_portable(p, s, at, scale, zero, n0, n1);
  else
    w_portable(p, s, at, scale, zero, n0, n1);
}

template <class S>
void int8_typed(Kind kind, const Problem& p, const Scratch& s, const int8_t* q, const S* scale, const S* zero,
                int64_t n0, int64_t n1) {
#if FMK_AVX512
  if (s.mode > 0 || (s.mode == 0 && std::is_same_v<S, float>)) {
    if (kind == Kind::int8_a8)
      run_mode<Int8A8>(s.mode, p, s, q, scale, zero, n0, n1);
    else
      drive(Int8W<S>{p, s, q, scale, zero}, p.M, n0, n1);
    return;
  }
#endif
  const Int8At at{q, p.K};
  if (kind == Kind::int8_a8)
    a8_portable(p, s, at, scale, zero, n0, n1);
  else
    w_portable(p, s, at, scale, zero, n0, n1);
}

}  // namespace

void int4_rows(Kind kind, const Problem& p, const Scratch& s, const uint8_t* packed, const void* scale,
               const void* zero, bool half, int64_t n0, int64_t n1) {
  if (half)
    int4_typed(kind, p, s, packed, static_cast<const f16*>(scale), static_cast<const f16*>(zero), n0, n1);
  else
    int4_typed(kind, p, s, packed, static_cast<const float*>(scale), static_cast<const float*>(zero), n0, n1);
}

void int8_rows(Kind kind, const Problem& p, const Scratch& s, const int8_t* q, const void* scale, const void* zero,
               bool half, int64_t n0, int64_t n1) {
  if (half)
    int8_typed(kind, p, s, q, static_cast<const f16*>(scale), static_cast<const f16*>(zero), n0, n1);
  else
    int8_typed(kind, p, s, q, static_cast<const float*>(scale), static_cast<const float*>(zero), n0, n1);
}

void f32_rows(const Problem& p, const float* w, int64_t n0, int64_t n1) {
#if FMK_AVX512
  if (use_simd()) return drive_seq(Dense<float>{p, w}, p.M, n0, n1);
#endif
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      const float* wr = w + n * p.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += wr[k] * x[k];
      p.out[m * p.N + n] = acc;
    }
}

bool bf16_dot_available() {
#if FMK_AVX512 && FMK_BF16_DOT
  return use_simd();
#else
  return false;
#endif
}

void bf16_dot_rows(const Problem& p, const uint16_t* w, const uint16_t* xb, int64_t Kp, int64_t n0, int64_t n1) {
#if FMK_AVX512 && FMK_BF16_DOT
  if (use_simd()) return drive_seq(DenseBf16Dot{p, w, xb, Kp}, p.M, n0, n1);
#endif
  (void)xb;
  (void)Kp;
  bf16_rows(p, w, n0, n1);
}

void bf16_rows(const Problem& p, const uint16_t* w, int64_t n0, int64_t n1) {
#if FMK_AVX512
  if (use_simd()) return drive_seq(Dense<uint16_t>{p, w}, p.M, n0, n1);
#endif
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      const uint16_t* wr = w + n * p.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) {
        const uint32_t bits = static_cast<uint32_t>(wr[k]) << 16;
        float wf;
        std::memcpy(&wf, &bits, sizeof wf);
        acc += wf * x[k];
      }
      p.out[m * p.N + n] = acc;
    }
}

}  // namespace fmk
