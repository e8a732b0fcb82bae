// The torch ops over kernels.cpp: argument checks, the per-call preparation of x, and the split of
// output rows over torch's intra-op threads (at::parallel_for: torch.set_num_threads applies).
// Only torch/library.h and ATen core headers: the first build compiles this file in seconds.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;

// Output rows per task: enough weight bytes per task (~64 KiB) that a thread's start-up cost
// stays small next to its work; a small layer runs on one thread.
int64_t grain(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1)); }

void check_x(const Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must be [..., ", K, "] (the weight's in_features), got ",
                    x.sizes());
}

void check_shape(const Tensor& t, int64_t rows, int64_t cols, const char* what, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", what, " must be [", rows, ", ",
                    cols, "], got ", t.sizes());
}

void check_w(const Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols, const char* what, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", what, " must be ", dtype, ", got ", t.scalar_type());
  check_shape(t, rows, cols, what, op);
}

// scales / zeros: float32 or float16 (GGUF's own), both of one dtype
void check_scale(const Tensor& t, const Tensor& scale, int64_t rows, int64_t cols, const char* what, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf, op, ": ", what,
                    " must be float32 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == scale.scalar_type(), op, ": ", what, " must have scale's dtype (",
                    scale.scalar_type(), "), got ", t.scalar_type());
  check_shape(t, rows, cols, what, op);
}

// float32 [..., N] for x [..., K]
Tensor out_like(const Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return at::empty(shape, x.options().dtype(at::kFloat));
}

fmk::Problem problem(const Tensor& x, const Tensor& out, int64_t N, int64_t K, int64_t G, int64_t group) {
  const int64_t M = N == 0 ? 0 : out.numel() / N;
  return fmk::Problem{M, N, K, G, group, x.data_ptr<float>(), out.data_ptr<float>()};
}

template <class F>
Tensor quantized(const Tensor& x_in, int64_t N, int64_t K, int64_t G, int64_t group, fmk::Kind kind,
                 int64_t row_bytes, const F& rows) {
  const Tensor x = x_in.contiguous();
  Tensor out = out_like(x, N);
  const fmk::Problem p = problem(x, out, N, K, G, group);
  if (p.M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  // the calling thread's scratch, reused across calls (the threads below only read it)
  thread_local std::vector<uint8_t> buffer;
  const size_t bytes = static_cast<size_t>(fmk::scratch_bytes(kind, p)) + 64;
  if (buffer.size() < bytes) buffer.resize(bytes);
  void* base = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  const fmk::Scratch s = fmk::prepare(kind, p, base);
  at::parallel_for(0, N, grain(row_bytes * p.M), [&](int64_t n0, int64_t n1) { rows(p, s, n0, n1); });
  return out;
}

int64_t groups_of(int64_t K, int64_t group_size, const char* op) {
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  return (K + group_size - 1) / group_size;
}

Tensor int4_linear(const Tensor& x, const Tensor& packed, const Tensor& scale, const Tensor& zero, int64_t group_size,
                   bool act_int8) {
  const char* op = "fmodel::int4_linear";
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must be [out, ceil(in / 2)], got ", packed.sizes());
  const int64_t N = packed.size(0), K = x.dim() >= 1 ? x.size(-1) : 0;
  check_x(x, K, op);
  TORCH_CHECK_VALUE(packed.size(1) == (K + 1) / 2, op, ": packed must be [out, ceil(in / 2)] = [", N, ", ",
                    (K + 1) / 2, "] for x of width ", K, ", got ", packed.sizes());
  const int64_t G = groups_of(K, group_size, op);
  check_w(packed, at::kByte, N, (K + 1) / 2, "packed", op);
  check_scale(scale, scale, N, G, "scale", op);
  check_scale(zero, scale, N, G, "zero", op);
  const Tensor w = packed.contiguous(), s = scale.contiguous(), z = zero.contiguous();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const void* sp = s.data_ptr();
  const void* zp = z.data_ptr();
  const bool half = s.scalar_type() == at::kHalf;
  const fmk::Kind kind = act_int8 ? fmk::Kind::int4_a8 : fmk::Kind::int4_w;
  return quantized(x, N, K, G, group_size, kind, (K + 1) / 2,
                   [&](const fmk::Problem& p, const fmk::Scratch& sc, int64_t n0, int64_t n1) {
                     fmk::int4_rows(kind, p, sc, wp, sp, zp, half, n0, n1);
                   });
}

Tensor int8_linear(const Tensor& x, const Tensor& q, const Tensor& scale, const std::optional<Tensor>& zero,
                   int64_t group_size, bool act_int8) {
  const char* op = "fmodel::int8_linear";
  TORCH_CHECK_VALUE(q.dim() == 2, op, ": q must be [out, in], got ", q.sizes());
  const int64_t N = q.size(0), K = q.size(1);
  check_x(x, K, op);
  const int64_t G = groups_of(K, group_size, op);
  check_w(q, at::kChar, N, K, "q", op);
  check_scale(scale, scale, N, G, "scale", op);
  Tensor z;
  if (zero.has_value()) {
    check_scale(*zero, scale, N, G, "zero", op);
    z = zero->contiguous();
  }
  const Tensor w = q.contiguous(), s = scale.contiguous();
  const int8_t* wp = w.data_ptr<int8_t>();
  const void* sp = s.data_ptr();
  const void* zp = z.defined() ? z.data_ptr() : nullptr;
  const bool half = s.scalar_type() == at::kHalf;
  const fmk::Kind kind = act_int8 ? fmk::Kind::int8_a8 : fmk::Kind::int8_w;
  return quantized(x, N, K, G, group_size, kind, K,
                   [&](const fmk::Problem& p, const fmk::Scratch& sc, int64_t n0, int64_t n1) {
                     fmk::int8_rows(kind, p, sc, wp, sp, zp, half, n0, n1);
                   });
}

Tensor dense_linear(const Tensor& x_in, const Tensor& weight) {
  const char* op = "fmodel::dense_linear";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out, in], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, op,
                    ": weight must be float32 or bfloat16, got ", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  // x float32, or bfloat16 (a bfloat16 model's activations as they are: widened exactly here,
  // so that they reach the bfloat16 dot-product kernel even where torch.compile would have
  // kept a float32 value unrounded)
  const bool x_bf16 = x_in.scalar_type() == at::kBFloat16;
  check_w(weight, weight.scalar_type(), N, K, "weight", op);
  const Tensor w = weight.contiguous();
  if (x_bf16 && w.scalar_type() == at::kBFloat16 && fmk::bf16_dot_available()) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu(), op, ": x must be a CPU tensor, got ", x_in.device());
    TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == K, op, ": x must be [..., ", K,
                      "] (the weight's in_features), got ", x_in.sizes());
    // x's bits as they are, zero-padded to whole 32-column blocks: no conversion, no check
    const Tensor xc = x_in.contiguous();
    Tensor out = out_like(xc, N);
    const int64_t M = N == 0 ? 0 : out.numel() / N, Kp = (K + 31) / 32 * 32;
    if (M == 0 || N == 0) return out;
    if (K == 0) return out.zero_();
    std::vector<uint16_t> xb(static_cast<size_t>(M * Kp), 0);
    const auto* bits = static_cast<const uint16_t*>(xc.data_ptr());
    for (int64_t m = 0; m < M; ++m) std::memcpy(xb.data() + m * Kp, bits + m * K, static_cast<size_t>(K) * 2);
    const fmk::Problem p{M, N, K, 1, K, nullptr, out.data_ptr<float>()};
    at::parallel_for(0, N, grain(K * 2 * M), [&](int64_t n0, int64_t n1) {
      fmk::bf16_dot_rows(p, static_cast<const uint16_t*>(w.data_ptr()), xb.data(), Kp, n0, n1);
    });
    return out;
  }
  const Tensor x = (x_bf16 ? x_in.to(at::kFloat) : x_in).contiguous();
  check_x(x, K, op);
  Tensor out = out_like(x, N);
  const fmk::Problem p = problem(x, out, N, K, 1, K);
  if (p.M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const void* wp = w.data_ptr();
  if (bf16 && fmk::bf16_dot_available()) {
    // x exactly bfloat16 (a bfloat16 model's activations, widened by the caller): its bits,
    // zero-padded to whole 32-column blocks, for the bfloat16 dot-product kernel
    const int64_t Kp = (K + 31) / 32 * 32;
    const float* xf = x.data_ptr<float>();
    std::vector<uint16_t> xb(static_cast<size_t>(p.M * Kp), 0);
    uint32_t low = 0;  // any bit below bfloat16's: x is not exactly bfloat16
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        uint32_t bits;
        std::memcpy(&bits, xf + m * K + k, sizeof bits);
        low |= bits & 0xFFFFu;
        xb[m * Kp + k] = static_cast<uint16_t>(bits >> 16);
      }
    if (low == 0) {
      at::parallel_for(0, N, grain(K * w.element_size() * p.M), [&](int64_t n0, int64_t n1) {
        fmk::bf16_dot_rows(p, static_cast<const uint16_t*>(wp), xb.data(), Kp, n0, n1);
      });
      return out;
    }
  }
  at::parallel_for(0, N, grain(K * w.element_size() * p.M), [&](int64_t n0, int64_t n1) {
    if (bf16)
      fmk::bf16_rows(p, static_cast<const uint16_t*>(wp), n0, n1);
    else
      fmk::f32_rows(p, static_cast<const float*>(wp), n0, n1);
  });
  return out;
}

// Attention of a decode step's few query rows over the cache (attention.cpp): q [B, H, R, D],
// k / v [B, H, S, D] of q's dtype (float32 or bfloat16; rows contiguous, any batch / head
// strides: a cache sliced to its length), mask bool broadcastable to [B, H, R, S] (true =
// attend); returns [B, H, R, D] in q's dtype.
Tensor decode_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& mask_in,
                        double scale) {
  const char* op = "fmodel::decode_attention";
  for (const Tensor* t : {&q_in, &k_in, &v_in, &mask_in}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": tensors must be on the CPU, got ", t->device());
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": q, k, v and mask must be 4-D, got ", t->sizes());
  }
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, op, ": q must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype, op,
                    ": k and v must have q's dtype (", dtype, "), got ", k_in.scalar_type(), " and ", v_in.scalar_type());
  TORCH_CHECK_VALUE(mask_in.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), R = q_in.size(2), D = q_in.size(3), S = k_in.size(2);
  TORCH_CHECK_VALUE(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D && v_in.sizes() == k_in.sizes(), op,
                    ": k and v must be [", B, ", ", H, ", S, ", D, "] alike, got ", k_in.sizes(), " and ", v_in.sizes());
  const Tensor mask = mask_in.expand({B, H, R, S});
  // rows contiguous in each (batch, head): a cache sliced along its slots keeps them so
  auto rows = [D](const Tensor& t) { return t.size(2) <= 1 || (t.stride(3) == 1 && t.stride(2) == D) ? t : t.contiguous(); };
  const Tensor q = rows(q_in), k = rows(k_in), v = rows(v_in);
  Tensor out = at::empty({B, H, R, D}, q.options());
  if (out.numel() == 0) return out;
  fmk::AttnProblem a{B, H, R, S, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1), k.stride(0),
                     k.stride(1), v.stride(0), v.stride(1), mask.data_ptr<bool>(), mask.stride(0), mask.stride(1),
                     mask.stride(2), mask.stride(3), static_cast<float>(scale), dtype == at::kBFloat16, out.data_ptr()};
  at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, R * S * D / 64)),
                   [&](int64_t bh0, int64_t bh1) { fmk::decode_attention(a, bh0, bh1); });
  return out;
}

// llama.cpp's Q8_1 activation quantization as the act_int8 kernels apply it (for tests):
// q [M, ceil(K/32)*32] int8, d [M, ceil(K/32)] float32.
std::tuple<Tensor, Tensor> quantize_act(const Tensor& x_in) {
  const char* op = "fmodel::quantize_act";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be [M, K], got ", x_in.sizes());
  check_x(x_in, x_in.size(1), op);
  const Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), KB = (K + 31) / 32;
  Tensor q = at::empty({M, KB * 32}, x.options().dtype(at::kChar));
  Tensor d = at::empty({M, KB}, x.options());
  fmk::quantize_q8(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>());
  return {q, d};
}

std::string simd() { return fmk::simd_name(); }
bool simd_compiled() { return fmk::simd_compiled(); }
void set_portable(bool portable) { fmk::set_portable(portable); }

}  // namespace

TORCH_LIBRARY(fmodel, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size, bool act_int8) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? zero, int group_size, bool act_int8) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("quantize_act(Tensor x) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("simd() -> str", &simd);
  m.def("simd_compiled() -> bool", &simd_compiled);
  m.def("set_portable(bool portable) -> ()", &set_portable);
}

TORCH_LIBRARY_IMPL(fmodel, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("dense_linear", &dense_linear);
  m.impl("quantize_act", &quantize_act);
  m.impl("decode_attention", &decode_attention);
}
