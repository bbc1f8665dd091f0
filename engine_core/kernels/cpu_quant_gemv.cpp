// Quantized-weight GEMMs for few rows (the CPU decode step): int4 (Q4_1 groups) and int8 (per
// channel) weights. Built into the same extension as cpu_decode_ops.cpp (cpu_ops.py).
//
// Why: torch's packed int4 / int8 CPU kernels widen every weight to fp32 and multiply in floating
// point (one convert and one FMA per 16 weights, plus the nibble unpacking): 38 us per SmolLM2 int4
// GEMV and 2.2 ms for the 49152x576 int8 LM head, ~60 % of a single-stream decode step. Here, as
// llama.cpp does for Q4_1 x Q8_1, each call first quantizes its few activation rows to integers in
// groups of 32, then every weight row is an integer dot product -- AVX512-VNNI vpdpbusd (64
// multiply-adds an instruction), AVX2 vpmaddubsw, or a portable loop, chosen by what -march=native
// offers -- with the scales applied per group in fp32.
//
// Two int8 digits per activation: x ~= d * (q1 + q2 / 256) with d = absmax / 127 and q2 the first
// digit's rounding error in 1/256ths, i.e. ~15 bits, for one more vpdpbusd and a shift per chunk.
// One digit alone (llama.cpp's Q8_1) cost SmolLM2 +1.6 % perplexity through the int4 layers (+0.07 %
// weight-only) and flipped greedy tokens through the LM head (0.7 % logit error).
// The twins (layers/quantization.py: quantize_activations_int8_ref, int4_linear_ref,
// int8_linear_ref) compute the same sums in torch; results differ only in fp32 summation order.
//
// Weight formats (K a multiple of 64; a chunk is 64 consecutive inputs = group A (0..31), group B (32..63)):
//   int4: w = d * q + m per group of 32, q in 0..15 (GGUF Q4_1: its tensors load bit-exactly), d and
//         m fp16. One byte stream per block of 4 output rows, uint8 [N/4, 5K/2], so a thread reads
//         its weight rows as one sequential stream (measured: separate code / scale arrays of short
//         rows ran at half the streaming bandwidth). A block is segments of up to 8 chunks (nc):
//           d of rows 0-3 (2nc fp16 each), m of rows 0-3 (likewise), then per chunk the 32 code
//           bytes of rows 0-3; byte b of a row's chunk holds q[64c + b] (low nibble) and
//           q[64c + 32 + b] (high nibble), so one 32-byte load widens to the chunk's 64 codes.
//   int8: w = s * q per output row; q int8 [N, K] row-major, s [N] (torch's _weight_int8pack_mm format).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kChunk = 64;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PAGEDSERVE_VNNI512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGEDSERVE_AVX2_DOT 1
#endif

// Activation rows quantized in groups of 32: element value v = 256 * q1 + q2, x ~= d * v per group.
struct QuantActs {
  int64_t rows = 0, k = 0;
  std::vector<int8_t> q1, q2;  // [rows, k] the two digits
  std::vector<float> d;        // [rows, k/32] the group's scale of one unit of v
  std::vector<float> sum;      // [rows, k/32] sum of the group's unquantized inputs (int4's "+ m" term)
#ifdef PAGEDSERVE_VNNI512
  // Per chunk, in vpdpbusd's 16 int32 lanes (lanes 0-7 sum group A, 8-15 group B):
  std::vector<float> dlanes;   // [rows, k/64, 16] each lane's group scale
  std::vector<int32_t> ncorr;  // [rows, k/64, 16] -128 * the lane's 4 v: int8 weights are fed as
                               // w + 128 (vpdpbusd's unsigned operand), this takes the 128s back out
#endif
  const int8_t* q1row(int64_t r) const { return q1.data() + r * k; }
  const int8_t* q2row(int64_t r) const { return q2.data() + r * k; }
  const float* drow(int64_t r) const { return d.data() + r * (k / kGroup); }
  const float* sumrow(int64_t r) const { return sum.data() + r * (k / kGroup); }
};

template <typename T>
void quantize_row(const T* __restrict x, int8_t* __restrict q1, int8_t* __restrict q2, float* __restrict d,
                  float* __restrict sum, int64_t k) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const T* xg = x + g * kGroup;
    float amax = 0.f, s = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float v = static_cast<float>(xg[i]);
      amax = std::max(amax, std::fabs(v));
      s += v;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float t = static_cast<float>(xg[i]) * inv;
      const float r1 = std::nearbyint(t);
      q1[g * kGroup + i] = static_cast<int8_t>(r1);
      q2[g * kGroup + i] = static_cast<int8_t>(std::clamp(std::nearbyint((t - r1) * 256.f), -127.f, 127.f));
    }
    d[g] = amax / 127.f / 256.f;
    sum[g] = s;
  }
}

#ifdef PAGEDSERVE_VNNI512
// The same rounding, 16 inputs a vector (a K = 1536 row: ~4 us scalar, before the GEMM can start).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const double* p) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_loadu_pd(p))), _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8)), 1);
}

template <typename T>
void quantize_row_avx512(const T* __restrict x, int8_t* __restrict q1, int8_t* __restrict q2, float* __restrict d,
                         float* __restrict sum, int64_t k) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 lim = _mm512_set1_ps(127.f);
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const __m512 xv[2] = {load16(x + g * kGroup), load16(x + g * kGroup + 16)};
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(xv[0]), _mm512_abs_ps(xv[1])));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int h = 0; h < 2; ++h) {
      const __m512 t = _mm512_mul_ps(xv[h], inv);
      const __m512 r1 = _mm512_roundscale_ps(t, kNearest);
      const __m512 r2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, r1), _mm512_set1_ps(256.f)), kNearest);
      const __m512 r2c = _mm512_max_ps(_mm512_min_ps(r2, lim), _mm512_sub_ps(_mm512_setzero_ps(), lim));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + g * kGroup + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r1)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + g * kGroup + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r2c)));
    }
    d[g] = amax / 127.f / 256.f;
    sum[g] = _mm512_reduce_add_ps(_mm512_add_ps(xv[0], xv[1]));
  }
}
#endif

template <typename T>
QuantActs quantize_acts(const torch::Tensor& x) {
  QuantActs a;
  a.rows = x.size(0);
  a.k = x.size(1);
  const int64_t groups = a.k / kGroup;
  a.q1.resize(a.rows * a.k);
  a.q2.resize(a.rows * a.k);
  a.d.resize(a.rows * groups);
  a.sum.resize(a.rows * groups);
#ifdef PAGEDSERVE_VNNI512
  a.dlanes.resize(a.rows * groups * 8);
  a.ncorr.resize(a.rows * groups * 8);
#endif
  const T* xp = x.data_ptr<T>();
  const int64_t xs = x.stride(0);
  // One row is ~1 us; only prefill-sized calls are worth a parallel region.
  at::parallel_for(0, a.rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int8_t* q1 = a.q1.data() + r * a.k;
      int8_t* q2 = a.q2.data() + r * a.k;
#ifdef PAGEDSERVE_VNNI512
      const float* d = a.d.data() + r * groups;
      quantize_row_avx512(xp + r * xs, q1, q2, a.d.data() + r * groups, a.sum.data() + r * groups, a.k);
      const __m512i ones = _mm512_set1_epi8(1);
      for (int64_t c = 0; c < a.k / kChunk; ++c) {  // lanes 0-7: group 2c, 8-15: group 2c + 1
        const int64_t lane0 = (r * groups / 2 + c) * 16;
        _mm512_storeu_ps(a.dlanes.data() + lane0,
                         _mm512_insertf32x8(_mm512_set1_ps(d[2 * c]), _mm256_set1_ps(d[2 * c + 1]), 1));
        // -128 * (256 * sum of the lane's 4 q1 + sum of its 4 q2); vpdpbusd by ones sums 4 bytes a lane
        const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q1 + c * kChunk));
        const __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q2 + c * kChunk));
        _mm512_storeu_si512(a.ncorr.data() + lane0,
                            _mm512_sub_epi32(_mm512_setzero_si512(),
                                             _mm512_add_epi32(_mm512_slli_epi32(s1, 15), _mm512_slli_epi32(s2, 7))));
      }
#else
      quantize_row(xp + r * xs, q1, q2, a.d.data() + r * groups, a.sum.data() + r * groups, a.k);
#endif
    }
  });
  return a;
}

// The int4 block layout (see the header): where row j (0-3) of a block finds its codes and scales.
struct Int4Block {
  const uint8_t* base;  // the block's first byte
  int64_t chunks;
  static constexpr int64_t kSegChunks = 8;
  static int64_t bytes(int64_t k) { return k / kChunk * 160; }  // 4 rows x (32 code + 8 scale) bytes per chunk
  int64_t seg_chunks(int64_t s) const { return std::min(kSegChunks, chunks - s * kSegChunks); }
  const uint8_t* seg(int64_t s) const { return base + s * kSegChunks * 160; }
  const c10::Half* d(int64_t s, int64_t j) const {
    return reinterpret_cast<const c10::Half*>(seg(s) + j * 4 * seg_chunks(s));
  }
  const c10::Half* m(int64_t s, int64_t j) const {
    return reinterpret_cast<const c10::Half*>(seg(s) + (16 + j * 4) * seg_chunks(s));
  }
  const uint8_t* codes(int64_t c, int64_t j) const {  // chunk c (global), row j
    const int64_t s = c / kSegChunks;
    return seg(s) + 32 * seg_chunks(s) + (c % kSegChunks) * 128 + j * 32;
  }
};

// ---------------------------------------------------------------- inner loops
// A tile is NR weight rows x R activation rows; out[j * R + i] = weight row n + j . activation row r0 + i.

#if defined(PAGEDSERVE_VNNI512)

// NR * R independent accumulators keep the FMA and vpdpbusd pipelines busy (one row alone is a
// chain of dependent FMAs, latency-bound), and each activation chunk is loaded once for NR weight rows.
//
// int4: per chunk, 3 ops widen a weight row's 64 codes; per activation row one vpdpbusd per digit
// then the group scales (d * the activation's d, one vector op) and the fp32 accumulate. The d of 8
// chunks come in one load and are spread to each chunk's lanes by a permute; "+ m * sum(x)" is a
// separate short dot over the groups.
template <int NR, int R>
void int4_tile(const uint8_t* __restrict packed, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t chunks = a.k / kChunk;
  const Int4Block blk{packed + n / 4 * Int4Block::bytes(a.k), chunks};
  const int64_t j0 = n % 4;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i lanes0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), two = _mm512_set1_epi32(2);
  __m512 acc[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s * Int4Block::kSegChunks < chunks; ++s) {
    const int64_t nc = blk.seg_chunks(s), c0 = s * Int4Block::kSegChunks;
    const __mmask16 gmask = static_cast<__mmask16>((1u << (2 * nc)) - 1);  // the segment's groups
    __m512 dv[NR];
    for (int j = 0; j < NR; ++j) {
      dv[j] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, blk.d(s, j0 + j)));
      // + m * sum(x) over the segment's groups
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, blk.m(s, j0 + j)));
      for (int i = 0; i < R; ++i) {
        acc[j][i] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(gmask, a.sumrow(r0 + i) + 2 * c0), acc[j][i]);
      }
    }
    __m512i lanes = lanes0;
    for (int64_t c = c0; c < c0 + nc; ++c, lanes = _mm512_add_epi32(lanes, two)) {
      __m512i x1[R], x2[R];
      __m512 xd[R];
      for (int i = 0; i < R; ++i) {
        x1[i] = _mm512_loadu_si512(a.q1row(r0 + i) + c * kChunk);
        x2[i] = _mm512_loadu_si512(a.q2row(r0 + i) + c * kChunk);
        xd[i] = _mm512_loadu_ps(a.dlanes.data() + ((r0 + i) * chunks + c) * 16);
      }
      for (int j = 0; j < NR; ++j) {
        __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.codes(c, j0 + j))));
        w = _mm512_and_si512(_mm512_mask_srli_epi16(w, 0xFFFF0000u, w, 4), nib);  // bytes 32..63: high nibbles
        const __m512 dw = _mm512_permutexvar_ps(lanes, dv[j]);
        for (int i = 0; i < R; ++i) {
          const __m512i hi = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x1[i]), 8);
          const __m512i dot = _mm512_dpbusd_epi32(hi, w, x2[i]);
          acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, xd[i]), acc[j][i]);
        }
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) out[j * R + i] = _mm512_reduce_add_ps(acc[j][i]);
}

// int8: w + 128 is vpdpbusd's unsigned operand; the activation row's -128 * sum(v) lanes start the
// second digit's accumulator, so each chunk's int32 lanes are exact sums of v * w.
template <int NR, int R>
void int8_tile(const int8_t* __restrict w8, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t chunks = a.k / kChunk;
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i x1[R], x2[R], corr[R];
    __m512 xd[R];
    for (int i = 0; i < R; ++i) {
      const int64_t lane0 = ((r0 + i) * chunks + c) * 16;
      x1[i] = _mm512_loadu_si512(a.q1row(r0 + i) + c * kChunk);
      x2[i] = _mm512_loadu_si512(a.q2row(r0 + i) + c * kChunk);
      corr[i] = _mm512_loadu_si512(a.ncorr.data() + lane0);
      xd[i] = _mm512_loadu_ps(a.dlanes.data() + lane0);
    }
    for (int j = 0; j < NR; ++j) {
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w8 + (n + j) * a.k + c * kChunk), c128);
      for (int i = 0; i < R; ++i) {
        const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, x1[i]), 8),
                                             _mm512_dpbusd_epi32(corr[i], wu, x2[i]));
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xd[i], acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) out[j * R + i] = _mm512_reduce_add_ps(acc[j][i]);
}

#elif defined(PAGEDSERVE_AVX2_DOT)
// One weight row at a time (NR loops), 8 int32 lanes per group of 32.

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 32 products of unsigned a (<= 127) and signed b summed into 8 int32 lanes (no saturation: 2*127*127 < 2^15).
inline __m256i dot_u8s8(__m256i a, __m256i b) { return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)); }
inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// sum of v * w over a group of 32, w unsigned (int4 codes)
inline __m256i group_dot_u(__m256i w, const int8_t* q1, const int8_t* q2) {
  return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(w, load32(q1)), 8), dot_u8s8(w, load32(q2)));
}
// the same with w signed (int8): |x| * (w with x's sign) = x * w, with the unsigned operand vpmaddubsw wants
inline __m256i group_dot_s(__m256i w, const int8_t* q1, const int8_t* q2) {
  const __m256i x1 = load32(q1), x2 = load32(q2);
  return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(_mm256_abs_epi8(x1), _mm256_sign_epi8(w, x1)), 8),
                          dot_u8s8(_mm256_abs_epi8(x2), _mm256_sign_epi8(w, x2)));
}

template <int NR, int R>
void int4_tile(const uint8_t* __restrict packed, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t chunks = a.k / kChunk;
  const Int4Block blk{packed + n / 4 * Int4Block::bytes(a.k), chunks};
  const __m256i nib = _mm256_set1_epi8(0x0F);
  for (int j = 0; j < NR; ++j) {
    const int64_t jj = n % 4 + j;
    __m256 acc[R];
    float msum[R] = {};
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t s = c / Int4Block::kSegChunks, g = 2 * (c % Int4Block::kSegChunks);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.codes(c, jj)));
      const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
      const float da = static_cast<float>(blk.d(s, jj)[g]), db = static_cast<float>(blk.d(s, jj)[g + 1]);
      const float ma = static_cast<float>(blk.m(s, jj)[g]), mb = static_cast<float>(blk.m(s, jj)[g + 1]);
      for (int i = 0; i < R; ++i) {
        const int64_t r = r0 + i, e = c * kChunk;
        const int8_t* q2 = a.q2row(r) + e;
        const float* xd = a.drow(r) + 2 * c;
        const float* xs = a.sumrow(r) + 2 * c;
        const __m256i pa = group_dot_u(lo, a.q1row(r) + e, q2);
        const __m256i pb = group_dot_u(hi, a.q1row(r) + e + 32, q2 + 32);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), _mm256_set1_ps(da * xd[0]), acc[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), _mm256_set1_ps(db * xd[1]), acc[i]);
        msum[i] += ma * xs[0] + mb * xs[1];
      }
    }
    for (int i = 0; i < R; ++i) out[j * R + i] = hsum256(acc[i]) + msum[i];
  }
}

template <int NR, int R>
void int8_tile(const int8_t* __restrict w8, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t groups = a.k / kGroup;
  for (int j = 0; j < NR; ++j) {
    const int8_t* wj = w8 + (n + j) * a.k;
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i w = load32(wj + g * kGroup);
      for (int i = 0; i < R; ++i) {
        const int64_t r = r0 + i, e = g * kGroup;
        const __m256i p = group_dot_s(w, a.q1row(r) + e, a.q2row(r) + e);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a.drow(r)[g]), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) out[j * R + i] = hsum256(acc[i]);
  }
}

#else
// Portable loops (what the compiler makes of them).

inline int32_t act_value(const QuantActs& a, int64_t r, int64_t e) { return 256 * a.q1row(r)[e] + a.q2row(r)[e]; }

template <int NR, int R>
void int4_tile(const uint8_t* __restrict packed, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t chunks = a.k / kChunk;
  const Int4Block blk{packed + n / 4 * Int4Block::bytes(a.k), chunks};
  for (int j = 0; j < NR; ++j) {
    const int64_t jj = n % 4 + j;
    for (int i = 0; i < R; ++i) {
      const int64_t r = r0 + i;
      float acc = 0.f;
      for (int64_t g = 0; g < a.k / kGroup; ++g) {
        const int64_t c = g / 2, s = c / Int4Block::kSegChunks, gs = g - 2 * s * Int4Block::kSegChunks;
        const uint8_t* cb = blk.codes(c, jj);
        int32_t dot = 0;
        for (int64_t b = 0; b < 32; ++b) {
          const int32_t code = g % 2 == 0 ? cb[b] & 0xF : cb[b] >> 4;
          dot += code * act_value(a, r, g * kGroup + b);
        }
        acc += static_cast<float>(blk.d(s, jj)[gs]) * a.drow(r)[g] * static_cast<float>(dot) +
               static_cast<float>(blk.m(s, jj)[gs]) * a.sumrow(r)[g];
      }
      out[j * R + i] = acc;
    }
  }
}

template <int NR, int R>
void int8_tile(const int8_t* __restrict w8, const QuantActs& a, int64_t n, int64_t r0, float* out) {
  const int64_t groups = a.k / kGroup;
  for (int j = 0; j < NR; ++j) {
    const int8_t* wj = w8 + (n + j) * a.k;
    for (int i = 0; i < R; ++i) {
      const int64_t r = r0 + i;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t s = 0;
        for (int64_t e = g * kGroup; e < (g + 1) * kGroup; ++e) s += static_cast<int32_t>(wj[e]) * act_value(a, r, e);
        acc += a.drow(r)[g] * static_cast<float>(s);
      }
      out[j * R + i] = acc;
    }
  }
}

#endif

// ---------------------------------------------------------------- drivers

// out[r, n] for all rows by tile(NR, R, n, r, res[NR * R]), activation rows in tiles of 2.
template <int NR, typename T, typename Tile>
void run_tiles(const QuantActs& a, int64_t n_out, int64_t n, T* out, Tile& tile) {
  float res[NR * 2];
  int64_t r = 0;
  for (; r + 2 <= a.rows; r += 2) {
    tile(std::integral_constant<int, NR>{}, std::integral_constant<int, 2>{}, n, r, res);
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < 2; ++i) out[(r + i) * n_out + n + j] = static_cast<T>(res[j * 2 + i]);
  }
  if (r < a.rows) {
    tile(std::integral_constant<int, NR>{}, std::integral_constant<int, 1>{}, n, r, res);
    for (int j = 0; j < NR; ++j) out[r * n_out + n + j] = static_cast<T>(res[j]);
  }
}

// Prefetches [p, p + bytes) into L1. A decode step streams each weight from DRAM once, and the
// rows of a tile are short (288 bytes for K = 576), too short for the hardware prefetcher to ramp
// up on: without this the GEMVs ran at ~55 % of the core's streaming bandwidth.
inline void prefetch(const void* p, int64_t bytes) {
#if defined(__x86_64__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// Weight rows split across threads in blocks of 4 (each weight row's bytes are read from memory
// once); prefetch(n, rows) asks for the weight bytes of rows [n, n + rows) a few blocks ahead.
template <typename T, typename Tile, typename Prefetch>
void for_tiles(const QuantActs& a, int64_t n_out, T* out, Tile&& tile, Prefetch&& prefetch_rows) {
  constexpr int64_t kBlock = 4, kAhead = 4;  // blocks ahead: 4.6-12 KB in flight per core (swept 0-16)
  // >= 4 blocks (16 weight rows) per task: a task is then >= ~5 us (a parallel region costs a few).
  at::parallel_for(0, (n_out + kBlock - 1) / kBlock, 4, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(b1 * kBlock, n_out);
    int64_t n = b0 * kBlock;
    prefetch_rows(n, std::min(kAhead * kBlock, end - n));
    for (; n + kBlock <= end; n += kBlock) {
      const int64_t ahead = n + kAhead * kBlock;
      if (ahead < end) prefetch_rows(ahead, std::min(kBlock, end - ahead));
      run_tiles<kBlock>(a, n_out, n, out, tile);
    }
    for (; n < end; ++n) run_tiles<1>(a, n_out, n, out, tile);
  });
}

void check_acts(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, K] with contiguous rows");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs, the weight ", k);
  TORCH_CHECK(k % kChunk == 0, "K must be a multiple of ", kChunk, ", got ", k);
}

// x [M, K] (fp32 / bf16 / fp16) @ dequant(packed).T -> [M, N] in x's dtype; packed [N/4, 5K/2] uint8.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) % 160 == 0,
              "packed must be contiguous uint8 [N/4, 5K/2] with K a multiple of 64");
  const int64_t n_out = packed.size(0) * 4, k = packed.size(1) / 160 * kChunk;
  check_acts(x, k);
  auto out = torch::empty({x.size(0), n_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_linear", [&] {
    const QuantActs a = quantize_acts<scalar_t>(x);
    const uint8_t* pp = packed.data_ptr<uint8_t>();
    const int64_t block_bytes = Int4Block::bytes(k);
    for_tiles(
        a, n_out, out.data_ptr<scalar_t>(),
        [&](auto nr, auto rr, int64_t n, int64_t r, float* res) {
          int4_tile<decltype(nr)::value, decltype(rr)::value>(pp, a, n, r, res);
        },
        [&](int64_t n, int64_t rows) { prefetch(pp + n / 4 * block_bytes, (rows + 3) / 4 * block_bytes); });
  });
  return out;
}

// dequant(packed) -> [N, K] bf16: the weight of a many-row (prefill) call's dense GEMM, per call
// (~1 ms a SmolLM2 layer through torch ops; this streams the packed bytes once).
torch::Tensor int4_dequantize(torch::Tensor packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) % 160 == 0,
              "packed must be contiguous uint8 [N/4, 5K/2] with K a multiple of 64");
  const int64_t blocks = packed.size(0), k = packed.size(1) / 160 * kChunk, chunks = k / kChunk;
  auto out = torch::empty({blocks * 4, k}, packed.options().dtype(at::kBFloat16));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Int4Block blk{pp + b * Int4Block::bytes(k), chunks};
      for (int64_t j = 0; j < 4; ++j) {
        c10::BFloat16* row = op + (b * 4 + j) * k;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t s = c / Int4Block::kSegChunks, g = 2 * (c % Int4Block::kSegChunks);
          const uint8_t* cb = blk.codes(c, j);
          for (int64_t h = 0; h < 2; ++h) {  // the chunk's two groups: low nibbles, high nibbles
            const float d = static_cast<float>(blk.d(s, j)[g + h]), m = static_cast<float>(blk.m(s, j)[g + h]);
            for (int64_t e = 0; e < 32; ++e) {
              const int32_t q = h == 0 ? cb[e] & 0xF : cb[e] >> 4;
              row[c * kChunk + h * 32 + e] = static_cast<c10::BFloat16>(static_cast<float>(q) * d + m);
            }
          }
        }
      }
    }
  });
  return out;
}

// x [M, K] @ (q * s[:, None]).T -> [M, N] in x's dtype.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 [N, K]");
  const int64_t n_out = q.size(0), k = q.size(1);
  check_acts(x, k);
  TORCH_CHECK(s.dim() == 1 && s.size(0) == n_out, "scales must be [N]");
  const torch::Tensor sf = s.to(at::kFloat).contiguous();
  auto out = torch::empty({x.size(0), n_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    const QuantActs a = quantize_acts<scalar_t>(x);
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = sf.data_ptr<float>();
    for_tiles(
        a, n_out, out.data_ptr<scalar_t>(),
        [&](auto nr, auto rr, int64_t n, int64_t r, float* res) {
          constexpr int NR = decltype(nr)::value, R = decltype(rr)::value;
          int8_tile<NR, R>(qp, a, n, r, res);
          for (int j = 0; j < NR; ++j)
            for (int i = 0; i < R; ++i) res[j * R + i] *= sp[n + j];
        },
        [&](int64_t n, int64_t rows) { prefetch(qp + n * k, rows * k); });
  });
  return out;
}

}  // namespace

// The pybind module lives in cpu_decode_ops.cpp; these are its entry points.
torch::Tensor pagedserve_int4_linear(torch::Tensor x, torch::Tensor packed) {
  return int4_linear(std::move(x), std::move(packed));
}
torch::Tensor pagedserve_int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  return int8_linear(std::move(x), std::move(q), std::move(s));
}
torch::Tensor pagedserve_int4_dequantize(torch::Tensor packed) { return int4_dequantize(std::move(packed)); }
const char* pagedserve_quant_dot_isa() {
#if defined(PAGEDSERVE_VNNI512)
  return "avx512-vnni";
#elif defined(PAGEDSERVE_AVX2_DOT)
  return "avx2";
#else
  return "portable";
#endif
}
