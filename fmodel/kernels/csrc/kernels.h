// fmodel's CPU decode kernels: plain C++ (no torch headers, so this half of the extension
// compiles in about a second). ops.cpp binds them to torch ops and splits output rows
// over threads; every kernel here computes output rows [n0, n1) of out[M, N].
//
// Two implementations of each kernel, selected when this file is compiled:
//   - AVX-512 (F, BW, VL, VNNI; BF16 not needed): compiled when the compiler targets them
//     (-march=native on such a machine), used unless set_portable(true);
//   - portable: plain loops (the compiler vectorises what it can), always compiled, the only
//     one on other machines. Both compute the same integers on the act_int8 paths; float sums
//     may associate differently (float32 rounding apart, they agree).
#pragma once
#include <cstdint>

namespace fmk {

// Which implementation the kernels use: "avx512vnni" or "portable" (what was compiled and
// not switched off by set_portable).
const char* simd_name();
struct f16 {
  uint16_t bits;  // an IEEE float16, as stored
};
float to_f32(float v);
float to_f32(f16 v);
bool simd_compiled();
void set_portable(bool portable);
// the AVX-512 code is compiled and not switched off by set_portable
bool simd_enabled();

// llama.cpp's Q8_1 activation scheme: x [M, K] in blocks of 32 columns (the last one padded
// with zeros), per block d = max|x| / 127, q = round-half-even(x * (1/d)) (q = 0 if d = 0).
// q: [M, KB * 32] int8, d: [M, KB] float, KB = ceil(K / 32).
void quantize_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* d);

// What a call prepares once from x, before its rows are split over threads: quantized
// activations, x in the SIMD kernels' layout, per-group sums (kernels.cpp describes them).
struct Scratch {
  int8_t* q = nullptr;       // act_int8: quantized activations, original order [M, KB*32]
  float* d = nullptr;        // act_int8: their block scales [M, KB]
  float* gs = nullptr;       // [M, G]: the sum over each weight group's columns of x
                             // (weight-only) or of d * q (act_int8), for the zero points
  void* xl = nullptr;        // x in the SIMD kernels' layout, [M, Kp] (int8 or float)
  float* dl = nullptr;       // act_int8: each SIMD lane's block scale
  int32_t* corr = nullptr;   // int8 act_int8: -128 * each lane's sum of q
  int32_t* idx = nullptr;    // lane -> weight group, for group sizes without a fixed pattern
  int64_t Kp = 0;            // row length of xl
  int mode = 0;              // how the SIMD kernel finds a lane's group (-1: portable kernel)
};

struct Problem {
  int64_t M, N, K, G, group;  // x [M, K], weight [N, K] in G groups of `group` columns
  const float* x;
  float* out;                 // [M, N]
};

enum class Kind { int4_w, int4_a8, int8_w, int8_a8 };
// The bytes of scratch a call needs; prepare() lays the Scratch out in `buffer` (64-aligned).
int64_t scratch_bytes(Kind kind, const Problem& p);
Scratch prepare(Kind kind, const Problem& p, void* buffer);

// W[n, k] = q[n, k] * scale[n, k / group] + zero[n, k / group]; scale and zero are float32, or
// IEEE float16 when `half` (GGUF's own scale type: converted exactly to float32 as they are read).
// int4: packed [N, ceil(K/2)] uint8, column 2j in the low nibble; scale, zero [N, G].
void int4_rows(Kind kind, const Problem& p, const Scratch& s, const uint8_t* packed, const void* scale,
               const void* zero, bool half, int64_t n0, int64_t n1);
// int8: q [N, K] int8; scale [N, G]; zero [N, G] or nullptr.
void int8_rows(Kind kind, const Problem& p, const Scratch& s, const int8_t* q, const void* scale, const void* zero,
               bool half, int64_t n0, int64_t n1);
// dense: weight [N, K] float32 or bfloat16 (raw uint16), float32 accumulation.
void f32_rows(const Problem& p, const float* w, int64_t n0, int64_t n1);
void bf16_rows(const Problem& p, const uint16_t* w, int64_t n0, int64_t n1);
// bfloat16 weight, x exactly bfloat16 (xb: its bits, [M, Kp] zero-padded, Kp = 32 * ceil(K/32)):
// vdpbf16ps where the CPU has AVX512-BF16 (bf16_dot_available), else bf16_rows.
bool bf16_dot_available();
void bf16_dot_rows(const Problem& p, const uint16_t* w, const uint16_t* xb, int64_t Kp, int64_t n0, int64_t n1);

// Attention of R query rows per (batch, head) over S cached keys / values of size D (attention.cpp):
// q [B, H, R, D], k and v [B, H, S, D] (rows contiguous; batch and head strides given, in
// elements), all float32 or all bfloat16 (`bf16`: raw uint16); mask bool, true = attend, read at
// b * m_sb + h * m_sh + r * m_sr + j * m_ss (0 strides broadcast); out [B, H, R, D] contiguous,
// q's dtype. Computes the (batch, head) pairs bh0 .. bh1 - 1 (bh = b * H + h).
struct AttnProblem {
  int64_t B, H, R, S, D;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  const bool* mask;
  int64_t m_sb, m_sh, m_sr, m_ss;
  float scale;
  bool bf16;
  void* out;
};
void decode_attention(const AttnProblem& a, int64_t bh0, int64_t bh1);

}  // namespace fmk
