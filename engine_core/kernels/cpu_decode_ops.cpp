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
// Arithmetic follows the twins: fp32 statistics/accumulation, values rounded to the tensor dtype where
// torch rounds them. Built with -ffp-contract=off so a*b-c*d is not fused into an FMA (the rotary
// and the KV-cache write are bit-identical to the torch twins; reductions differ only in order).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;  // independent partial sums: vectorizable without reassociating

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

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

// Rows per parallel task for row-wise ops: one row is a few microseconds, so only big prefill
// chunks are split across threads (a parallel region costs more than a decode row).
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---------------------------------------------------------------- RMSNorm

// out = weight * T(s * rsqrt(mean(s^2) + eps)) with s = x (+ residual) in fp32; residual <- T(s).
template <typename T>
void rms_norm_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, T* residual, int64_t res_stride,
                   const T* weight, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> s(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      if (residual != nullptr) {
        T* rr = residual + r * res_stride;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = f32(xr[i]) + f32(rr[i]);
          rr[i] = static_cast<T>(s[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) s[i] = f32(xr[i]);
      }
      const float inv = 1.f / std::sqrt(sum_squares(s.data(), n) / static_cast<float>(n) + eps);
      T* o = out + r * out_stride;
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(f32(weight[i]) * f32(static_cast<T>(s[i] * inv)));
    }
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
    h[i] = static_cast<T>(a);
    h[i + half] = static_cast<T>(b);
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
    at::parallel_for(0, ntok, row_grain((hq + 2 * hkv) * head_dim), [&](int64_t begin, int64_t end) {
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

// One query row per (row, head) task; row r attends to its first lens[r] cached tokens, found
// through block_tables[r] (K/V read in place, no gather copy). Scores, softmax and the weighted sum
// in fp32; the output rounded to q's dtype.
template <typename T>
void decode_attention_rows(T* out, const T* q, const T* kc, const T* vc, const int32_t* bt, int64_t bt_stride,
                           const int32_t* lens, int64_t rows, int64_t hq, int64_t hkv, int64_t d,
                           int64_t block_size, int64_t num_blocks, float scale) {
  const int64_t group = hq / hkv;
  const int64_t row_kv = hkv * d;
  at::parallel_for(0, rows * hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(d), acc(d), p;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / hq, h = task % hq, kvh = h / group;
      const int64_t len = lens[r];
      TORCH_CHECK(len >= 1 && (len + block_size - 1) / block_size <= bt_stride, "row length ", len,
                  " outside its block table");
      const T* qh = q + (r * hq + h) * d;
      for (int64_t i = 0; i < d; ++i) qf[i] = f32(qh[i]) * scale;
      p.resize(len);
      float mx = -std::numeric_limits<float>::infinity();
      const int32_t* table = bt + r * bt_stride;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t blk = table[t / block_size];
        TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id ", blk, " outside the KV cache");
        const T* kt = kc + (blk * block_size + t % block_size) * row_kv + kvh * d;
        p[t] = dot(qf.data(), kt, d);
        mx = std::max(mx, p[t]);
      }
      float denom = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        p[t] = std::exp(p[t] - mx);
        denom += p[t];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t blk = table[t / block_size];
        const T* vt = vc + (blk * block_size + t % block_size) * row_kv + kvh * d;
        const float w = p[t];
        for (int64_t i = 0; i < d; ++i) acc[i] += w * f32(vt[i]);
      }
      T* o = out + (r * hq + h) * d;
      const float inv = 1.f / denom;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(acc[i] * inv);
    }
  });
}

// q [R, Hq, D]; kv_cache [2, num_blocks, block_size, Hkv, D] (q's dtype); block_tables [R, M] int32
// (row r's table); lens [R] int32 (row r's context, >= 1). Returns [R, Hq, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                     torch::Tensor lens, double scale) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [rows, Hq, D]");
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
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    const int64_t half = kv_cache.numel() / 2;
    decode_attention_rows<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), kc, kc + half,
                                    block_tables.data_ptr<int32_t>(), block_tables.stride(0), lens.data_ptr<int32_t>(),
                                    q.size(0), hq, hkv, q.size(2), kv_cache.size(2), kv_cache.size(1),
                                    static_cast<float>(scale));
  });
  return out;
}

// ---------------------------------------------------------------- SiLU and multiply

// x [rows, 2n] = [gate | up] -> T(T(silu(gate)) * up): F.silu rounds to T, then the product does.
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [rows, 2n] with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = xp + r * xs;
        const scalar_t* u = g + n;
        scalar_t* o = op + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const float gv = f32(g[i]);
          const scalar_t s = static_cast<scalar_t>(gv / (1.f + std::exp(-gv)));
          o[i] = static_cast<scalar_t>(f32(s) * f32(u[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of [rows, hidden] (new tensor)");
  m.def("fused_add_rms_norm_", &fused_add_rms_norm_, "residual += x; x = RMSNorm(residual), in place");
  m.def("rotary_qk_cache_", &rotary_qk_cache_, "rotate q, k in place; write k, v into their KV-cache slots");
  m.def("paged_decode_attention", &paged_decode_attention, "one-query-row attention over the paged KV cache");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [rows, 2n]");
}
