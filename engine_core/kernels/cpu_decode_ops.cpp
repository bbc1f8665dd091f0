// C++ kernels for the CPU decode step (engine_core/kernels/cpu_ops.py builds and loads them).
//
// Why: a single-stream CPU decode step of SmolLM2 is ~1,000 small eager torch ops (RMSNorm, rotary,
// casts, the K/V gather, SDPA) around 120 weight GEMVs, and each op costs 2-5 us of dispatch and
// allocation -- about half the step. Each function here replaces one chain of them with one call:
//   rms_norm / fused_add_rms_norm_   ~10 ops  -> 1   (torch twin: layers/layernorm.py rms_norm_ref)
//   rotary_qk_cache_                 ~15 ops  -> 1   (twins: layers/rotary.py apply_rotary_ref +
//                                                     layers/attention.py write_kv_cache_ref)
//   paged_decode_attention           gather + mask + SDPA -> 1, reading K/V in place through the
//                                     block table (twin: the row-batched branch of paged_attention_ref)
//   silu_and_mul                     3 ops    -> 1   (twin: layers/activation.py silu_and_mul_ref)
// The quantized-weight GEMMs (int4_linear, int8_linear) are in cpu_quant_gemv.cpp.
// Arithmetic follows the twins: fp32 statistics/accumulation, values rounded to the tensor dtype where
// torch rounds them. Built with -ffp-contract=off so a*b-c*d is not fused into an FMA (the rotary
// and the KV-cache write are bit-identical to the torch twins; reductions differ only in order).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;  // independent partial sums: vectorizable without reassociating

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

// float -> T, rounded to nearest even as torch rounds. The bf16 case is written branch-free
// (c10::BFloat16's constructor tests for NaN with a branch, which keeps loops from vectorizing).
template <typename T>
inline T to(float v) { return static_cast<T>(v); }

template <>
inline c10::BFloat16 to<c10::BFloat16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] += a[i + j] * f32(b[i + j]);
  float s = 0.f;
  for (int64_t j = 0; j < LANES; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * f32(b[i]);
  return s;
}

inline float sum_lanes(const float* a, int64_t n) {
  float acc[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] += a[i + j];
  float s = 0.f;
  for (int64_t j = 0; j < LANES; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i];
  return s;
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float sum_squares(const float* a, int64_t n) {
  float acc[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] += a[i + j] * a[i + j];
  float s = 0.f;
  for (int64_t j = 0; j < LANES; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * a[i];
  return s;
}

// exp(x) as a branch-free polynomial (Cephes expf: Cody-Waite range reduction, degree-6 polynomial,
// ~1 ulp) so loops over it vectorize (with -fno-trapping-math); libm's expf is a scalar call
// (~7 ns). Below -87 it returns 0 and above 80 it saturates at e^80: no intermediate here or in a
// caller's 1 / (1 + exp(-x)) becomes subnormal, which costs a microcode assist per element
// (a SiLU whose vectorized branches divided into subnormals ran 12x slower).
inline float exp_approx(float x) {
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 80.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// Rows per parallel task for row-wise ops: one row is a few microseconds, so only big prefill
// chunks are split across threads (a parallel region costs more than a decode row).
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---------------------------------------------------------------- RMSNorm

// out = weight * T(s * rsqrt(mean(s^2) + eps)) with s = x (+ residual) in fp32; residual <- T(s).
// The row bodies are functions with __restrict pointers, not code inside the parallel_for lambda:
// through the lambda's by-reference captures gcc assumes a store may change the loop bounds and
// does not vectorize (measured: SiLU 8x slower than torch's).
template <typename T>
void rms_norm_row(T* out, const T* x, T* residual, const T* __restrict weight, float* __restrict s, int64_t n,
                  float eps) {
  if (residual != nullptr) {
    for (int64_t i = 0; i < n; ++i) s[i] = f32(x[i]) + f32(residual[i]);
    for (int64_t i = 0; i < n; ++i) residual[i] = to<T>(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) s[i] = f32(x[i]);
  }
  const float inv = 1.f / std::sqrt(sum_squares(s, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = to<T>(f32(weight[i]) * f32(to<T>(s[i] * inv)));
}

template <typename T>
void rms_norm_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, T* residual, int64_t res_stride,
                   const T* weight, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [=](int64_t begin, int64_t end) {
    std::vector<float> s(n);
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(out + r * out_stride, x + r * x_stride, residual ? residual + r * res_stride : nullptr, weight,
                   s.data(), n, eps);
  });
}

void check_norm_args(const torch::Tensor& x, const torch::Tensor& weight) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1), "weight must be [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must have one dtype");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_norm_args(x, weight);
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0), nullptr,
                            0, weight.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

// In place, as vLLM's fused_add_rms_norm: residual <- x + residual, x <- norm(x + residual).
void fused_add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.stride(1) == 1 && residual.scalar_type() == x.scalar_type(),
              "residual must match x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm_", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                            residual.data_ptr<scalar_t>(), residual.stride(0), weight.data_ptr<scalar_t>(),
                            x.size(0), x.size(1), static_cast<float>(eps));
  });
}

// ---------------------------------------------------------------- rotary + KV-cache write

// NeoX-style rotation of the first rot channels of each head (halves rotated against each other),
// in fp32 from the fp32 cos|sin row, rounded back to T: apply_rotary_ref's arithmetic.
template <typename T>
inline void rotate_head(T* h, const float* cos_sin, int64_t rot) {
  const int64_t half = rot / 2;
  const float* cs = cos_sin;
  const float* sn = cos_sin + half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = f32(h[i]), x2 = f32(h[i + half]);
    const float a = x1 * cs[i] - x2 * sn[i];
    const float b = x2 * cs[i] + x1 * sn[i];
    h[i] = to<T>(a);
    h[i + half] = to<T>(b);
  }
}

// q [T, Hq*D], k/v [T, Hkv*D] (rows may be views into one qkv buffer): q and k rotated in place at
// their positions; then, if kv_cache is non-empty, k and v copied into their slots of
// kv_cache [2, num_blocks, block_size, Hkv, D] (same dtype; slots >= 0, CPU steps are never padded).
void rotary_qk_cache_(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor positions,
                      torch::Tensor cos_sin_cache, int64_t head_dim, torch::Tensor kv_cache, torch::Tensor slots) {
  for (auto* t : {&q, &k, &v}) {
    check_cpu(*t, "q/k/v");
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->scalar_type() == q.scalar_type(),
                "q, k, v must be [tokens, heads*head_dim] with contiguous rows and one dtype");
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous(), "cos_sin_cache must be fp32");
  const int64_t ntok = q.size(0), rot = cos_sin_cache.size(1);
  TORCH_CHECK(k.size(0) == ntok && v.size(0) == ntok && positions.numel() == ntok, "token counts differ");
  TORCH_CHECK(rot % 2 == 0 && rot <= head_dim, "rotary dim must be even and <= head_dim");
  const int64_t hq = q.size(1) / head_dim, hkv = k.size(1) / head_dim;
  const bool write = kv_cache.numel() > 0;
  if (write) {
    TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type() && kv_cache.is_contiguous() && kv_cache.dim() == 5 &&
                    kv_cache.size(3) == hkv && kv_cache.size(4) == head_dim,
                "kv_cache must be [2, blocks, block_size, Hkv, D] in q's dtype");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == ntok, "slot_mapping must be int64 [tokens]");
  }
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cs = cos_sin_cache.data_ptr<float>();
  const int64_t max_pos = cos_sin_cache.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_qk_cache_", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t row_kv = hkv * head_dim;
    const int64_t slots_total = write ? kv_cache.size(1) * kv_cache.size(2) : 0;
    scalar_t* kc = write ? kv_cache.data_ptr<scalar_t>() : nullptr;
    scalar_t* vc = write ? kc + slots_total * row_kv : nullptr;
    const int64_t* sl = write ? slots.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, ntok, row_grain((hq + 2 * hkv) * head_dim), [=](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " outside the rotary cache");
        const float* row = cs + pos[t] * rot;
        for (int64_t h = 0; h < hq; ++h) rotate_head(qp + t * q.stride(0) + h * head_dim, row, rot);
        scalar_t* kt = kp + t * k.stride(0);
        for (int64_t h = 0; h < hkv; ++h) rotate_head(kt + h * head_dim, row, rot);
        if (write) {
          TORCH_CHECK(sl[t] >= 0 && sl[t] < slots_total, "slot ", sl[t], " outside the KV cache");
          std::copy(kt, kt + row_kv, kc + sl[t] * row_kv);
          const scalar_t* vt = vp + t * v.stride(0);
          std::copy(vt, vt + row_kv, vc + sl[t] * row_kv);
        }
      }
    });
  });
}

// ---------------------------------------------------------------- paged decode attention

// One task per (row, KV head): the query heads that share the KV head read each K/V row once
// (widened to fp32 once, then one dot per head). Row r attends to its first lens[r] cached tokens,
// found through block_tables[r] (K/V read in place, no gather copy). Scores, softmax and the
// weighted sum in fp32; the output rounded to q's dtype.
struct DecodeGeometry {
  int64_t hq, hkv, d, block_size, num_blocks, bt_stride;
  float scale;
};

// The row's length fits its block table and every block id it reads is in the cache.
inline void check_table(const int32_t* table, int64_t len, const DecodeGeometry& g) {
  TORCH_CHECK(len >= 1 && (len + g.block_size - 1) / g.block_size <= g.bt_stride, "row length ", len,
              " outside its block table");
  for (int64_t b = 0; b * g.block_size < len; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < g.num_blocks, "block id ", table[b], " outside the KV cache");
}

// Scratch: qf [group*d], acc [group*d], row [d], p [group*len].
template <typename T>
void attend_kv_head(T* __restrict out, const T* __restrict q, const T* kc, const T* vc, const int32_t* table,
                    int64_t len, int64_t kvh, DecodeGeometry g, float* __restrict qf, float* __restrict acc,
                    float* __restrict row, float* __restrict p) {
  const int64_t group = g.hq / g.hkv, d = g.d, bs = g.block_size, row_kv = g.hkv * d;
  for (int64_t i = 0; i < group * d; ++i) qf[i] = f32(q[i]) * g.scale;
  for (int64_t b = 0, t = 0; t < len; ++b) {  // block by block: no integer division per token
    const T* kb = kc + static_cast<int64_t>(table[b]) * bs * row_kv + kvh * d;
    for (const int64_t stop = std::min(len, t + bs); t < stop; ++t, kb += row_kv) {
      for (int64_t i = 0; i < d; ++i) row[i] = f32(kb[i]);
      for (int64_t j = 0; j < group; ++j) p[j * len + t] = dot(qf + j * d, row, d);
    }
  }
  for (int64_t i = 0; i < group * d; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < group; ++j) {
    float* pj = p + j * len;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) mx = std::max(mx, pj[t]);
    for (int64_t t = 0; t < len; ++t) pj[t] = exp_approx(pj[t] - mx);
    const float denom = sum_lanes(pj, len);
    for (int64_t t = 0; t < len; ++t) pj[t] /= denom;
  }
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const T* vb = vc + static_cast<int64_t>(table[b]) * bs * row_kv + kvh * d;
    for (const int64_t stop = std::min(len, t + bs); t < stop; ++t, vb += row_kv) {
      for (int64_t i = 0; i < d; ++i) row[i] = f32(vb[i]);
      for (int64_t j = 0; j < group; ++j) axpy(acc + j * d, p[j * len + t], row, d);
    }
  }
  for (int64_t i = 0; i < group * d; ++i) out[i] = to<T>(acc[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
// AVX512-BF16 path for bf16 caches (compiled where -march=native has the instructions): q.k and
// p.v as vdpbf16ps dot products (bf16 pairs multiplied exactly, summed in fp32), 16 tokens' scores
// reduced together. 1.7-1.8x the portable path on a 2-core Sapphire Rapids (S = 300-1000).
#define PAGEDSERVE_AVX512BF16 1
// r[t] = sum of the 16 lanes of v[t], t = 0..15: a 4-level shuffle tree (46 ops for 16 tokens)
// instead of one horizontal reduction per token.
inline __m512 transpose_sum16(__m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  // lane 4k+m holds token 4m+k
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(idx, r);
}

// Scratch p: [G * len] floats.
template <int D, int G>
void attend_kv_head_avx512bf16(c10::BFloat16* out, const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
                       const int32_t* table, int64_t len, int64_t kvh, DecodeGeometry g, float* p) {
  constexpr int C = D / 32;  // 512-bit registers per K/V row (32 bf16 each)
  const int64_t bs = g.block_size, row_kv = g.hkv * D;
  float inv[G];
  for (int j = 0; j < G; ++j) {  // scores and softmax, one head at a time (its q in registers)
    __m512bh qv[C];
    for (int c = 0; c < C; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + j * D + 32 * c);
    float* pj = p + j * len;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t blk = 0, off = 0;
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      __m512 acc[16];
      const int64_t n = std::min<int64_t>(16, len - t0);
      for (int64_t u = 0; u < 16; ++u) {
        acc[u] = _mm512_setzero_ps();
        if (u < n) {
          const c10::BFloat16* kt = kc + (static_cast<int64_t>(table[blk]) * bs + off) * row_kv + kvh * D;
          for (int c = 0; c < C; ++c) acc[u] = _mm512_dpbf16_ps(acc[u], qv[c], (__m512bh)_mm512_loadu_si512(kt + 32 * c));
          if (++off == bs) { off = 0; ++blk; }
        }
      }
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1);
      const __m512 s = _mm512_mul_ps(transpose_sum16(acc), _mm512_set1_ps(g.scale));
      _mm512_mask_storeu_ps(pj + t0, m, s);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, s);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    for (int64_t t = 0; t < len; ++t) pj[t] = exp_approx(pj[t] - mx);
    inv[j] = 1.f / sum_lanes(pj, len);
  }
  // values: two tokens at a time, their V rows interleaved channel by channel so one vdpbf16ps
  // adds p_t * v_t + p_t+1 * v_t+1 (probabilities rounded to bf16 for the product, as torch's
  // bf16 flash attention does); every head reads the same interleaved rows.
  __m512 acc[G][2 * C];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < 2 * C; ++c) acc[j][c] = _mm512_setzero_ps();
  int64_t blk = 0, off = 0;
  auto next_row = [&]() {
    const c10::BFloat16* r = vc + (static_cast<int64_t>(table[blk]) * bs + off) * row_kv + kvh * D;
    if (++off == bs) { off = 0; ++blk; }
    return r;
  };
  for (int64_t t = 0; t < len; t += 2) {
    const c10::BFloat16* v0 = next_row();
    const bool pair = t + 1 < len;
    const c10::BFloat16* v1 = pair ? next_row() : v0;
    __m512i lo[C], hi[C];
    for (int c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
      const __m512i b = pair ? _mm512_loadu_si512(v1 + 32 * c) : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(a, b);
      hi[c] = _mm512_unpackhi_epi16(a, b);
    }
    for (int j = 0; j < G; ++j) {
      const float p0 = p[j * len + t], p1 = pair ? p[j * len + t + 1] : 0.f;
      const uint32_t w = static_cast<uint32_t>(to<c10::BFloat16>(p0).x) | (static_cast<uint32_t>(to<c10::BFloat16>(p1).x) << 16);
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w));
      for (int c = 0; c < C; ++c) {
        acc[j][2 * c] = _mm512_dpbf16_ps(acc[j][2 * c], wv, (__m512bh)lo[c]);
        acc[j][2 * c + 1] = _mm512_dpbf16_ps(acc[j][2 * c + 1], wv, (__m512bh)hi[c]);
      }
    }
  }
  // unpacklo of 128-bit block k holds channels 8k..8k+3, unpackhi 8k+4..8k+7
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < C; ++c) {
      alignas(64) float l[16], h[16];
      _mm512_store_ps(l, _mm512_mul_ps(acc[j][2 * c], _mm512_set1_ps(inv[j])));
      _mm512_store_ps(h, _mm512_mul_ps(acc[j][2 * c + 1], _mm512_set1_ps(inv[j])));
      c10::BFloat16* o = out + j * D + 32 * c;
      for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 4; ++i) {
          o[8 * k + i] = to<c10::BFloat16>(l[4 * k + i]);
          o[8 * k + 4 + i] = to<c10::BFloat16>(h[4 * k + i]);
        }
    }
}

// G (query heads per KV head) and D as compile-time constants keep the accumulators in registers.
template <int D>
bool attend_avx512bf16(c10::BFloat16* out, const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
                       const int32_t* table, int64_t len, int64_t kvh, DecodeGeometry g, float* p) {
  switch (g.hq / g.hkv) {
    case 1: attend_kv_head_avx512bf16<D, 1>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 2: attend_kv_head_avx512bf16<D, 2>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 3: attend_kv_head_avx512bf16<D, 3>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 4: attend_kv_head_avx512bf16<D, 4>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 5: attend_kv_head_avx512bf16<D, 5>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 6: attend_kv_head_avx512bf16<D, 6>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 7: attend_kv_head_avx512bf16<D, 7>(out, q, kc, vc, table, len, kvh, g, p); return true;
    case 8: attend_kv_head_avx512bf16<D, 8>(out, q, kc, vc, table, len, kvh, g, p); return true;
    default: return false;
  }
}
#endif

template <typename T>
void decode_attention_rows(T* out, const T* q, int64_t q_row_stride, const T* kc, const T* vc, const int32_t* bt,
                           const int32_t* lens, int64_t rows, DecodeGeometry g) {
  const int64_t group = g.hq / g.hkv;
  at::parallel_for(0, rows * g.hkv, 1, [=](int64_t begin, int64_t end) {
    int64_t max_len = 0;
    for (int64_t task = begin; task < end; ++task) max_len = std::max<int64_t>(max_len, lens[task / g.hkv]);
    std::vector<float> qf(group * g.d), acc(group * g.d), row(g.d), p(group * std::max<int64_t>(max_len, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / g.hkv, kvh = task % g.hkv, head0 = r * g.hq + kvh * group;
      const T* qh = q + r * q_row_stride + kvh * group * g.d;  // this KV head's query heads, adjacent
      const int32_t* table = bt + r * g.bt_stride;
      check_table(table, lens[r], g);
#ifdef PAGEDSERVE_AVX512BF16
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (g.d == 64 && attend_avx512bf16<64>(out + head0 * g.d, qh, kc, vc, table, lens[r], kvh, g, p.data()))
          continue;
        if (g.d == 128 && attend_avx512bf16<128>(out + head0 * g.d, qh, kc, vc, table, lens[r], kvh, g, p.data()))
          continue;
      }
#endif
      attend_kv_head(out + head0 * g.d, qh, kc, vc, table, lens[r], kvh, g, qf.data(), acc.data(),
                     row.data(), p.data());
    }
  });
}

// q [R, Hq, D]; kv_cache [2, num_blocks, block_size, Hkv, D] (q's dtype); block_tables [R, M] int32
// (row r's table); lens [R] int32 (row r's context, >= 1). Returns [R, Hq, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                     torch::Tensor lens, double scale) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be [rows, Hq, D] with contiguous rows (a row stride is fine: qkv views)");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.scalar_type() == q.scalar_type() &&
                  kv_cache.size(4) == q.size(2),
              "kv_cache must be [2, blocks, block_size, Hkv, D] in q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == q.size(0),
              "block_tables must be int32 [rows, max_blocks]");
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.is_contiguous() && lens.numel() == q.size(0),
              "lens must be int32 [rows]");
  const int64_t hq = q.size(1), hkv = kv_cache.size(3);
  TORCH_CHECK(hq % hkv == 0, "query heads must be a multiple of KV heads");
  auto out = torch::empty({q.size(0), hq, q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    const int64_t half = kv_cache.numel() / 2;
    const DecodeGeometry g{hq, hkv, q.size(2), kv_cache.size(2), kv_cache.size(1), block_tables.stride(0),
                           static_cast<float>(scale)};
    decode_attention_rows<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), q.stride(0), kc, kc + half,
                                    block_tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), q.size(0), g);
  });
  return out;
}

// ---------------------------------------------------------------- SiLU and multiply

// T(T(silu(g)) * u): F.silu rounds to T, then the product does.
template <typename T>
void silu_mul_row(const T* __restrict g, const T* __restrict u, T* __restrict o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = f32(g[i]);
    const float s = f32(to<T>(gv * (1.f / (1.f + exp_approx(-gv)))));
    o[i] = to<T>(s * f32(u[i]));
  }
}

// x [rows, 2n] = [gate | up] -> [rows, n].
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [rows, 2n] with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, rows, row_grain(2 * n), [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_mul_row(xp + r * xs, xp + r * xs + n, op + r * n, n);
      }
    });
  });
  return out;
}

}  // namespace

// cpu_quant_gemv.cpp
torch::Tensor pagedserve_int4_linear(torch::Tensor x, torch::Tensor packed);
torch::Tensor pagedserve_int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s);
torch::Tensor pagedserve_int4_dequantize(torch::Tensor packed);
const char* pagedserve_quant_dot_isa();

namespace {

// ---------------------------------------------------------------- a whole decoder layer

// A projection's weights as the quantized GEMMs take them: int4 {packed} or int8 {qweight, scales}.
torch::Tensor project(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  TORCH_CHECK(w.size() == 1 || w.size() == 2, "a projection is {int4 packed} or {int8 qweight, scales}");
  return w.size() == 1 ? pagedserve_int4_linear(x, w[0]) : pagedserve_int8_linear(x, w[0], w[1]);
}

// LlamaDecoderLayer.forward of a decode step with int4 / int8 weights as one call: the kernels of
// models/cpu_decode_layer.py decode_layer in the same order on the same tensors (bit-identical),
// without the ~20 us of Python and ~8 Python->C++ calls around them per layer (~0.6 ms a token of
// a ~12 ms SmolLM2 step). Returns (hidden, residual) as the module does.
std::tuple<torch::Tensor, torch::Tensor> llama_decode_layer(
    torch::Tensor hidden, c10::optional<torch::Tensor> residual, torch::Tensor ln1, torch::Tensor ln2, double eps,
    const std::vector<torch::Tensor>& qkv_w, const std::vector<torch::Tensor>& o_w,
    const std::vector<torch::Tensor>& gate_up_w, const std::vector<torch::Tensor>& down_w, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, torch::Tensor positions, torch::Tensor cos_sin_cache,
    torch::Tensor kv_cache, torch::Tensor slots, torch::Tensor block_tables, torch::Tensor lens, double scale) {
  torch::Tensor h, res;
  if (residual.has_value()) {
    res = *residual;
    fused_add_rms_norm_(hidden, res, ln1, eps);
    h = hidden;
  } else {
    res = hidden;
    h = rms_norm(hidden, ln1, eps);
  }
  const torch::Tensor qkv = project(h, qkv_w);
  const int64_t qs = num_heads * head_dim, kvs = num_kv_heads * head_dim;
  TORCH_CHECK(qkv.size(1) == qs + 2 * kvs, "qkv width ", qkv.size(1), " is not q + k + v");
  const torch::Tensor q = qkv.narrow(1, 0, qs), k = qkv.narrow(1, qs, kvs), v = qkv.narrow(1, qs + kvs, kvs);
  rotary_qk_cache_(q, k, v, positions, cos_sin_cache, head_dim, kv_cache, slots);
  const torch::Tensor rows = lens.size(0) == q.size(0) ? q : q.narrow(0, 0, lens.size(0));
  const torch::Tensor o = paged_decode_attention(rows.view({rows.size(0), num_heads, head_dim}), kv_cache,
                                                 block_tables, lens, scale);
  torch::Tensor a = project(o.view({o.size(0), qs}), o_w);
  fused_add_rms_norm_(a, res, ln2, eps);
  return {project(silu_and_mul(project(a, gate_up_w)), down_w), res};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of [rows, hidden] (new tensor)");
  m.def("fused_add_rms_norm_", &fused_add_rms_norm_, "residual += x; x = RMSNorm(residual), in place");
  m.def("rotary_qk_cache_", &rotary_qk_cache_, "rotate q, k in place; write k, v into their KV-cache slots");
  m.def("paged_decode_attention", &paged_decode_attention, "one-query-row attention over the paged KV cache");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [rows, 2n]");
  m.def("int4_linear", &pagedserve_int4_linear, "x @ int4 (Q4_1 groups) weight.T, integer activations");
  m.def("int8_linear", &pagedserve_int8_linear, "x @ int8 (per channel) weight.T, integer activations");
  m.def("int4_dequantize", &pagedserve_int4_dequantize, "the int4 stream's weight as bf16 [N, K]");
  m.def("quant_dot_isa", &pagedserve_quant_dot_isa, "which integer dot product the quantized GEMMs use");
  m.def("llama_decode_layer", &llama_decode_layer, "a Llama decoder layer's decode step on int4 / int8 weights");
}
