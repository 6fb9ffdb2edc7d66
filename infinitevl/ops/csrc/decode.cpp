// Fused CPU kernels for one decode step: the work between a layer's linear layers, one call per layer.
//
// The plain-PyTorch path spends most of a decode step's time outside the matrix products in a few hundred small
// ops per layer (casts, norms, the conv step, gates, the delta rule, RoPE, the ring write), each dispatched from
// Python. These kernels do the same arithmetic in one pass each, in fp32 inside, rounding to the activation dtype
// where the plain path stores an intermediate in it. Built by `fused.py` with the system C++ compiler and loaded as
// torch ops (`torch.ops.infinitevl.*`); the plain path in ops/ stays the reference they are tested against.
//
//   rms_norm(x, weight, eps)             -> normed                          x [..., d]
//   add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)        x, residual [..., d]
//   silu_mul(gate, up)                   -> silu(gate) * up                 the MLP's activation
//   linear_bf16(x, weight, bias?)        -> x W^T + b, bf16, few rows       (AVX512-BF16 builds; features())
//   gdn_decode(...)                      -> gated-normed output [B, H*Dv]   updates conv tails and memory in place;
//                                           a / b are the gate projections [B, H], or (project_ab) their weights
//   swa_decode(...)                      -> attention output [B, H*D]       writes the token into the ring buffer
//
// They are public torch ops: every entry point checks the device, dtype, layout and shape of everything it reads or
// writes (TORCH_CHECK, a RuntimeError in Python) before touching memory. fused.py registers their fake (meta) kernels.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using BF16 = c10::BFloat16;

inline float load(float x) { return x; }
inline float load(BF16 x) {  // the bit shift compilers vectorize (c10's conversion is the same value)
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename T>
inline float round_to(float x) {  // what storing an intermediate in T does to it
  return load(static_cast<T>(x));
}
// exp as 2^n * p(r), |r| <= ln2 / 2, with Cephes' degree-6 polynomial (about 1 ulp; 0 below -87), in a scalar and
// (with AVX-512) a sixteen-lane form: the softmax and the silus run on it
inline float exp_fast(float x) {
  const float c = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}
inline float silu(float x) { return x / (1.0f + exp_fast(-x)); }

#if defined(__AVX512F__)
inline __m512 exp_fast(__m512 x) {  // exp_fast above, sixteen lanes at a time
  const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(c, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float coef : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coef));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}
#endif

// x = silu(x) = x / (1 + exp(-x)), in place
void silu_inplace(float* x, int64_t len) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= len; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(one, exp_fast(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
#endif
  for (; i < len; ++i) x[i] = silu(x[i]);
}

// x = softmax(x) over len entries (-inf entries get 0), fp32
void softmax(float* x, int64_t len) {
  float mx = -std::numeric_limits<float>::infinity(), total = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(mx);
  for (; i + 16 <= len; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
  mx = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < len; ++i) mx = std::max(mx, x[i]);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) {
    const __m512 e = exp_fast(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
    _mm512_storeu_ps(x + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  total = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < len; ++i) total += (x[i] = exp_fast(x[i] - mx));
  const float inv = 1.0f / total;
  for (i = 0; i < len; ++i) x[i] *= inv;
}

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // torch's threshold 20

void check(bool ok, const char* what) { TORCH_CHECK(ok, "infinitevl fused decode: ", what); }

// `name` is a CPU tensor of exactly `shape`
void check_shape(const Tensor& t, const char* op, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), "infinitevl.", op, ": ", name, " must be a CPU tensor, not ", t.device());
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), "infinitevl.", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", c10::IntArrayRef(shape));
}
void check_dtype(const Tensor& t, const char* op, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "infinitevl.", op, ": ", name, " is ", t.scalar_type(), ", expected ", want);
}
void check_float(const Tensor& t, const char* op, const char* name) {  // the two dtypes the kernels compute in
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "infinitevl.", op, ": ", name,
              " is ", t.scalar_type(), ", expected float32 or bfloat16");
}
// a tensor the kernel writes in place: it must be the caller's own contiguous buffer
void check_buffer(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "infinitevl.", op, ": ", name, " is written in place and must be contiguous");
}

std::vector<float> as_floats(const Tensor& t) {  // a small parameter vector (heads, a head's width), no dispatch
  check(t.is_contiguous(), "parameters must be contiguous");
  std::vector<float> out(t.numel());
  if (t.scalar_type() == at::kFloat) {
    std::copy_n(t.data_ptr<float>(), t.numel(), out.data());
  } else {
    check(t.scalar_type() == at::kBFloat16, "parameters must be float32 or bfloat16");
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = load(t.data_ptr<BF16>()[i]);
  }
  return out;
}

// Call f with the C++ types of `act` (activations) and `store` (a state buffer): float or bfloat16 each.
template <typename F>
void dispatch2(at::ScalarType act, at::ScalarType store, F&& f) {
  auto with_store = [&](auto a) {
    if (store == at::kFloat) return f(a, float{});
    check(store == at::kBFloat16, "state buffers must be float32 or bfloat16");
    return f(a, BF16{});
  };
  if (act == at::kFloat) return with_store(float{});
  check(act == at::kBFloat16, "activations must be float32 or bfloat16");
  return with_store(BF16{});
}

// ---- RMSNorm, optionally after the residual add ---------------------------------------------------------------
template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* sum, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      T* orow = out + r * d;
      T* srow = res ? sum + r * d : nullptr;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        float v = load(xr[i]);
        if (res) {
          v = round_to<T>(v + load(res[r * d + i]));  // x + h, stored in T as the plain path does
          srow[i] = static_cast<T>(v);
        }
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        float v = res ? load(srow[i]) : load(xr[i]);
        orow[i] = static_cast<T>(load(w[i]) * round_to<T>(v * inv));  // weight * h.to(dtype), as Qwen2
      }
    }
  });
}

// x [..., d] and residual (if any) of x's shape, weight [d], all CPU tensors of one dtype
void check_norm(const Tensor& x, const Tensor& weight, const Tensor* residual, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.device().is_cpu(), "infinitevl.", op, ": x must be a CPU tensor, not ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "infinitevl.", op, ": x must have a last dimension of at least 1");
  check_shape(weight, op, "weight", {x.size(-1)});
  check_dtype(weight, op, "weight", x.scalar_type());
  if (residual) {
    TORCH_CHECK(residual->device().is_cpu() && residual->sizes() == x.sizes(), "infinitevl.", op,
                ": residual has shape ", residual->sizes(), ", expected x's ", x.sizes(), " on the CPU");
    check_dtype(*residual, op, "residual", x.scalar_type());
  }
}

template <typename T>
void norm_dispatch(const Tensor& x, const Tensor& weight, const Tensor* residual, Tensor& out, Tensor* sum,
                   float eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  rms_norm_rows<T>(x.data_ptr<T>(), residual ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                   out.data_ptr<T>(), sum ? sum->data_ptr<T>() : nullptr, rows, d, eps);
}

Tensor rms_norm(Tensor x, Tensor weight, double eps) {
  check_norm(x, weight, nullptr, "rms_norm");
  x = x.contiguous();
  weight = weight.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  dispatch2(x.scalar_type(), at::kFloat, [&](auto a, auto) {
    norm_dispatch<decltype(a)>(x, weight, nullptr, out, nullptr, static_cast<float>(eps));
  });
  return out;
}

std::tuple<Tensor, Tensor> add_rms_norm(Tensor x, Tensor residual, Tensor weight, double eps) {
  check_norm(x, weight, &residual, "add_rms_norm");
  x = x.contiguous();
  residual = residual.contiguous();
  weight = weight.contiguous();
  Tensor out = at::empty(x.sizes(), x.options()), sum = at::empty(x.sizes(), x.options());
  dispatch2(x.scalar_type(), at::kFloat, [&](auto a, auto) {
    norm_dispatch<decltype(a)>(x, weight, &residual, out, &sum, static_cast<float>(eps));
  });
  return {out, sum};
}

// ---- bf16 linear layers for a few rows ------------------------------------------------------------------------
// A decode step's bf16 matrix-vector products only stream the weight; torch's bf16 path (oneDNN) reaches 30-50 GB/s
// on these shapes, these dot products with fp32 sums about twice that (measured on an AMD EPYC with avx512_bf16).
// Four weight rows per pass share each load of x; rows of x reuse the four weight rows from L1.
std::vector<std::string> features() {
  std::vector<std::string> out;
#if defined(__AVX512F__)
  out.emplace_back("avx512");
#endif
#if defined(__AVX512BF16__)
  out.emplace_back("avx512_bf16");
#endif
  return out;
}

Tensor linear_bf16(Tensor x, Tensor weight, const std::optional<Tensor>& bias) {
  const char* op = "linear_bf16";
  check_dtype(x, op, "x", at::kBFloat16);
  check_dtype(weight, op, "weight", at::kBFloat16);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) > 0, "infinitevl.linear_bf16: weight must be [N, K] with K > 0, not ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  check_shape(weight, op, "weight", {N, K});  // on the CPU
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == K, "infinitevl.linear_bf16: x [..., K=", K,
              "] on the CPU expected, got ", x.sizes(), " on ", x.device());
  if (bias) {
    check_shape(*bias, op, "bias", {N});
    check_float(*bias, op, "bias");
  }
#if defined(__AVX512BF16__)
  const int64_t R = x.numel() / K;
  x = x.contiguous();
  weight = weight.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  std::vector<float> b(N, 0.0f);
  if (bias) b = as_floats(bias->contiguous());
  const BF16* X = x.data_ptr<BF16>();
  const BF16* W = weight.data_ptr<BF16>();
  BF16* Y = y.data_ptr<BF16>();
  const int64_t full = K / 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (K % 32)) - 1);
  auto chunk = [&](const BF16* p, int64_t c) {  // 32 values from column 32 c on, zeros past K
    return (__m512bh)(c < full ? _mm512_loadu_si512(p + c * 32) : _mm512_maskz_loadu_epi16(tail, p + c * 32));
  };
  const int64_t chunks = full + (K % 32 != 0);
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      for (int64_t r = 0; r < R; ++r) {
        const BF16* xr = X + r * K;
        __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512bh xv = chunk(xr, c);
          for (int64_t j = 0; j < rows; ++j) s[j] = _mm512_dpbf16_ps(s[j], chunk(W + (n0 + j) * K, c), xv);
        }
        for (int64_t j = 0; j < rows; ++j) Y[r * N + n0 + j] = BF16(_mm512_reduce_add_ps(s[j]) + b[n0 + j]);
      }
    }
  });
  return y;
#else
  check(false, "linear_bf16 needs AVX512-BF16 (see features())");
  return x;
#endif
}

// ---- the MLP's activation: silu(gate) * up ---------------------------------------------------------------------
Tensor silu_mul(Tensor gate, Tensor up) {
  check_float(gate, "silu_mul", "gate");
  check_dtype(up, "silu_mul", "up", gate.scalar_type());
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu() && gate.sizes() == up.sizes(),
              "infinitevl.silu_mul: gate and up must be CPU tensors of one shape, got ", gate.sizes(), " and ",
              up.sizes());
  gate = gate.contiguous();
  up = up.contiguous();
  Tensor out = at::empty(gate.sizes(), gate.options());
  dispatch2(gate.scalar_type(), at::kFloat, [&](auto a, auto) {
    using T = decltype(a);
    const T* g = gate.data_ptr<T>();
    const T* u = up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, gate.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
      float buf[256];
      for (int64_t b0 = i0; b0 < i1; b0 += 256) {
        const int64_t len = std::min<int64_t>(256, i1 - b0);
        for (int64_t i = 0; i < len; ++i) buf[i] = load(g[b0 + i]);
        silu_inplace(buf, len);
        for (int64_t i = 0; i < len; ++i) o[b0 + i] = static_cast<T>(round_to<T>(buf[i]) * load(u[b0 + i]));
      }
    });
  });
  return out;
}

// ---- Gated DeltaNet: conv step, gates, l2norm, the delta rule on the fp32 memory, gated output norm ----------
template <typename T, typename TS>
void conv_step(const T* x, const T* w, TS* tail, float* y, int64_t B, int64_t C, int64_t K) {
  // y = silu(sum_j w[c, j] * window[j]), window = (tail, x); the tail shifts by one (all in place)
  at::parallel_for(0, B * C, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % C;
      TS* t = tail + i * (K - 1);
      const float xi = load(x[i]);
      float acc = load(w[c * K + K - 1]) * xi;
      for (int64_t j = 0; j < K - 1; ++j) acc += load(w[c * K + j]) * round_to<T>(load(t[j]));
      for (int64_t j = 0; j + 1 < K - 1; ++j) t[j] = t[j + 1];
      if (K > 1) t[K - 2] = static_cast<TS>(xi);
      y[i] = round_to<T>(acc);
    }
    silu_inplace(y + i0, i1 - i0);
    for (int64_t i = i0; i < i1; ++i) y[i] = round_to<T>(y[i]);
  });
}

void l2norm(float* x, int64_t n, float scale) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float f = scale / std::sqrt(ss + 1e-6f);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

template <typename T, typename TS>
Tensor gdn_decode_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_in, const Tensor& b_in,
                       const Tensor& x, bool project_ab, const Tensor& gate, const Tensor& wq, const Tensor& wk, const Tensor& wv, Tensor& tq,
                       Tensor& tk, Tensor& tv, Tensor& memory, const Tensor& A_log, const Tensor& dt_bias,
                       const Tensor& norm_weight, float eps, float scale) {
  // shapes were checked by gdn_decode
  const int64_t B = memory.size(0), H = memory.size(1), Dk = memory.size(2), Dv = memory.size(3);
  const int64_t KVh = k.size(1) / Dk, K = wq.size(-1), Cq = q.size(1), Ck = k.size(1), Cv = v.size(1);
  // the gates' inputs a, b [B, H]: given, or projected here from x [B, d] with the weights a_in, b_in [H, d]
  // (two 16-row products: one fp32 pass beats two library calls), stored in T as the plain path does
  std::vector<float> a(B * H), b(B * H);
  if (project_ab) {
    const int64_t d = x.size(1);
    std::vector<float> xf(d);
    for (int64_t bi = 0; bi < B; ++bi) {
      const T* xr = x.data_ptr<T>() + bi * d;
      for (int64_t c = 0; c < d; ++c) xf[c] = load(xr[c]);
      for (int64_t h = 0; h < H; ++h) {
        const T* wa = a_in.data_ptr<T>() + h * d;
        const T* wb = b_in.data_ptr<T>() + h * d;
        float sa = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sa, sb)
        for (int64_t c = 0; c < d; ++c) {
          sa += load(wa[c]) * xf[c];
          sb += load(wb[c]) * xf[c];
        }
        a[bi * H + h] = round_to<T>(sa);
        b[bi * H + h] = round_to<T>(sb);
      }
    }
  } else {
    for (int64_t i = 0; i < B * H; ++i) {
      a[i] = load(a_in.data_ptr<T>()[i]);
      b[i] = load(b_in.data_ptr<T>()[i]);
    }
  }
  // conv outputs in fp32 (values rounded to T, as the plain path stores them)
  std::vector<float> qc(B * Cq), kc(B * Ck), vc(B * Cv);
  conv_step<T, TS>(q.data_ptr<T>(), wq.data_ptr<T>(), tq.data_ptr<TS>(), qc.data(), B, Cq, K);
  conv_step<T, TS>(k.data_ptr<T>(), wk.data_ptr<T>(), tk.data_ptr<TS>(), kc.data(), B, Ck, K);
  conv_step<T, TS>(v.data_ptr<T>(), wv.data_ptr<T>(), tv.data_ptr<TS>(), vc.data(), B, Cv, K);
  const std::vector<float> A = as_floats(A_log), dt = as_floats(dt_bias), nw = as_floats(norm_weight);
  Tensor out = at::empty({B, H * Dv}, q.options());
  T* o_ptr = out.data_ptr<T>();
  const T* g_ptr = gate.data_ptr<T>();
  float* S_all = memory.data_ptr<float>();
  const int64_t group = H / KVh;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qh(Dk), kh(Dk), pred(Dv), u(Dv), o(Dv), gate_f(Dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / H, h = i % H, j = h / group;
      std::copy_n(&qc[bi * Cq + h * Dk], Dk, qh.data());
      std::copy_n(&kc[bi * Ck + j * Dk], Dk, kh.data());
      l2norm(qh.data(), Dk, scale);
      l2norm(kh.data(), Dk, 1.0f);
      const float beta = 1.0f / (1.0f + std::exp(-b[bi * H + h]));
      const float decay = std::exp(-std::exp(A[h]) * softplus(a[bi * H + h] + dt[h]));
      float* S = S_all + i * Dk * Dv;
      // pass 1: what the decayed memory predicts for k: decay * S^T k
      std::fill(pred.begin(), pred.end(), 0.0f);
      for (int64_t r = 0; r < Dk; ++r) {
        const float kr = kh[r];
        const float* row = S + r * Dv;
#pragma omp simd
        for (int64_t c = 0; c < Dv; ++c) pred[c] += kr * row[c];
      }
      const float* vh = &vc[bi * Cv + j * Dv];
#pragma omp simd
      for (int64_t c = 0; c < Dv; ++c) u[c] = beta * (vh[c] - decay * pred[c]);
      // pass 2: S = decay * S + k u^T, and o = S^T q read from the updated rows
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t r = 0; r < Dk; ++r) {
        const float kr = kh[r], qr = qh[r];
        float* row = S + r * Dv;
#pragma omp simd
        for (int64_t c = 0; c < Dv; ++c) {
          const float s = decay * row[c] + kr * u[c];
          row[c] = s;
          o[c] += qr * s;
        }
      }
      // gated RMSNorm per head: o is stored in T first, as the plain path does
      float ss = 0.0f;
      for (int64_t c = 0; c < Dv; ++c) {
        o[c] = round_to<T>(o[c]);
        ss += o[c] * o[c];
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(Dv) + eps);
      const T* gh = g_ptr + bi * H * Dv + h * Dv;
      T* oh = o_ptr + bi * H * Dv + h * Dv;
      for (int64_t c = 0; c < Dv; ++c) gate_f[c] = load(gh[c]);
      silu_inplace(gate_f.data(), Dv);
      for (int64_t c = 0; c < Dv; ++c) oh[c] = static_cast<T>(o[c] * inv * nw[c] * gate_f[c]);
    }
  });
  return out;
}

Tensor gdn_decode(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor x, bool project_ab, Tensor gate,
                  Tensor wq, Tensor wk, Tensor wv, Tensor tq, Tensor tk, Tensor tv, Tensor memory, Tensor A_log,
                  Tensor dt_bias, Tensor norm_weight, double eps, double scale) {
  const char* op = "gdn_decode";
  // the memory [B, H, Dk, Dv] fixes the batch and the heads; every other shape follows from it and the projections
  check_dtype(memory, op, "memory", at::kFloat);
  TORCH_CHECK(memory.dim() == 4 && memory.numel() > 0, "infinitevl.gdn_decode: memory must be [B, H, Dk, Dv], not ",
              memory.sizes());
  const int64_t B = memory.size(0), H = memory.size(1), Dk = memory.size(2), Dv = memory.size(3);
  check_float(q, op, "q");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && k.size(-1) % Dk == 0 && k.size(-1) > 0, "infinitevl.gdn_decode: q and k",
              " must be [B, heads * Dk] with Dk=", Dk, ", got ", q.sizes(), " and ", k.sizes());
  const int64_t KVh = k.size(1) / Dk, Cq = H * Dk, Ck = KVh * Dk, Cv = KVh * Dv;
  TORCH_CHECK(H % KVh == 0, "infinitevl.gdn_decode: ", H, " heads cannot share ", KVh, " key/value heads");
  TORCH_CHECK(wq.dim() == 3 && wq.size(-1) > 0, "infinitevl.gdn_decode: wq must be [C, 1, K], not ", wq.sizes());
  const int64_t K = wq.size(-1);
  check_shape(memory, op, "memory", {B, H, Dk, Dv});
  check_shape(q, op, "q", {B, Cq});
  check_shape(k, op, "k", {B, Ck});
  check_shape(v, op, "v", {B, Cv});
  check_shape(gate, op, "gate", {B, H * Dv});
  check_shape(wq, op, "wq", {Cq, 1, K});
  check_shape(wk, op, "wk", {Ck, 1, K});
  check_shape(wv, op, "wv", {Cv, 1, K});
  check_shape(tq, op, "tail_q", {B, Cq, K - 1});
  check_shape(tk, op, "tail_k", {B, Ck, K - 1});
  check_shape(tv, op, "tail_v", {B, Cv, K - 1});
  if (project_ab) {  // a, b are the gate projections' weights [H, d], applied to x [B, d]
    TORCH_CHECK(x.dim() == 2, "infinitevl.gdn_decode: x must be [B, d], not ", x.sizes());
    check_shape(x, op, "x", {B, x.size(1)});
    check_shape(a, op, "a (weight)", {H, x.size(1)});
    check_shape(b, op, "b (weight)", {H, x.size(1)});
  } else {
    check_shape(a, op, "a", {B, H});
    check_shape(b, op, "b", {B, H});
  }
  check_shape(A_log, op, "A_log", {H});
  check_shape(dt_bias, op, "dt_bias", {H});
  check_shape(norm_weight, op, "norm_weight", {Dv});
  for (const Tensor* t : {&A_log, &dt_bias, &norm_weight}) check_float(*t, op, "A_log, dt_bias and norm_weight");
  const char* names[] = {"k", "v", "a", "b", "x", "gate", "wq", "wk", "wv"};
  int i = 0;
  for (Tensor* t : {&k, &v, &a, &b, &x, &gate, &wq, &wk, &wv}) {
    TORCH_CHECK(t->device().is_cpu(), "infinitevl.gdn_decode: ", names[i], " must be a CPU tensor");
    check_dtype(*t, op, names[i++], q.scalar_type());  // projections, x and conv weights share the activations' dtype
    *t = t->contiguous();  // read only: a strided projection output is copied
  }
  q = q.contiguous();
  check_float(tq, op, "tail_q");
  check_dtype(tk, op, "tail_k", tq.scalar_type());
  check_dtype(tv, op, "tail_v", tq.scalar_type());
  check_buffer(tq, op, "tail_q");
  check_buffer(tk, op, "tail_k");
  check_buffer(tv, op, "tail_v");
  check_buffer(memory, op, "memory");
  Tensor out;
  dispatch2(q.scalar_type(), tq.scalar_type(), [&](auto a_, auto s_) {
    using T = decltype(a_);
    using TS = decltype(s_);
    out = gdn_decode_impl<T, TS>(q, k, v, a, b, x, project_ab, gate, wq, wk, wv, tq, tk, tv, memory, A_log.contiguous(),
                                 dt_bias.contiguous(), norm_weight.contiguous(), static_cast<float>(eps),
                                 static_cast<float>(scale));
  });
  return out;
}

// ---- sliding-window attention: RoPE on q and k, attention over the ring + the token itself, ring write -------
// out[h] = q[h] . k for G query heads of width D (q row-major [G, D]): eight heads per pass over k, with eight
// independent sums, so that the loop is bound by throughput rather than by the latency of one running sum
void dots(const float* q, int64_t G, int64_t D, const float* k, float* out) {
  int64_t h = 0;
  for (; h + 8 <= G; h += 8) {
    const float* r = q + h * D;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t d = 0; d < D; ++d) {
      const float kd = k[d];
      s0 += r[d] * kd;
      s1 += r[D + d] * kd;
      s2 += r[2 * D + d] * kd;
      s3 += r[3 * D + d] * kd;
      s4 += r[4 * D + d] * kd;
      s5 += r[5 * D + d] * kd;
      s6 += r[6 * D + d] * kd;
      s7 += r[7 * D + d] * kd;
    }
    const float sums[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
    std::copy_n(sums, 8, out + h);
  }
  for (; h < G; ++h) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[h * D + d] * k[d];
    out[h] = dot;
  }
}

template <typename T>
void rope(const T* x, const T* cos, const T* sin, float* out, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* xh = x + h * D;
    for (int64_t d = 0; d < D; ++d) {
      const float rot = d < half ? -load(xh[d + half]) : load(xh[d - half]);
      // x * cos + rotate_half(x) * sin with each product stored in T, as the plain path does
      out[h * D + d] = round_to<T>(round_to<T>(load(xh[d]) * load(cos[d])) + round_to<T>(rot * load(sin[d])));
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 rings on CPUs with AVX512-BF16: q . k and p . v as bf16 pair dot products (vdpbf16ps) with fp32 sums, q and p
// rounded to bf16 first (as the plain path's bf16 matmuls round them). Needs D a multiple of 32, at most 256.
constexpr int64_t kMaxChunks = 8;

// a vector register as a std::vector element: the struct keeps the register type's alignment, which a bare
// std::vector<__m512> would drop (-Wignored-attributes)
struct RegBH {
  __m512bh v;
};
struct RegI {
  __m512i v;
};
struct RegPS {
  __m512 v;
};

bool bf16_path(int64_t D) { return D % 32 == 0 && D / 32 <= kMaxChunks; }

void score_slots_bf16(const float* qh, int64_t G, int64_t D, const BF16* K, const int64_t* spos, int64_t n,
                      float scale, float* scores) {
  const int64_t nc = D / 32;
  std::vector<RegBH> qv(G * nc);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < nc; ++c) {
      const float* src = qh + h * D + c * 32;
      qv[h * nc + c].v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
    }
  __m512bh kv[kMaxChunks];
  for (int64_t s = 0; s < n; ++s) {
    if (spos[s] < 0) {
      for (int64_t h = 0; h < G; ++h) scores[h * (n + 1) + s] = -std::numeric_limits<float>::infinity();
      continue;
    }
    for (int64_t c = 0; c < nc; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(K + s * D + c * 32);
    for (int64_t h = 0; h < G; ++h) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < nc; ++c) sum = _mm512_dpbf16_ps(sum, qv[h * nc + c].v, kv[c]);
      scores[h * (n + 1) + s] = _mm512_reduce_add_ps(sum) * scale;
    }
  }
}

// acc[h] += sum_{s < n} p[h, s] v[s]: slots taken in pairs, the two value rows interleaved so that each 32-bit lane
// holds (v[s][d], v[s+1][d]); a block of pairs is interleaved once and then read by every head
void weighted_values_bf16(const float* p, int64_t G, int64_t D, const BF16* V, const int64_t* spos, int64_t n,
                          float* acc) {
  constexpr int64_t kPairs = 32;
  const int64_t nc = D / 32, nv = 2 * nc;  // per pair: nv vectors of 16 lanes
  std::vector<RegI> block(kPairs * nv);
  std::vector<RegPS> sums(G * nv, {_mm512_setzero_ps()});  // per head, in the interleaved column order
  const __m512i zero = _mm512_setzero_si512();
  auto row = [&](int64_t s, int64_t c) {
    return s < n && spos[s] >= 0 ? _mm512_loadu_si512(V + s * D + c * 32) : zero;
  };
  __m512 part[2 * kMaxChunks];
  for (int64_t s0 = 0; s0 < n; s0 += 2 * kPairs) {
    const int64_t pairs = std::min(kPairs, (n - s0 + 1) / 2);
    for (int64_t j = 0; j < pairs; ++j)
      for (int64_t c = 0; c < nc; ++c) {
        const __m512i a = row(s0 + 2 * j, c), b = row(s0 + 2 * j + 1, c);
        block[j * nv + 2 * c].v = _mm512_unpacklo_epi16(a, b);
        block[j * nv + 2 * c + 1].v = _mm512_unpackhi_epi16(a, b);
      }
    for (int64_t h = 0; h < G; ++h) {
      const float* ph = p + h * (n + 1);
      for (int64_t e = 0; e < nv; ++e) part[e] = sums[h * nv + e].v;
      for (int64_t j = 0; j < pairs; ++j) {
        const int64_t s = s0 + 2 * j;
        const BF16 lo(ph[s]), hi(s + 1 < n ? BF16(ph[s + 1]) : BF16(0.0f));
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(lo.x | (uint32_t(hi.x) << 16)));
        for (int64_t e = 0; e < nv; ++e) part[e] = _mm512_dpbf16_ps(part[e], (__m512bh)block[j * nv + e].v, w);
      }
      for (int64_t e = 0; e < nv; ++e) sums[h * nv + e].v = part[e];
    }
  }
  // unpacklo/hi work per 128-bit lane: lo holds columns 0-3, 8-11, 16-19, 24-27 of a chunk, hi the others
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t half = 0; half < 2; ++half) {
        alignas(64) float out[16];
        _mm512_store_ps(out, sums[h * nv + 2 * c + half].v);
        for (int64_t i = 0; i < 16; ++i) acc[h * D + c * 32 + (i / 4) * 8 + half * 4 + i % 4] += out[i];
      }
}
#endif

constexpr int64_t kSlotBlock = 32;  // value rows converted to fp32 at a time (16 KB at D = 128)
constexpr int64_t kLanes = 64;      // output columns summed in registers at a time (four AVX-512 vectors)

template <typename T, typename TS>
Tensor swa_decode_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos, const Tensor& sin,
                       Tensor& ring_k, Tensor& ring_v, Tensor& ring_pos, const Tensor& past, float scale) {
  // shapes were checked by swa_decode
  const int64_t B = ring_k.size(0), KV = ring_k.size(1), cap = ring_k.size(2), D = ring_k.size(3);
  const int64_t H = q.size(1) / D, G = H / KV;
  Tensor out = at::empty({B, H * D}, q.options());
  const int64_t* pos_now = past.data_ptr<int64_t>();
  int64_t* slots = ring_pos.data_ptr<int64_t>();
  TS* RK = ring_k.data_ptr<TS>();
  TS* RV = ring_v.data_ptr<TS>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qh(G * D), kn(D), row(D), head_dots(G), scores, acc(G * D), vblock(kSlotBlock * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / KV, g = i % KV;
      const T* cb = cos.data_ptr<T>() + bi * D;
      const T* sb = sin.data_ptr<T>() + bi * D;
      rope<T>(q.data_ptr<T>() + bi * H * D + g * G * D, cb, sb, qh.data(), G, D);
      rope<T>(k.data_ptr<T>() + bi * KV * D + g * D, cb, sb, kn.data(), 1, D);
      const T* vn = v.data_ptr<T>() + bi * KV * D + g * D;
      const int64_t n = std::min(pos_now[bi], cap);  // slots [0, n) are filled once n tokens were seen
      const int64_t* spos = slots + bi * cap;
      const TS* Kb = RK + (bi * KV + g) * cap * D;
      const TS* Vb = RV + (bi * KV + g) * cap * D;
      scores.resize(G * (n + 1));  // every entry is written below
      bool bf16_dots = false;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<TS, BF16>) bf16_dots = bf16_path(D);
#endif
      if (bf16_dots) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<TS, BF16>) score_slots_bf16(qh.data(), G, D, Kb, spos, n, scale, scores.data());
#endif
        dots(qh.data(), G, D, kn.data(), head_dots.data());  // the token's own key, in fp32
        for (int64_t h = 0; h < G; ++h) scores[h * (n + 1) + n] = head_dots[h] * scale;
      } else {
        for (int64_t s = 0; s <= n; ++s) {  // s == n: the token's own key
          const bool own = s == n;
          if (!own && spos[s] < 0) {
            for (int64_t h = 0; h < G; ++h) scores[h * (n + 1) + s] = -std::numeric_limits<float>::infinity();
            continue;
          }
          if (!own) {
            const TS* kr = Kb + s * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) row[d] = load(kr[d]);
          }
          dots(qh.data(), G, D, own ? kn.data() : row.data(), head_dots.data());
          for (int64_t h = 0; h < G; ++h) scores[h * (n + 1) + s] = head_dots[h] * scale;
        }
      }
      for (int64_t h = 0; h < G; ++h) softmax(&scores[h * (n + 1)], n + 1);  // in fp32
      if (bf16_dots) {
#if defined(__AVX512BF16__)
        std::fill(acc.begin(), acc.end(), 0.0f);
        if constexpr (std::is_same_v<TS, BF16>) weighted_values_bf16(scores.data(), G, D, Vb, spos, n, acc.data());
        for (int64_t h = 0; h < G; ++h) {
          const float pn = scores[h * (n + 1) + n];
          for (int64_t d = 0; d < D; ++d) acc[h * D + d] += pn * load(vn[d]);
        }
#endif
      } else {
        // o[h] = sum_s p[h, s] v[s]: values converted a block of slots at a time, each head's sums kept in registers
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s0 = 0; s0 <= n; s0 += kSlotBlock) {
          const int64_t count = std::min(kSlotBlock, n + 1 - s0);
          for (int64_t j = 0; j < count; ++j) {
            const int64_t s = s0 + j;
            float* dst = &vblock[j * D];
            if (s == n) {
              for (int64_t d = 0; d < D; ++d) dst[d] = load(vn[d]);
            } else if (spos[s] < 0) {
              std::fill(dst, dst + D, 0.0f);  // an empty slot (its weight is 0)
            } else {
              const TS* vr = Vb + s * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) dst[d] = load(vr[d]);
            }
          }
          for (int64_t h = 0; h < G; ++h) {
            const float* p = &scores[h * (n + 1) + s0];
            for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
              const int64_t width = std::min(kLanes, D - d0);
              float sums[kLanes] = {};
              for (int64_t j = 0; j < count; ++j) {
                const float* vr = &vblock[j * D + d0];
                const float pj = p[j];
#pragma omp simd
                for (int64_t e = 0; e < kLanes; ++e) sums[e] += pj * (e < width ? vr[e] : 0.0f);
              }
              for (int64_t e = 0; e < width; ++e) acc[h * D + d0 + e] += sums[e];
            }
          }
        }
      }
      T* ob = O + bi * H * D + g * G * D;
      for (int64_t e = 0; e < G * D; ++e) ob[e] = static_cast<T>(acc[e]);
      // the token joins the ring: slot = stream position mod capacity
      const int64_t slot = pos_now[bi] % cap;
      TS* kw = RK + ((bi * KV + g) * cap + slot) * D;
      TS* vw = RV + ((bi * KV + g) * cap + slot) * D;
      for (int64_t d = 0; d < D; ++d) {
        kw[d] = static_cast<TS>(kn[d]);
        vw[d] = static_cast<TS>(load(vn[d]));
      }
    }
  });
  for (int64_t bi = 0; bi < B; ++bi) slots[bi * cap + pos_now[bi] % cap] = pos_now[bi];
  return out;
}

Tensor swa_decode(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor ring_k, Tensor ring_v,
                  Tensor ring_pos, Tensor past, double scale) {
  const char* op = "swa_decode";
  // the ring [B, KV, cap, D] fixes the batch, key/value heads, capacity and head width
  TORCH_CHECK(ring_k.dim() == 4 && ring_k.size(1) > 0 && ring_k.size(2) > 0 && ring_k.size(3) > 0 &&
                  ring_k.size(3) % 2 == 0,
              "infinitevl.swa_decode: ring_k must be [B, KV, capacity, D] with D even and no empty dimension, not ",
              ring_k.sizes());
  const int64_t B = ring_k.size(0), KV = ring_k.size(1), cap = ring_k.size(2), D = ring_k.size(3);
  check_float(q, op, "q");
  TORCH_CHECK(q.dim() == 2 && q.size(1) % (KV * D) == 0 && q.size(1) > 0, "infinitevl.swa_decode: q must be [B, H * ",
              D, "] with H a multiple of ", KV, " key/value heads, not ", q.sizes());
  const int64_t H = q.size(1) / D;
  check_shape(ring_k, op, "ring_k", {B, KV, cap, D});
  check_shape(ring_v, op, "ring_v", {B, KV, cap, D});
  check_shape(ring_pos, op, "ring_pos", {B, cap});
  check_shape(past, op, "past", {B});
  check_shape(q, op, "q", {B, H * D});
  check_shape(k, op, "k", {B, KV * D});
  check_shape(v, op, "v", {B, KV * D});
  check_shape(cos, op, "cos", {B, D});
  check_shape(sin, op, "sin", {B, D});
  const char* names[] = {"k", "v", "cos", "sin"};
  int i = 0;
  for (Tensor* t : {&k, &v, &cos, &sin}) {
    check_dtype(*t, op, names[i++], q.scalar_type());
    *t = t->contiguous();
  }
  q = q.contiguous();
  check_float(ring_k, op, "ring_k");
  check_dtype(ring_v, op, "ring_v", ring_k.scalar_type());
  check_dtype(ring_pos, op, "ring_pos", at::kLong);
  check_dtype(past, op, "past", at::kLong);
  check_buffer(ring_k, op, "ring_k");
  check_buffer(ring_v, op, "ring_v");
  check_buffer(ring_pos, op, "ring_pos");
  past = past.contiguous();
  const int64_t* seen = past.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(seen, seen + B, [](int64_t n) { return n >= 0; }),
              "infinitevl.swa_decode: past (tokens seen per stream) must not be negative");
  Tensor out;
  dispatch2(q.scalar_type(), ring_k.scalar_type(), [&](auto a_, auto s_) {
    using T = decltype(a_);
    using TS = decltype(s_);
    out = swa_decode_impl<T, TS>(q, k, v, cos, sin, ring_k, ring_v, ring_pos, past, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(infinitevl, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "gdn_decode(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor x, bool project_ab, Tensor gate, Tensor wq, Tensor wk, Tensor wv, "
      "Tensor(a!) tail_q, Tensor(b!) tail_k, Tensor(c!) tail_v, Tensor(d!) memory, Tensor A_log, Tensor dt_bias, "
      "Tensor norm_weight, float eps, float scale) -> Tensor");
  m.def(
      "swa_decode(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) ring_k, Tensor(b!) ring_v, "
      "Tensor(c!) ring_pos, Tensor past, float scale) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("features() -> str[]", &features);
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_bf16", c10::DispatchKey::CPU, &linear_bf16);
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
  m.impl("gdn_decode", c10::DispatchKey::CPU, &gdn_decode);
  m.impl("swa_decode", c10::DispatchKey::CPU, &swa_decode);
}
