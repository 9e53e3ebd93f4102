// Inner loops of the dsv4 kernels, compiled once per instruction set into namespace dsv4::DSV4_ISA
// (isa_generic.cc: the compiler's baseline; isa_avx2.cc: -mavx2 -mfma -mf16c, explicit intrinsics below;
// isa_avx512bf16.cc: the AVX2 loops plus vdpbf16ps pair dot products for FP4, BF16 and FP8 weights; isa_amx.cc: that
// plus AMX tile products for 5+ rows).
// Only raw pointers, libc/libm and intrinsics here: no std:: templates or inline library helpers whose
// out-of-line copies the linker could share between the two builds (see kernels.h). No include guard: each
// isa_*.cc includes it once, with its own DSV4_ISA.
//
// Weights are decoded on the fly, never materialised: decode is weight-bandwidth bound, so a GEMV reads the
// packed bytes once, turns them into fp32 in registers (FP8 e4m3 -> fp16 bits -> vcvtph2ps; FP4 e2m1 nibbles ->
// pshufb lookups of the bf16 bytes -> unpacks with zeros; BF16 -> a mask or a shift; all exact) and multiplies.
// Up to 4 token rows share one decode (5-6 rows: two passes; BF16 weights: 5-8 rows in blocks of 4 x 3). More
// rows (prefill, busy experts) decode up to 64 weight rows once into an fp32 tile and run a 4x2 register-blocked
// dot-product kernel over it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace dsv4 {
namespace DSV4_ISA {
namespace {

inline int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }

template <int N>
struct Count {
  static constexpr int value = N;
};

// f(Count<R>{}, m0) for rows [0, rows) in groups of 4 from row m0 (R = the group's 1-4 rows): a kernel's template
// row count from a runtime one.
template <class F>
inline void in_fours(int64_t rows, F&& f) {
  for (int64_t m0 = 0; m0 < rows; m0 += 4) switch (lo(4, rows - m0)) {
      case 1: f(Count<1>{}, m0); break;
      case 2: f(Count<2>{}, m0); break;
      case 3: f(Count<3>{}, m0); break;
      default: f(Count<4>{}, m0); break;
    }
}

// Decoded value of every FP8 e4m3fn byte (0x7f / 0xff are NaN) and every FP4 e2m1 nibble.
struct Tables {
  float fp8[256];
  float fp4[16];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int e = (b >> 3) & 15, m = b & 7;
      float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);  // subnormal m/8 2^-6
      if ((b & 0x7f) == 0x7f) v = NAN;
      fp8[b] = (b & 0x80) ? -v : v;
    }
    const float mag[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (int c = 0; c < 16; ++c) fp4[c] = (c & 8) ? -mag[c & 7] : mag[c & 7];
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// A per-thread growable buffer (64-byte aligned). Tasks run one at a time per thread.
template <class T>
struct ThreadBuffer {
  T* p = nullptr;
  int64_t cap = 0;
  ~ThreadBuffer() { free(p); }
  T* get(int64_t n) {
    if (n > cap) {
      free(p);
      size_t bytes = ((size_t)n * sizeof(T) + 63) / 64 * 64;
      p = (T*)aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      cap = n;
    }
    return p;
  }
};
thread_local ThreadBuffer<float> tl_row, tl_tile;  // decoded weight rows / tiles
thread_local ThreadBuffer<float> tl_dots;          // indexer dot products [heads][8 entries]
thread_local ThreadBuffer<int64_t> tl_offsets;     // where each attention block's picks start

// ---- weight scales ------------------------------------------------------------------------------------------
thread_local ThreadBuffer<float> tl_scales;  // a weight row's scales widened from e8m0

// ops.cc's e8m0_value (KV-row scales) with 0xFF as NaN; not shared: kernels.h says why
inline float e8m0_value(uint8_t e) { return e == 0xFF ? NAN : ldexpf(1.f, (int)e - 127); }

// e8m0 bytes -> floats 2^(e-127): the byte is the float's exponent field (codes 1-254); 0 is the subnormal 2^-127
// and 0xFF NaN, both patched in.
inline void widen_e8m0(const uint8_t* e, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i zero = _mm256_setzero_si256(), nan_code = _mm256_set1_epi32(0xFF);
  const __m256i tiny = _mm256_set1_epi32(0x00400000), nan = _mm256_set1_epi32(0x7FC00000);
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(e + i)));
    __m256i bits = _mm256_slli_epi32(v, 23);
    bits = _mm256_blendv_epi8(bits, tiny, _mm256_cmpeq_epi32(v, zero));
    bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(v, nan_code));
    _mm256_storeu_si256((__m256i*)(out + i), bits);
  }
#endif
  for (; i < n; ++i) out[i] = e8m0_value(e[i]);
}

// The scales of a weight's rows as floats, for one pass over them: row j's are its 128-row block's ceil(K/128)
// (FP8) or its own K/32 (FP4). Float scales are read where they are; e8m0 bytes are widened into a per-thread
// buffer, once per FP8 block (its 128 rows share them) and 16 FP4 rows at a time (a row has as few as 4: the
// vector widening needs runs of 8). Made once per loop over the rows, outside it: a thread_local costs a call to
// reach from a shared library. At most one per thread at a time (they share the buffer).
class RowScales {
 public:
  static constexpr int64_t kFp4Rows = 16;
  explicit RowScales(const QuantWeight& w)
      : w_(w),
        n_(w.format == kFp8 ? (w.k + 127) / 128 : w.k / 32),
        buf_(w.scale_e8m0 ? tl_scales.get(w.format == kFp8 ? n_ : kFp4Rows * n_) : nullptr) {}
  const float* operator()(int64_t j) {
    const bool fp8 = w_.format == kFp8;
    if (!buf_) return w_.scale + (fp8 ? (j / 128) * n_ : j * n_);
    if (fp8) {
      if (j / 128 != first_) {
        first_ = j / 128;
        widen_e8m0(w_.scale_e8m0 + first_ * n_, buf_, n_);
      }
      return buf_;
    }
    if (first_ < 0 || j < first_ || j >= first_ + kFp4Rows) {
      first_ = j;
      widen_e8m0(w_.scale_e8m0 + j * n_, buf_, lo(kFp4Rows, w_.n - j) * n_);
    }
    return buf_ + (j - first_) * n_;
  }

 private:
  const QuantWeight& w_;
  const int64_t n_;
  float* const buf_;
  int64_t first_ = -1;  // the FP8 block / first FP4 row widened in buf_
};

// ---- scalar pieces (both builds) ---------------------------------------------------------------------------
inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) {  // bfloat16 bits -> float, exact
  const uint32_t u = (uint32_t)bf16 << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// W row j, scaled, in kernel order (fp4: per 32-block the low nibbles, then the high ones) -> out [K].
[[maybe_unused]] void decode_row_scalar(const QuantWeight& w, RowScales& scales, int64_t j, float* out) {
  const Tables& t = tables();
  const int64_t K = w.k;
  if (w.format == kFp8) {
    const uint8_t* row = (const uint8_t*)w.data + j * K;
    const float* srow = scales(j);
    for (int64_t k = 0; k < K; ++k) out[k] = t.fp8[row[k]] * srow[k / 128];
  } else if (w.format == kFp4) {
    const uint8_t* row = (const uint8_t*)w.data + j * (K / 2);
    const float* srow = scales(j);
    for (int64_t b = 0; b < K / 32; ++b) {
      const float s = srow[b];
      for (int i = 0; i < 16; ++i) {
        out[b * 32 + i] = t.fp4[row[b * 16 + i] & 15] * s;
        out[b * 32 + 16 + i] = t.fp4[row[b * 16 + i] >> 4] * s;
      }
    }
  } else if (w.format == kBf16) {
    const uint16_t* row = (const uint16_t*)w.data + j * K;
    for (int64_t k = 0; k < K; ++k) out[k] = widen(row[k]);
  } else {
    memcpy(out, (const float*)w.data + j * K, (size_t)K * sizeof(float));
  }
}

#if !defined(__AVX2__)
// b: float, or bf16 bits (cache rows) widened as they are read
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorisable without reassociation
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * widen(b[k + i]);
  float r = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; k < n; ++k) r += a[k] * widen(b[k]);
  return r;
}

void linear_impl(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  const int64_t K = w.k;
  float* buf = tl_row.get(K);
  RowScales scales(w);
  for (int64_t j = n0; j < n1; ++j) {
    const float* wr = buf;
    if (w.format == kF32)
      wr = (const float*)w.data + j * K;
    else
      decode_row_scalar(w, scales, j, buf);
    for (int64_t m = 0; m < rows; ++m) y[m * ldy + j] = dot(x + m * ldx, wr, K);
  }
}

// G heads against one kv row.
template <int G, typename T>
void dot_heads(const float* q, int64_t d, const T* row, float* out) {
  for (int g = 0; g < G; ++g) out[g] = dot(q + g * d, row, d);
}

// l[j][g] = q[g] . rows[j] for the n listed rows.
template <int G, typename T>
void logits_heads(const float* q, int64_t d, const T* const* rows, int64_t n, float* l) {
  for (int64_t j = 0; j < n; ++j) dot_heads<G>(q, d, rows[j], l + j * G);
}

// out[g] = sum_j p[j][g] rows[j] for G heads.
template <int G, typename T>
void weighted_rows(float* out, int64_t d, const T* const* rows, const float* p, int64_t n) {
  for (int64_t i = 0; i < G * d; ++i) out[i] = 0.f;
  for (int64_t j = 0; j < n; ++j)
    for (int g = 0; g < G; ++g)
      for (int64_t k = 0; k < d; ++k) out[g * d + k] += p[j * G + g] * widen(rows[j][k]);
}

#else  // ---- AVX2 + FMA + F16C ---------------------------------------------------------------------------------

// 8 consecutive weights as fp32: float as is; bf16 zero-extended to 32 bits and shifted into the upper half.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// b: float, or bf16 bits (cache rows) widened as they are loaded
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), load8(b + k + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), load8(b + k + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), load8(b + k + 24), s3);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
  float r = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; k < n; ++k) r += a[k] * widen(b[k]);
  return r;
}

// 16 e4m3 bytes -> 2 x 8 floats equal to value / 256: the 7 low bits shifted into an fp16 (exponent bias 15
// instead of 7, subnormals included) and the sign moved to bit 15; the caller folds the 256 into the scale.
// (The NaN codes 0x7f / 0xff come out as +-480 here; quantised weights never hold them.)
inline void decode_fp8_16(const uint8_t* p, __m256& a, __m256& b) {
  __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));  // sign-extended: 0xFF80 | low7
  v = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBF80));
  a = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
  b = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
}

// 16 packed e2m1 bytes (32 values) -> 4 x 8 floats, exact, in kernel order: low nibbles of bytes 0-7, of 8-15,
// high nibbles of bytes 0-7, of 8-15. Every e2m1 value is an fp16 whose low byte is 0, so a pshufb table of high
// bytes gives the fp16 bits.
inline void decode_fp4_32(const uint8_t* p, __m256 v[4]) {
  const __m128i lut = _mm_setr_epi8(0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, (char)0x80, (char)0xB8,
                                    (char)0xBC, (char)0xBE, (char)0xC0, (char)0xC2, (char)0xC4, (char)0xC6);
  const __m128i nib = _mm_set1_epi8(0x0F), zero = _mm_setzero_si128();
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, nib));
  const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), nib));
  v[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, lo));
  v[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, lo));
  v[2] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, hi));
  v[3] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, hi));
}

// W row j, scaled, in kernel order -> out [K] (vector decode; scalar for a ragged FP8 tail).
void decode_row(const QuantWeight& w, RowScales& scales, int64_t j, float* out) {
  const int64_t K = w.k;
  if (w.format == kFp8) {
    const float* t8 = tables().fp8;
    const uint8_t* row = (const uint8_t*)w.data + j * K;
    const float* srow = scales(j);
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      const int64_t k1 = lo(K, k0 + 128);
      const float s = srow[k0 / 128];
      const __m256 s256 = _mm256_set1_ps(s * 256.f);
      int64_t k = k0;
      for (; k + 16 <= k1; k += 16) {
        __m256 a, b;
        decode_fp8_16(row + k, a, b);
        _mm256_storeu_ps(out + k, _mm256_mul_ps(a, s256));
        _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(b, s256));
      }
      for (; k < k1; ++k) out[k] = t8[row[k]] * s;
    }
  } else if (w.format == kFp4) {
    const uint8_t* row = (const uint8_t*)w.data + j * (K / 2);
    const float* srow = scales(j);
    for (int64_t b = 0; b < K / 32; ++b) {
      __m256 v[4];
      decode_fp4_32(row + b * 16, v);
      const __m256 s = _mm256_set1_ps(srow[b]);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * 32 + 8 * i, _mm256_mul_ps(v[i], s));
    }
  } else if (w.format == kBf16) {
    const uint16_t* row = (const uint16_t*)w.data + j * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, load8(row + k));
    for (; k < K; ++k) out[k] = widen(row[k]);
  } else {
    memcpy(out, (const float*)w.data + j * K, (size_t)K * sizeof(float));
  }
}

// A weight row a few rows ahead of the one being read: a job reads short runs of rows (an expert's slice, a small
// matrix) from memory, too short for the hardware prefetcher to ramp up on. Into L1 for a kernel of 1-2 x rows,
// into L2 for more: M x rows fill L1 (8 bf16 rows of 1024 are 16 KB, 4 fp32 rows the same), and weight lines
// pulled into it ahead of use evicted them, so the x loads missed. mini-1b's LM head at 8 rows (Zen 4, 2 threads):
// 18.1 ms with L1 prefetches, 16.2 with none, 7.9 with L2 prefetches; a batch-1 decode step with L2 prefetches
// everywhere was 2 % slower (16.69 vs 16.39 ms).
constexpr int64_t kPrefetchRows = 4;
template <int M>
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + b, M <= 2 ? _MM_HINT_T0 : _MM_HINT_T1);
}

// FP4 row j + kFp4PrefetchRows (packed values and scales), if it is one of this job's rows. Further ahead than
// the other formats' rows: an expert's rows are short (K/2 bytes) and read once per token from memory
// (mini-1b, batch 1: 4 rows ahead 30.48 ms per step, 8 rows 29.62, 16 rows 29.16; batch 8 the same).
constexpr int64_t kFp4PrefetchRows = 16;
template <int M>
inline void prefetch_fp4_ahead(const QuantWeight& w, int64_t j, int64_t n1) {
  if (j + kFp4PrefetchRows >= n1) return;
  const int64_t K = w.k, ahead = j + kFp4PrefetchRows;
  prefetch<M>((const uint8_t*)w.data + ahead * (K / 2), K / 2);
  if (w.scale_e8m0)
    prefetch<M>(w.scale_e8m0 + ahead * (K / 32), K / 32);
  else
    prefetch<M>(w.scale + ahead * (K / 32), K / 32 * (int64_t)sizeof(float));
}

// ---- fused decode + dot for M <= 4 token rows: every decoded weight vector meets all M rows ---------------
// A independent accumulators per row hide the FMA latency (A = 4 for M <= 2, else 2).
template <int M, int A>
void fused_fp8(const QuantWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const float* t8 = tables().fp8;
  const int64_t K = w.k, kblocks = (K + 127) / 128;
  RowScales scales(w);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = (const uint8_t*)w.data + j * K;
    const float* srow = scales(j);
    if (j + kPrefetchRows < n1) prefetch<M>(row + kPrefetchRows * K, K);
    __m256 acc[M];
    float tail[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), tail[m] = 0.f;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = kb * 128, k1 = lo(K, k0 + 128);
      __m256 t[M][A];
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) t[m][a] = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 8 * A <= k1; k += 8 * A) {
        __m256 v[A];
        for (int a = 0; a < A; a += 2) decode_fp8_16(row + k + 8 * a, v[a], v[a + 1]);
        for (int m = 0; m < M; ++m)
          for (int a = 0; a < A; ++a)
            t[m][a] = _mm256_fmadd_ps(v[a], _mm256_loadu_ps(x + m * ldx + k + 8 * a), t[m][a]);
      }
      for (; k + 16 <= k1; k += 16) {  // A = 4 and a block of 16 left over (ragged last block)
        __m256 v0, v1;
        decode_fp8_16(row + k, v0, v1);
        for (int m = 0; m < M; ++m) {
          t[m][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * ldx + k), t[m][0]);
          t[m][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + m * ldx + k + 8), t[m][1]);
        }
      }
      const float s = srow[kb];
      for (; k < k1; ++k)
        for (int m = 0; m < M; ++m) tail[m] += x[m * ldx + k] * (t8[row[k]] * s);
      const __m256 s256 = _mm256_set1_ps(s * 256.f);
      for (int m = 0; m < M; ++m) {
        __m256 sum = t[m][0];
        for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, t[m][a]);
        acc[m] = _mm256_fmadd_ps(sum, s256, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + j] = hsum(acc[m]) + tail[m];
  }
}

// 16 packed e2m1 bytes (32 values) -> 4 x 8 floats, exact, without fp16 conversions: the bytes in both 128-bit
// lanes, lane 1 shifted right by 4, give the 32 nibbles (low ones in lane 0, high ones in lane 1); two pshufb
// tables give each value's bf16 high and low bytes, and two unpacks with zero bytes / words make them floats.
// The lanes order them (fp4 order positions, kernels.h): v[i] = [4i .. 4i + 3 | 16 + 4i .. 16 + 4i + 3].
// 1.4x decode_fp4_32's speed on Zen 3 (one x row against 512 weight rows of 1024 in L2, one core: 15.2 vs 10.6
// GMAC/s), whose 4 vcvtph2ps and their unpacks wait on the same shuffle units.
inline void decode_fp4_lanes(const uint8_t* p, __m256 v[4]) {
  const __m256i high = _mm256_setr_epi8(  // bf16 bits >> 8 of the 16 codes, both lanes
      0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, (char)0x80, (char)0xBF, (char)0xBF, (char)0xBF, (char)0xC0,
      (char)0xC0, (char)0xC0, (char)0xC0, 0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, (char)0x80, (char)0xBF,
      (char)0xBF, (char)0xBF, (char)0xC0, (char)0xC0, (char)0xC0, (char)0xC0);
  const __m256i low = _mm256_setr_epi8(  // bf16 bits & 0xFF
      0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x40, (char)0x80, (char)0xC0, 0x00, 0x00, (char)0x80, (char)0xC0,
      0x00, 0x40, (char)0x80, (char)0xC0, 0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x40, (char)0x80, (char)0xC0,
      0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x40, (char)0x80, (char)0xC0);
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                         _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_shuffle_epi8(high, codes), lo8 = _mm256_shuffle_epi8(low, codes);
  const __m256i w0 = _mm256_unpacklo_epi8(lo8, hi), w1 = _mm256_unpackhi_epi8(lo8, hi), zero = _mm256_setzero_si256();
  v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0));
  v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0));
  v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1));
  v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1));
}

thread_local ThreadBuffer<float> tl_xlanes;  // x rows in decode_fp4_lanes' order

// x rows (fp4 order) -> decode_fp4_lanes' order: per 32-block, 8-float vectors [4i .. +3 | 16 + 4i .. +3]
inline void x_fp4_lanes(const float* x, int64_t ldx, int64_t rows, int64_t K, float* out) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t b = 0; b < K; b += 32) {
      const float* xb = x + m * ldx + b;
      float* o = out + m * K + b;
      for (int h = 0; h < 2; ++h) {  // positions 8h .. 8h + 7 and 16 + 8h .. 16 + 8h + 7 -> vectors 2h, 2h + 1
        const __m256 a = _mm256_loadu_ps(xb + 8 * h), c = _mm256_loadu_ps(xb + 16 + 8 * h);
        _mm256_storeu_ps(o + 16 * h, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(o + 16 * h + 8, _mm256_permute2f128_ps(a, c, 0x31));
      }
    }
}

// M <= 2 rows sum each block's 32 products unscaled and add the sum times the block's scale (one multiply per
// block and row instead of one per 8 weights); more rows scale the 4 weight vectors once for all rows. Two sums
// per row in every case (blocks, or vectors, in turn).
template <int M>
void fused_fp4(const QuantWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.k, nblk = K / 32;
  float* xl = tl_xlanes.get(M * K);
  x_fp4_lanes(x, ldx, M, K, xl);
  RowScales scales(w);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = (const uint8_t*)w.data + j * (K / 2);
    const float* srow = scales(j);
    prefetch_fp4_ahead<M>(w, j, n1);
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b) {
      __m256 v[4];
      decode_fp4_lanes(row + b * 16, v);
      const __m256 s = _mm256_set1_ps(srow[b]);
      const float* xb = xl + b * 32;
      if (M <= 2) {
        for (int m = 0; m < M; ++m) {
          const float* xm = xb + m * K;
          __m256 t0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xm)), t1 = _mm256_mul_ps(v[1], _mm256_loadu_ps(xm + 8));
          t0 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xm + 16), t0);
          t1 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xm + 24), t1);
          acc[m][b & 1] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), s, acc[m][b & 1]);
        }
      } else {
        for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(v[i], s);  // value * scale, as the reference decodes
        for (int m = 0; m < M; ++m)
          for (int i = 0; i < 4; ++i)
            acc[m][i & 1] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + m * K + 8 * i), acc[m][i & 1]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + j] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

// Unquantised weights (float, or bf16 widened in registers), 8 per load.
template <int M, int A, typename T>
void fused_plain(const QuantWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.k;
  for (int64_t j = n0; j < n1; ++j) {
    const T* row = (const T*)w.data + j * K;
    __m256 acc[M][A];
    float tail[M];
    for (int m = 0; m < M; ++m) {
      tail[m] = 0.f;
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * A <= K; k += 8 * A)
      for (int a = 0; a < A; ++a) {
        const __m256 v = load8(row + k + 8 * a);
        for (int m = 0; m < M; ++m) acc[m][a] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * ldx + k + 8 * a), acc[m][a]);
      }
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += x[m * ldx + k] * widen(row[k]);
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      y[m * ldy + j] = hsum(sum) + tail[m];
    }
  }
}

// ---- BF16 weights against 5-8 x rows, two weights per dword: a 16-value chunk of a weight row is one 256-bit
// load; its odd elements are the dwords' upper halves (an AND with 0xFFFF0000), its even ones the same AND on the
// load one element earlier (a shift for a row's first chunk, whose earlier element is not the row's). The x rows
// are reordered to match once per call: per 16 values, the 8 even ones, then the 8 odd ones. One AND per 8
// weights where load8 spends a widening move and a shift, and no decoded fp32 tile.
thread_local ThreadBuffer<float> tl_xpairs;  // x rows in even / odd order

inline void x_even_odd(const float* x, int64_t ldx, int64_t rows, int64_t K, float* out) {  // K % 16 == 0
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 a = _mm256_loadu_ps(x + m * ldx + k), b = _mm256_loadu_ps(x + m * ldx + k + 8);
      // shuffle_ps picks within 128-bit lanes (a0 a2 b0 b2 | a4 a6 b4 b6); the 64-bit permute orders the lanes
      const __m256d even = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88));
      const __m256d odd = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD));
      _mm256_storeu_ps(out + m * K + k, _mm256_castpd_ps(_mm256_permute4x64_pd(even, 0xD8)));
      _mm256_storeu_ps(out + m * K + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(odd, 0xD8)));
    }
}

inline __m256 bf16_upper(const uint16_t* p) {  // the odd elements of p[0..16) as floats
  return _mm256_and_ps(_mm256_loadu_ps((const float*)p), _mm256_castsi256_ps(_mm256_set1_epi32((int)0xFFFF0000)));
}
inline __m256 bf16_lower(const uint16_t* p) {  // the even elements, by a shift
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)p), 16));
}

// y[r][j + c] for R x rows (xp, even / odd order, stride K) and C weight rows from row j. With few sums in flight
// the even and odd halves keep separate ones, so a sum waits on one FMA per chunk, not two.
template <int R, int C>
void bf16_pairs_block(const float* xp, int64_t K, const uint16_t* w, int64_t j, float* y, int64_t ldy) {
  constexpr int S = R * C <= 6 ? 2 : 1;
  const uint16_t* row[C];
  for (int c = 0; c < C; ++c) row[c] = w + (j + c) * K;
  __m256 acc[R][C][S];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < S; ++s) acc[r][c][s] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m256 v[C];
    for (int c = 0; c < C; ++c) v[c] = k ? bf16_upper(row[c] + k - 1) : bf16_lower(row[c]);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xp + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c][0] = _mm256_fmadd_ps(xv, v[c], acc[r][c][0]);
    }
    for (int c = 0; c < C; ++c) v[c] = bf16_upper(row[c] + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xp + r * K + k + 8);
      for (int c = 0; c < C; ++c) acc[r][c][S - 1] = _mm256_fmadd_ps(xv, v[c], acc[r][c][S - 1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      y[r * ldy + j + c] = hsum(S == 2 ? _mm256_add_ps(acc[r][c][0], acc[r][c][1]) : acc[r][c][0]);
}

template <int R>
void bf16_pairs_rows(const float* xp, int64_t K, const uint16_t* w, int64_t j, int64_t c, float* y, int64_t ldy) {
  switch (c) {
    case 1: return bf16_pairs_block<R, 1>(xp, K, w, j, y, ldy);
    case 2: return bf16_pairs_block<R, 2>(xp, K, w, j, y, ldy);
    default: return bf16_pairs_block<R, 3>(xp, K, w, j, y, ldy);
  }
}

// Weight rows 3 at a time against the x rows 4 at a time (12 sums and 3 weight vectors in the 16 registers);
// the weight rows stay in L1 for the second 4 x rows. For 5-8 rows, which took two decode passes or the tiled
// loops: 8 rows against 32768 x 1024 weights, one core (Zen 3), 15.2 -> 11.2 ms; mini-1b's LM head at 2 threads,
// 6 rows 22.9 -> 19.9 ms, 8 rows 32.6 -> 26.2. (Spans of 512 columns, so that 8 x rows fit half of L1: 12.3 ms,
// not used.) 1-4 rows stay with fused_plain, which streams one weight row at a time at the memory's pace (this
// path was 1.1x slower there). No software prefetch: the rows are one contiguous run the hardware prefetcher
// follows. True if it ran (BF16 weights, 5-8 rows, K % 16 == 0).
bool linear_bf16_pairs(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                       int64_t n0, int64_t n1) {
  const int64_t K = w.k;
  if (w.format != kBf16 || rows < 5 || rows > 8 || K % 16 != 0) return false;
  float* xp = tl_xpairs.get(rows * K);
  x_even_odd(x, ldx, rows, K, xp);
  const uint16_t* wd = (const uint16_t*)w.data;
  for (int64_t j = n0; j < n1; j += 3) {
    const int64_t c = lo(3, n1 - j);
    in_fours(rows, [&](auto group, int64_t m0) {
      bf16_pairs_rows<decltype(group)::value>(xp + m0 * K, K, wd, j, c, y + m0 * ldy, ldy);
    });
  }
  return true;
}

#if defined(__AVX512BF16__)
// ---- AVX512-BF16: pair dot products (vdpbf16ps) when the x rows hold bf16 values -----------------------------
// Every e2m1 and bf16 weight is a bf16 number, and so are x rows that act_quant made FP8 values times a power of
// two, or that the model rounded to bf16: their products are exact in fp32 (8 x 8 significant bits), so this path
// computes the same sums as the FMA loops, added in another order. (vdpbf16ps also treats bf16 subnormals, below
// 2^-126, as 0 and flushes subnormal sums: values far below anything a layer's inputs hold.) The FP4 scales are
// powers of two: a block's sum times its scale equals the sum of its scaled products exactly.
// Weights decode without floats: e2m1 nibbles -> bf16 bits by a 16-entry vpermw table; bf16 weights as stored.

thread_local ThreadBuffer<uint16_t> tl_xbf16;  // x rows as bf16 bits, in the order the weights decode

inline uint32_t float_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

// x [n] -> bf16 bits; false (out partly written) at the first value that is not a bf16 number (low 16 bits set)
inline bool to_bf16_exact(const float* x, uint16_t* out, int64_t n) {
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(x + i);
    if (_mm512_test_epi32_mask(u, low)) return false;
    _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t u = float_bits(x[i]);
    if (u & 0xFFFF) return false;
    out[i] = (uint16_t)(u >> 16);
  }
  return true;
}

inline bool bf16_valued(const float* x, int64_t ldx, int64_t rows, int64_t K) {  // every value a bf16 number
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * ldx;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      if (_mm512_test_epi32_mask(_mm512_loadu_si512(xm + k), low)) return false;
    for (; k < K; ++k)
      if (float_bits(xm[k]) & 0xFFFF) return false;
  }
  return true;
}

inline void to_bf16(const float* x, uint16_t* out, int64_t n) {  // n % 16 == 0, exact for bf16-valued x
  for (int64_t k = 0; k < n; k += 16)
    _mm256_storeu_si256((__m256i*)(out + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_loadu_si512(x + k), 16)));
}

// bf16 bits of the 16 e2m1 codes (then zeros: a 32-word vpermw table)
alignas(64) const uint16_t kE2m1Bf16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                            0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

// 32 packed bytes = 64 e2m1 values -> even elements 0, 2, .., 62 and odd ones 1, 3, .., 63 as bf16 words
inline void decode_fp4_bf16_64(const uint8_t* p, __m512i& even, __m512i& odd) {
  const __m512i table = _mm512_load_si512(kE2m1Bf16);
  const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  even = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(0x0F)), table);
  odd = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
}

// x rows (fp4 order: per block of 32 its 16 even elements, then the 16 odd ones) -> bf16 in decode order: per 64
// elements the evens of both blocks, then their odds (decode_fp4_bf16_64's words)
inline void fp4_x_bf16(const float* x, uint16_t* out, int64_t K) {
  for (int64_t c = 0; c < K; c += 64) {
    to_bf16(x + c, out + c, 16);            // block 0 evens
    to_bf16(x + c + 32, out + c + 16, 16);  // block 1 evens
    to_bf16(x + c + 16, out + c + 32, 16);  // block 0 odds
    to_bf16(x + c + 48, out + c + 48, 16);  // block 1 odds
  }
}

// acc[m] += row m's pair sums of the 64 weights at column c, each 32-block's times its scale: dword lanes 0-7
// sum the first block's pairs, lanes 8-15 the second's
template <int M>
inline void dp_fp4_64(const uint8_t* row, const float* srow, const uint16_t* xb, int64_t K, int64_t c, __m512* acc,
                      int stride) {
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512i even, odd;
  decode_fp4_bf16_64(row + c / 2, even, odd);
  const __m512 scale = _mm512_permutexvar_ps(
      halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(srow + c / 32)))));
  for (int m = 0; m < M; ++m) {
    const uint16_t* xm = xb + m * K + c;
    __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)even, (__m512bh)_mm512_loadu_si512(xm));
    t = _mm512_dpbf16_ps(t, (__m512bh)odd, (__m512bh)_mm512_loadu_si512(xm + 32));
    acc[m * stride] = _mm512_fmadd_ps(t, scale, acc[m * stride]);
  }
}

// The lane sums of a[0..3]: a transposed reduction, 10 shuffles and adds where four reduce_add sequences take 28
// (their sums are added in another order). (For 8 x rows of one weight row it measured no faster: not used there.)
inline __m128 sums4(const __m512* a) {
  // blocks of s01: a0's 128-bit blocks 0+2 and 1+3, then a1's
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  // block k of t: a[k]'s four partial sums
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));  // + elements [2, 3, 0, 1] of each block
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));         // + [1, 0, 3, 2]: every element the block's sum
  return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, u));
}

// 1-2 rows (experts with few picks): two accumulators per row (with one, each 64 weights waited 4 cycles for the
// previous FMA, longer than their decode and dot products take), and the sums of 4 weight rows reduced together.
// mini-1b's MoE call on Zen 4, batch 8: 1.33 ms with one accumulator, 1.19 with two, 1.11 with the joint
// reduction (batch 1: 0.198 -> 0.187). Row by row: four rows' streams read in turn took 1.70 at batch 8.
template <int M>
void dp_fp4(const QuantWeight& w, const uint16_t* xb, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int A = M <= 2 ? 2 : 1, R = M <= 2 ? 4 : 1;
  const int64_t K = w.k;
  RowScales scales(w);
  for (int64_t j0 = n0; j0 < n1; j0 += R) {
    const int rows = (int)lo(R, n1 - j0);
    __m512 sums[M][R];
    for (int r = 0; r < rows; ++r) {
      const int64_t j = j0 + r;
      const uint8_t* row = (const uint8_t*)w.data + j * (K / 2);
      const float* srow = scales(j);
      prefetch_fp4_ahead<M>(w, j, n1);
      __m512 acc[M][A];
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c + 64 * A <= K; c += 64 * A)
        for (int a = 0; a < A; ++a) dp_fp4_64<M>(row, srow, xb, K, c + 64 * a, &acc[0][a], A);
      for (; c < K; c += 64) dp_fp4_64<M>(row, srow, xb, K, c, &acc[0][0], A);
      for (int m = 0; m < M; ++m) {
        sums[m][r] = acc[m][0];
        for (int a = 1; a < A; ++a) sums[m][r] = _mm512_add_ps(sums[m][r], acc[m][a]);
      }
    }
    for (int m = 0; m < M; ++m) {
      if (rows == 4)
        _mm_storeu_ps(y + m * ldy + j0, sums4(sums[m]));
      else
        for (int r = 0; r < rows; ++r) y[m * ldy + j0 + r] = _mm512_reduce_add_ps(sums[m][r]);
    }
  }
}

template <int M>
void dp_bf16(const QuantWeight& w, const uint16_t* xb, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int A = M <= 2 ? 4 : 2;  // independent accumulators per row: vdpbf16ps has a latency of several cycles
  const int64_t K = w.k;
  for (int64_t j = n0; j < n1; ++j) {
    const uint16_t* row = (const uint16_t*)w.data + j * K;
    if (M > 2 && j + kPrefetchRows < n1) prefetch<M>(row + kPrefetchRows * K, K * 2);
    __m512 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * A <= K; k += 32 * A)
      for (int a = 0; a < A; ++a) {
        const __m512bh v = (__m512bh)_mm512_loadu_si512(row + k + 32 * a);
        for (int m = 0; m < M; ++m)
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], v, (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32 * a));
      }
    for (; k < K; k += 32)
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(row + k),
                                     (__m512bh)_mm512_loadu_si512(xb + m * K + k));
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[m][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
      y[m * ldy + j] = _mm512_reduce_add_ps(sum);
    }
  }
}

#if !defined(__AMX_BF16__)
// FP8 weights as bf16 pairs, on CPUs with AVX512-BF16 but no AMX: every e4m3 value is a bf16 number, and on Zen 4
// vdpbf16ps retires one 512-bit instruction a cycle, twice the products of the fp32 FMAs (mini-1b's FP8 linears
// in a batch-8 decode step: 11.4 -> 7.6 ms; 5-8 rows ran on fp32 FMAs before). Not in the AMX build: there 5+
// rows run on the tiles, and its vdpbf16ps (one per 2 cycles on Sapphire Rapids) gives no more products than the
// FMA loops its fewer rows keep.
#define DSV4_FP8_PAIR_DOT 1

// bf16 bits of the e4m3 subnormals m x 2^-9 (m = 0..7), then zeros: a 32-word vpermw table
alignas(64) const uint16_t kE4m3SubnormalBf16[32] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};

// 32 e4m3 bytes -> 32 bf16 words, exact. A normal code's exponent and mantissa bits, shifted into place, need
// only the exponent rebiased (+120); a subnormal's (exponent bits 0) come from the table, which its low 5 bits
// index directly; the sign goes to bit 15. (The NaN codes 0x7f / 0xff decode to +-480; weights never hold them.)
inline __m512bh decode_fp8_bf16_32(const uint8_t* p) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x7F)), 4),
                                          _mm512_set1_epi16(0x3C00));
  const __mmask32 subnormal = _mm512_testn_epi16_mask(b, _mm512_set1_epi16(0x78));
  const __m512i v = _mm512_mask_permutexvar_epi16(normal, subnormal, b, _mm512_load_si512(kE4m3SubnormalBf16));
  // v | (b << 8 & 0x8000)
  return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_slli_epi16(b, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}

// Per 128-column block the M rows' sums (A accumulators each for 1-2 rows: the dot products' latency), then each
// times the block's scale, as the FMA loops do.
template <int M>
void dp_fp8(const QuantWeight& w, const uint16_t* xb, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int A = M <= 2 ? 2 : 1;
  const int64_t K = w.k;
  RowScales scales(w);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = (const uint8_t*)w.data + j * K;
    const float* srow = scales(j);
    if (j + kPrefetchRows < n1) prefetch<M>(row + kPrefetchRows * K, K);
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      const int64_t k1 = lo(K, k0 + 128);  // K % 64 == 0: 64 or 128 columns
      __m512 t[M][A];
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) t[m][a] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 32 * A)
        for (int a = 0; a < A; ++a) {
          const __m512bh v = decode_fp8_bf16_32(row + k + 32 * a);
          for (int m = 0; m < M; ++m)
            t[m][a] = _mm512_dpbf16_ps(t[m][a], v, (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32 * a));
        }
      const __m512 scale = _mm512_set1_ps(srow[k0 / 128]);
      for (int m = 0; m < M; ++m) {
        __m512 sum = t[m][0];
        for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, t[m][a]);
        acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + j] = _mm512_reduce_add_ps(acc[m]);
  }
}
#endif

// The pair-dot path when it applies (FP4 or BF16 weights, FP8 ones outside the AMX build, K a multiple of 64,
// bf16-valued x): true if it ran.
template <int M>
bool fused_dp(const QuantWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.k;
#if defined(DSV4_FP8_PAIR_DOT)
  const bool format = w.format == kFp4 || w.format == kBf16 || w.format == kFp8;
#else
  const bool format = w.format == kFp4 || w.format == kBf16;
#endif
  if (!format || K % 64 != 0 || !bf16_valued(x, ldx, M, K)) return false;
  uint16_t* xb = tl_xbf16.get(M * K);
  for (int m = 0; m < M; ++m) {
    if (w.format == kFp4)
      fp4_x_bf16(x + m * ldx, xb + m * K, K);
    else
      to_bf16(x + m * ldx, xb + m * K, K);
  }
  if (w.format == kFp4)
    dp_fp4<M>(w, xb, y, ldy, n0, n1);
#if defined(DSV4_FP8_PAIR_DOT)
  else if (w.format == kFp8)
    dp_fp8<M>(w, xb, y, ldy, n0, n1);
#endif
  else
    dp_bf16<M>(w, xb, y, ldy, n0, n1);
  return true;
}

// Up to 8 token rows in one pass over the weights (a batch-8 decode reads each weight once; 8 rows x 2
// accumulators fit the 32 vector registers).
bool linear_dp(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  switch (rows) {
    case 1: return fused_dp<1>(w, x, ldx, y, ldy, n0, n1);
    case 2: return fused_dp<2>(w, x, ldx, y, ldy, n0, n1);
    case 3: return fused_dp<3>(w, x, ldx, y, ldy, n0, n1);
    case 4: return fused_dp<4>(w, x, ldx, y, ldy, n0, n1);
    case 5: return fused_dp<5>(w, x, ldx, y, ldy, n0, n1);
    case 6: return fused_dp<6>(w, x, ldx, y, ldy, n0, n1);
    case 7: return fused_dp<7>(w, x, ldx, y, ldy, n0, n1);
    case 8: return fused_dp<8>(w, x, ldx, y, ldy, n0, n1);
    default: return false;
  }
}
#endif

template <int M>
void fused(const QuantWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int A = M <= 2 ? 4 : 2;
  if (w.format == kFp8)
    fused_fp8<M, A>(w, x, ldx, y, ldy, n0, n1);
  else if (w.format == kFp4)
    fused_fp4<M>(w, x, ldx, y, ldy, n0, n1);
  else if (w.format == kBf16)
    fused_plain<M, A, uint16_t>(w, x, ldx, y, ldy, n0, n1);
  else
    fused_plain<M, A, float>(w, x, ldx, y, ldy, n0, n1);
}

// ---- tiled (M > 6): decode up to 64 weight rows once into a row-major fp32 tile, then R x C register blocks
// of dot products (R x rows, C weight rows) that read the tile from L2 and a few x rows from L1.
template <int R, int C>
void dot_block(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float v = hsum(acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk) v += x[r * ldx + kk] * w[c * K + kk];
      y[r * ldy + c] = v;
    }
}

void dot_rows(int64_t r, int64_t c, const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  switch (r * 2 + c) {  // r in 1..4, c in 1..2
    case 3: dot_block<1, 1>(x, ldx, w, K, y, ldy); break;
    case 4: dot_block<1, 2>(x, ldx, w, K, y, ldy); break;
    case 5: dot_block<2, 1>(x, ldx, w, K, y, ldy); break;
    case 6: dot_block<2, 2>(x, ldx, w, K, y, ldy); break;
    case 7: dot_block<3, 1>(x, ldx, w, K, y, ldy); break;
    case 8: dot_block<3, 2>(x, ldx, w, K, y, ldy); break;
    case 9: dot_block<4, 1>(x, ldx, w, K, y, ldy); break;
    default: dot_block<4, 2>(x, ldx, w, K, y, ldy); break;
  }
}

void linear_tiled(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                  int64_t n0, int64_t n1) {
  const int64_t K = w.k;
  int64_t nb_max = 65536 / (K > 0 ? K : 1);  // a tile of <= 256 KB (L2), 2..64 rows
  nb_max = nb_max < 2 ? 2 : (nb_max > 64 ? 64 : nb_max);
  float* tile = tl_tile.get(nb_max * K);
  RowScales scales(w);
  for (int64_t nt = n0; nt < n1; nt += nb_max) {
    const int64_t nb = lo(nb_max, n1 - nt);
    const float* wt = tile;
    if (w.format == kF32)
      wt = (const float*)w.data + nt * K;  // already fp32: use in place
    else
      for (int64_t c = 0; c < nb; ++c) decode_row(w, scales, nt + c, tile + c * K);
    for (int64_t m0 = 0; m0 < rows; m0 += 4)
      for (int64_t c = 0; c < nb; c += 2)
        dot_rows(lo(4, rows - m0), lo(2, nb - c), x + m0 * ldx, ldx, wt + c * K, K, y + m0 * ldy + nt + c, ldy);
  }
}

void linear_impl(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
#if defined(__AVX512BF16__)
  if (linear_dp(w, x, ldx, rows, y, ldy, n0, n1)) return;
#endif
  if (linear_bf16_pairs(w, x, ldx, rows, y, ldy, n0, n1)) return;
  if (rows > 6) return linear_tiled(w, x, ldx, rows, y, ldy, n0, n1);  // 5-6 rows: two fused passes are cheaper
  in_fours(rows, [&](auto group, int64_t m0) {
    fused<decltype(group)::value>(w, x + m0 * ldx, ldx, y + m0 * ldy, ldy, n0, n1);
  });
}

// G (<= 4) heads against one kv row: G dot products sharing the row's loads.
template <int G, typename T>
void dot_heads(const float* q, int64_t d, const T* row, float* out) {
  __m256 s[G][2];
  for (int g = 0; g < G; ++g) s[g][0] = _mm256_setzero_ps(), s[g][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    const __m256 r0 = load8(row + k), r1 = load8(row + k + 8);
    for (int g = 0; g < G; ++g) {
      s[g][0] = _mm256_fmadd_ps(r0, _mm256_loadu_ps(q + g * d + k), s[g][0]);
      s[g][1] = _mm256_fmadd_ps(r1, _mm256_loadu_ps(q + g * d + k + 8), s[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    float r = hsum(_mm256_add_ps(s[g][0], s[g][1]));
    for (int64_t kk = k; kk < d; ++kk) r += q[g * d + kk] * widen(row[kk]);
    out[g] = r;
  }
}

// l[j][g] = q[g] . rows[j]: two rows at a time, so each q load feeds two FMAs (2G accumulators).
template <int G, typename T>
void logits_heads(const float* q, int64_t d, const T* const* rows, int64_t n, float* l) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const T* r0 = rows[j];
    const T* r1 = rows[j + 1];
    __m256 a[G], b[G];
    for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps(), b[g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
      const __m256 v0 = load8(r0 + k), v1 = load8(r1 + k);
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_loadu_ps(q + g * d + k);
        a[g] = _mm256_fmadd_ps(qv, v0, a[g]);
        b[g] = _mm256_fmadd_ps(qv, v1, b[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      float sa = hsum(a[g]), sb = hsum(b[g]);
      for (int64_t kk = k; kk < d; ++kk) sa += q[g * d + kk] * widen(r0[kk]), sb += q[g * d + kk] * widen(r1[kk]);
      l[j * G + g] = sa;
      l[(j + 1) * G + g] = sb;
    }
  }
  if (j < n) dot_heads<G>(q, d, rows[j], l + j * G);
}

// out[g] = sum_j p[j][g] rows[j]: per 16 channels the G x 2 sums stay in registers while the rows stream by.
template <int G, typename T>
void weighted_rows(float* out, int64_t d, const T* const* rows, const float* p, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = _mm256_setzero_ps(), acc[g][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v0 = load8(rows[j] + c), v1 = load8(rows[j] + c + 8);
      for (int g = 0; g < G; ++g) {
        const __m256 pb = _mm256_broadcast_ss(p + j * G + g);
        acc[g][0] = _mm256_fmadd_ps(pb, v0, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(pb, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(out + g * d + c, acc[g][0]);
      _mm256_storeu_ps(out + g * d + c + 8, acc[g][1]);
    }
  }
  for (; c < d; ++c)
    for (int g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += p[j * G + g] * widen(rows[j][c]);
      out[g * d + c] = sum;
    }
}
#endif  // __AVX2__

// ---- element-wise: bf16 rounding, exp ------------------------------------------------------------------------
// Two roundings each, never an FMA (-ffp-contract=off; the compiler still vectorises them): the reference's
// separate torch ops, so these are bit-exact with it.
void add_product(float* y, float a, const float* x, int64_t n) {  // y += a * x
  for (int64_t k = 0; k < n; ++k) y[k] = y[k] + a * x[k];
}

void scale_add(float* y, float a, const float* x, int64_t n) {  // y = y * a + x
  for (int64_t k = 0; k < n; ++k) y[k] = y[k] * a + x[k];
}

inline float round_bf16(float x) {  // float -> bfloat16 -> float, ties to even (torch's conversion)
  if (x != x) return x;
  uint32_t u;
  memcpy(&u, &x, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  memcpy(&x, &u, 4);
  return x;
}

#if defined(__AVX2__)
inline __m256 round_bf16(__m256 x) {
  __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  u = _mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u));
  return _mm256_blendv_ps(_mm256_castsi256_ps(u), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// e^x, 8 lanes: x = n ln2 + r (Cody-Waite), e^r by the Cephes expf polynomial, 2^n into the exponent bits.
// Within 1 ulp of glibc's expf on [-87.3, 88] (checked on 3.9M points); below -87.3: 0 (no denormals);
// (88, 88.72]: e^88; above: inf; NaN stays NaN. Callers feed it softmax arguments (<= 0) and silu's -g.
inline __m256 exp256(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.7228f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

// ---- FP8 fake quantisation --------------------------------------------------------------------------------------
// ops.cc's round_e4m3 restated (the ISA units share no inline functions with it, see kernels.h): |v| <= 448 ->
// the nearest e4m3fn value, ties to even, subnormals included.
inline float round_e4m3_value(float v) {
  if (v != v) return v;
  uint32_t u;
  memcpy(&u, &v, 4);
  const uint32_t sign = u & 0x80000000u, a = u ^ sign;
  uint32_t r;
  if (a >= 0x3C800000u) {  // >= 2^-6: keep 3 mantissa bits
    r = (a + 0x7FFFFu + ((a >> 20) & 1u)) & 0xFFF00000u;
  } else {
    float m;
    memcpy(&m, &a, 4);
    m = (m + 16384.0f) - 16384.0f;  // the float add rounds to a multiple of 2^-9
    memcpy(&r, &m, 4);
  }
  r |= sign;
  float out;
  memcpy(&out, &r, 4);
  return out;
}

float abs_max(const float* x, int64_t n) {
  float m = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16)  // maxps gives its second operand when one is NaN: a NaN x loses to acc
    acc = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), acc);
  m = _mm512_reduce_max_ps(acc);
#elif defined(__AVX2__)
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) m = v > m ? v : m;
#endif
  for (; i < n; ++i) {
    const float a = fabsf(x[i]);
    m = a > m ? a : m;
  }
  return m;
}

void quant_e4m3(const float* x, float* y, int64_t n, float scale) {
  const float inv = 1.0f / scale;  // exact: a power of two
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 inv16 = _mm512_set1_ps(inv), scale16 = _mm512_set1_ps(scale);
  const __m512 hi = _mm512_set1_ps(448.f), lo16 = _mm512_set1_ps(-448.f), shift = _mm512_set1_ps(16384.0f);
  const __m512i sign_bit = _mm512_set1_epi32((int)0x80000000u), keep = _mm512_set1_epi32((int)0xFFF00000u);
  const __m512i half = _mm512_set1_epi32(0x7FFFF), one = _mm512_set1_epi32(1);
  const __m512i normal_min = _mm512_set1_epi32(0x3C800000);  // 2^-6, the smallest normal e4m3 magnitude
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), inv16);
    v = _mm512_max_ps(lo16, _mm512_min_ps(hi, v));  // min/max give their second operand for NaN: NaN kept
    const __m512i u = _mm512_castps_si512(v), sign = _mm512_and_si512(u, sign_bit), a = _mm512_xor_si512(u, sign);
    const __m512i normal = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(a, half), _mm512_and_si512(_mm512_srli_epi32(a, 20), one)), keep);
    const __m512i small = _mm512_castps_si512(_mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(a), shift), shift));
    __m512i r = _mm512_or_si512(_mm512_mask_blend_epi32(_mm512_cmpge_epu32_mask(a, normal_min), small, normal), sign);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, u);
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_castsi512_ps(r), scale16));
  }
#elif defined(__AVX2__)
  const __m256 inv8 = _mm256_set1_ps(inv), scale8 = _mm256_set1_ps(scale);
  const __m256 hi = _mm256_set1_ps(448.f), lo8 = _mm256_set1_ps(-448.f), shift = _mm256_set1_ps(16384.0f);
  const __m256i sign_bit = _mm256_set1_epi32((int)0x80000000u), keep = _mm256_set1_epi32((int)0xFFF00000u);
  const __m256i half = _mm256_set1_epi32(0x7FFFF), one = _mm256_set1_epi32(1);
  const __m256i below_normal = _mm256_set1_epi32(0x3C7FFFFF);  // just under 2^-6
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), inv8);
    v = _mm256_max_ps(lo8, _mm256_min_ps(hi, v));  // min/max give their second operand for NaN: NaN kept
    const __m256i u = _mm256_castps_si256(v), sign = _mm256_and_si256(u, sign_bit), a = _mm256_xor_si256(u, sign);
    const __m256i normal = _mm256_and_si256(
        _mm256_add_epi32(_mm256_add_epi32(a, half), _mm256_and_si256(_mm256_srli_epi32(a, 20), one)), keep);
    const __m256i small = _mm256_castps_si256(_mm256_sub_ps(_mm256_add_ps(_mm256_castsi256_ps(a), shift), shift));
    // a < 2^31 (sign cleared), so the signed compare orders it; NaN: a > the normal floor, its bits kept below
    __m256i r = _mm256_or_si256(_mm256_blendv_epi8(small, normal, _mm256_cmpgt_epi32(a, below_normal)), sign);
    r = _mm256_blendv_epi8(r, u, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_castsi256_ps(r), scale8));
  }
#endif
  for (; i < n; ++i) {
    float v = x[i] * inv;
    v = v > 448.f ? 448.f : (v < -448.f ? -448.f : v);
    y[i] = round_e4m3_value(v) * scale;
  }
}

// ---- attention -------------------------------------------------------------------------------------------------
// An online softmax over blocks of 64 picks in idx order, as DeepSeek's kernel (spec §3.9.2, registry.sparse_attn):
// with bf16 the unnormalised probabilities exp(l - running max) are rounded before the P.V product while the
// denominator sums them unrounded, so where the blocks start (fixed idx positions, -1 picks included) and the
// running max each block rounds against are part of the numerics.
constexpr int64_t kAttnBlock = 64;

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
#define DSV4_ATTN_PAIR_DOT 1
// The logits of bf16-valued q heads (qb: their bf16 bits, [G][d], d % 64 == 0) against bf16 rows as vdpbf16ps
// pair dots, on CPUs with AVX512-BF16 and no AMX (dp_fp8 says why not there): the same exact products, summed in
// another order. Two rows at a time share each q load; with 4 heads one transposed reduction gives a row's 4
// logits. mini-1b's decode step on Zen 4 (its q and unpacked rows are bf16 numbers): batch 8 36.7 -> 34.8 ms,
// batch 1 the same.
// l[r][g] = q[g] . rows[r] for R rows (R = 2: each q load feeds both)
template <int G, int R>
void logits_dp_rows(const uint16_t* qb, int64_t d, const uint16_t* const* rows, float* l) {
  __m512 acc[R][G][2];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g][0] = acc[r][g][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 64)
    for (int h = 0; h < 2; ++h) {
      __m512bh v[R];
      for (int r = 0; r < R; ++r) v[r] = (__m512bh)_mm512_loadu_si512(rows[r] + k + 32 * h);
      for (int g = 0; g < G; ++g) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + g * d + k + 32 * h);
        for (int r = 0; r < R; ++r) acc[r][g][h] = _mm512_dpbf16_ps(acc[r][g][h], v[r], qv);
      }
    }
  for (int r = 0; r < R; ++r) {
    __m512 sum[G];
    for (int g = 0; g < G; ++g) sum[g] = _mm512_add_ps(acc[r][g][0], acc[r][g][1]);
    if (G == 4)
      _mm_storeu_ps(l + r * G, sums4(sum));
    else
      for (int g = 0; g < G; ++g) l[r * G + g] = _mm512_reduce_add_ps(sum[g]);
  }
}

template <int G>
bool logits_dp(const uint16_t* qb, int64_t d, const uint16_t* const* rows, int64_t n, float* l) {
  if (!qb) return false;
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) logits_dp_rows<G, 2>(qb, d, rows + j, l + j * G);
  if (j < n) logits_dp_rows<G, 1>(qb, d, rows + j, l + j * G);
  return true;
}
#endif
// Rows the pair dots do not take (float rows; bf16 rows without DSV4_ATTN_PAIR_DOT): the FMA loops
template <int G, typename T>
bool logits_dp(const uint16_t*, int64_t, const T* const*, int64_t, float*) {
  return false;
}

// One block for heads h..h+G-1: `rows` its n > 0 valid picks. Updates the running max, the
// denominator and the accumulator acc [G][d] as the reference does: the block's own P.V sum first, then
// acc * rescale + that sum (a block of -1 picks only would leave all three unchanged, so callers skip it).
template <int G, typename T>
void attn_block(const float* q, const uint16_t* qb, const T* const* rows, int64_t n, int64_t d, float scale,
                bool bf16, float* run_max, float* denom, float* acc, float* p /* [n][G] */,
                float* part /* [G][d] */) {
  if (!logits_dp<G>(qb, d, rows, n, p)) logits_heads<G>(q, d, rows, n, p);
  float shift[G], rescale[G], sum[G];
  for (int g = 0; g < G; ++g) {
    float mx = run_max[g];
    for (int64_t j = 0; j < n; ++j) {
      const float l = p[j * G + g] * scale;
      p[j * G + g] = l;
      if (l > mx) mx = l;
    }
    shift[g] = __builtin_isfinite(mx) ? mx : 0.f;  // no -inf - -inf while nothing has been seen
    rescale[g] = expf(run_max[g] - shift[g]);
    run_max[g] = mx;
    sum[g] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int g = 0; g < G; ++g) {
      const float e = expf(p[j * G + g] - shift[g]);
      sum[g] += e;  // the denominator takes the unrounded value
      p[j * G + g] = bf16 ? round_bf16(e) : e;
    }
  weighted_rows<G>(part, d, rows, p, n);
  for (int g = 0; g < G; ++g) {
    denom[g] = denom[g] * rescale[g] + sum[g];
    scale_add(acc + g * d, rescale[g], part + g * d, d);
  }
}

// Heads h..h+G-1 of one query over all blocks; block b's valid picks are rows[start[b] .. start[b + 1]).
// qb: the heads' q as bf16 bits when they are bf16 numbers and the pair dots apply (logits_dp), else null
template <int G, typename T>
void attn_heads(const float* q, const uint16_t* qb, const T* const* rows, const int64_t* start, int64_t blocks,
                const float* sink, int64_t d, float scale, bool bf16, float* out, float* scratch) {
  float run_max[G], denom[G];
  for (int g = 0; g < G; ++g) run_max[g] = -INFINITY, denom[g] = 0.f;
  for (int64_t i = 0; i < G * d; ++i) out[i] = 0.f;  // the accumulator
  float* p = scratch;
  float* part = scratch + kAttnBlock * G;
  for (int64_t b = 0; b < blocks; ++b)
    if (start[b + 1] > start[b])
      attn_block<G, T>(q, qb, rows + start[b], start[b + 1] - start[b], d, scale, bf16, run_max, denom, out, p,
                       part);
  for (int g = 0; g < G; ++g) {  // the sink joins the denominator last, against the final max
    const float z = denom[g] + expf(sink[g] - (__builtin_isfinite(run_max[g]) ? run_max[g] : 0.f));
    for (int64_t i = 0; i < d; ++i) out[g * d + i] /= z;
  }
}

template <typename T>
const T** row_pointers(int64_t n) {
  thread_local ThreadBuffer<const T*> buffer;
  return buffer.get(n);
}

template <typename T>
void sparse_attn_rows(const float* q, const T* kv, int64_t n_kv, const T* cmp, const int64_t* idx, int64_t k,
                      const float* sink, int64_t h0, int64_t h1, int64_t d, float scale, bool bf16, float* out,
                      float* scratch) {
  const int64_t blocks = (k + kAttnBlock - 1) / kAttnBlock;
  const T** rows = row_pointers<T>(k);
  int64_t* start = tl_offsets.get(blocks + 1);
  int64_t n = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    start[b] = n;
    for (int64_t j = b * kAttnBlock; j < lo(k, (b + 1) * kAttnBlock); ++j)  // -1 picks drop out (a repeat stays)
      if (idx[j] >= 0) rows[n++] = idx[j] < n_kv ? kv + idx[j] * d : cmp + (idx[j] - n_kv) * d;
  }
  start[blocks] = n;
  uint16_t* qb = nullptr;  // q of heads h0..h1 as bf16 bits, for the pair dots against bf16 rows
#if defined(DSV4_ATTN_PAIR_DOT)
  if (sizeof(T) == 2 && d % 64 == 0) {
    qb = tl_xbf16.get((h1 - h0) * d);
    if (!to_bf16_exact(q + h0 * d, qb, (h1 - h0) * d)) qb = nullptr;
  }
#endif
  for (int64_t h = h0; h < h1;) {
    const int64_t g = lo(4, h1 - h);
    const float* qh = q + h * d;
    const uint16_t* qbh = qb ? qb + (h - h0) * d : nullptr;
    float* oh = out + h * d;
    switch (g) {
      case 4: attn_heads<4, T>(qh, qbh, rows, start, blocks, sink + h, d, scale, bf16, oh, scratch); break;
      case 3: attn_heads<3, T>(qh, qbh, rows, start, blocks, sink + h, d, scale, bf16, oh, scratch); break;
      case 2: attn_heads<2, T>(qh, qbh, rows, start, blocks, sink + h, d, scale, bf16, oh, scratch); break;
      default: attn_heads<1, T>(qh, qbh, rows, start, blocks, sink + h, d, scale, bf16, oh, scratch); break;
    }
    h += g;
  }
}

// Scores of 8 entries from their dot products l [heads][8]: r(sum_h r(w[h] relu(r(l[h][e])))), h summed in order,
// r = bf16 rounding with `bf16` (the reference's bf16 einsum, product and head sum, spec §3.9.4). Across 8 entries
// at a time, so the roundings cost a few vector instructions per head (the same operations in both builds).
void weigh_heads8(const float* l, const float* w, int64_t heads, bool bf16, float* out) {
#if defined(__AVX2__)
  const __m256 zero = _mm256_setzero_ps();
  __m256 s = zero;
  for (int64_t h = 0; h < heads; ++h) {
    __m256 v = _mm256_loadu_ps(l + h * 8);
    if (bf16) v = round_bf16(v);
    v = _mm256_mul_ps(_mm256_max_ps(v, zero), _mm256_set1_ps(w[h]));  // relu: max(NaN, 0) = 0 as below
    s = _mm256_add_ps(s, bf16 ? round_bf16(v) : v);
  }
  _mm256_storeu_ps(out, bf16 ? round_bf16(s) : s);
#else
  for (int e = 0; e < 8; ++e) {
    float s = 0.f;
    for (int64_t h = 0; h < heads; ++h) {
      float v = l[h * 8 + e];
      if (bf16) v = round_bf16(v);
      v = (v > 0.f ? v : 0.f) * w[h];
      s = s + (bf16 ? round_bf16(v) : v);
    }
    out[e] = bf16 ? round_bf16(s) : s;
  }
#endif
}

template <typename T>
void indexer_rows(const float* q, const float* w, int64_t heads, const T* k, int64_t d, int64_t n0, int64_t n1,
                  bool bf16, float* scores) {
  float* l = tl_dots.get(heads * 8);
  for (int64_t j0 = n0; j0 < n1; j0 += 8) {
    const int64_t m = lo(8, n1 - j0);
    for (int64_t e = 0; e < 8; ++e) {
      if (e >= m) {  // lanes past the last entry: zeros, not stored
        for (int64_t h = 0; h < heads; ++h) l[h * 8 + e] = 0.f;
        continue;
      }
      const T* row = k + (j0 + e) * d;
      for (int64_t h = 0; h < heads; h += 4) {
        float t[4];
        const int64_t g = lo(4, heads - h);
        if (g == 4)
          dot_heads<4>(q + h * d, d, row, t);
        else
          for (int64_t i = 0; i < g; ++i) t[i] = dot(q + (h + i) * d, row, d);
        for (int64_t i = 0; i < g; ++i) l[(h + i) * 8 + e] = t[i];
      }
    }
    float out[8];
    weigh_heads8(l, w, heads, bf16, out);
    memcpy(scores + j0, out, (size_t)m * sizeof(float));
  }
}

// ---- MoE activation, compressor pooling ---------------------------------------------------------------------
void swiglu(const float* gate, const float* up, int64_t n, float weight, float limit, bool bf16, float* h) {
  const bool clamp = limit > 0.f;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 lim = _mm256_set1_ps(clamp ? limit : INFINITY), w = _mm256_set1_ps(weight), one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i), u = _mm256_loadu_ps(up + i);
    if (bf16) g = round_bf16(g), u = round_bf16(u);
    g = _mm256_min_ps(g, lim);
    u = _mm256_max_ps(_mm256_min_ps(u, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(silu, u), w);
    _mm256_storeu_ps(h + i, bf16 ? round_bf16(v) : v);
  }
#endif
  for (; i < n; ++i) {
    float g = gate[i], u = up[i];
    if (bf16) g = round_bf16(g), u = round_bf16(u);
    if (clamp) {
      u = u < -limit ? -limit : (u > limit ? limit : u);
      g = g > limit ? limit : g;
    }
    const float v = g / (1.0f + expf(-g)) * u * weight;  // F.silu is x / (1 + exp(-x))
    h[i] = bf16 ? round_bf16(v) : v;
  }
}

void pool_channels(const float* kv, const float* score, int64_t stride, int64_t span, int64_t split, int64_t shift,
                   int64_t nc, float* out, float* scratch) {
  float* mx = scratch;
  float* z = scratch + nc;
  float* p = scratch + 2 * nc;  // [span][nc]
  auto row = [&](const float* base, int64_t j) { return base + j * stride + (j >= split ? shift : 0); };
  for (int64_t i = 0; i < nc; ++i) mx[i] = -INFINITY, z[i] = 0.f, out[i] = 0.f;
  for (int64_t j = 0; j < span; ++j) {
    const float* s = row(score, j);
    for (int64_t i = 0; i < nc; ++i) mx[i] = s[i] > mx[i] ? s[i] : mx[i];
  }
  for (int64_t j = 0; j < span; ++j) {
    const float* s = row(score, j);
    float* pj = p + j * nc;
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= nc; i += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_loadu_ps(mx + i)));
      _mm256_storeu_ps(pj + i, e);
      _mm256_storeu_ps(z + i, _mm256_add_ps(_mm256_loadu_ps(z + i), e));
    }
#endif
    for (; i < nc; ++i) z[i] += (pj[i] = expf(s[i] - mx[i]));
  }
  for (int64_t j = 0; j < span; ++j) {  // softmax weight first, then the product, as the reference
    const float* v = row(kv, j);
    const float* pj = p + j * nc;
    for (int64_t i = 0; i < nc; ++i) out[i] += v[i] * (pj[i] / z[i]);
  }
}

// ---- hyper-connections ----------------------------------------------------------------------------------------
inline float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

void hc_pre_token(const float* x, const float* fn, const float* scale, const float* base, int64_t n, int64_t d,
                  int64_t iters, float norm_eps, float hc_eps, float* y, float* post, float* comb, float* mix) {
  const int64_t nd = n * d, nmix = (2 + n) * n;
  const float rms = 1.f / sqrtf(dot(x, x, nd) / (float)nd + norm_eps);
  for (int64_t i = 0; i < nmix; ++i) mix[i] = dot(x, fn + i * nd, nd) * rms;
  float pre[64];  // n <= 64 is checked by the caller
  for (int64_t j = 0; j < n; ++j) {
    pre[j] = sigmoid(mix[j] * scale[0] + base[j]) + hc_eps;
    post[j] = 2.f * sigmoid(mix[n + j] * scale[1] + base[n + j]);
  }
  for (int64_t r = 0; r < n; ++r) {  // softmax over each row, + eps
    float* c = comb + r * n;
    float mx = -INFINITY, z = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      c[i] = mix[2 * n + r * n + i] * scale[2] + base[2 * n + r * n + i];
      if (c[i] > mx) mx = c[i];
    }
    for (int64_t i = 0; i < n; ++i) z += (c[i] = expf(c[i] - mx));
    for (int64_t i = 0; i < n; ++i) c[i] = c[i] / z + hc_eps;
  }
  auto normalize_columns = [&]() {
    for (int64_t i = 0; i < n; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < n; ++r) s += comb[r * n + i];
      for (int64_t r = 0; r < n; ++r) comb[r * n + i] /= s + hc_eps;
    }
  };
  normalize_columns();  // Sinkhorn: the first pass normalises columns only
  for (int64_t it = 1; it < iters; ++it) {
    for (int64_t r = 0; r < n; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < n; ++i) s += comb[r * n + i];
      for (int64_t i = 0; i < n; ++i) comb[r * n + i] /= s + hc_eps;
    }
    normalize_columns();
  }
  for (int64_t i = 0; i < d; ++i) y[i] = 0.f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) y[i] += pre[j] * x[j * d + i];
}

void hc_post_token(const float* f, const float* res, const float* post, const float* comb, int64_t n, int64_t d,
                   float* out) {
  for (int64_t k = 0; k < n; ++k) {
    float* o = out + k * d;
    // sum_j comb[j, k] res_j for j = 0, 1, ... in order (comb applied transposed), as registry.hc_post
    for (int64_t i = 0; i < d; ++i) o[i] = comb[k] * res[i];
    for (int64_t j = 1; j < n; ++j) add_product(o, comb[j * n + k], res + j * d, d);
    for (int64_t i = 0; i < d; ++i) o[i] = post[k] * f[i] + o[i];
  }
}

#if defined(__AMX_BF16__)
// ---- AMX-BF16: tile products for 5+ bf16-valued rows -----------------------------------------------------------
// C[16 weight rows][16 x rows] += A[16 weight rows][32 k] . B[16 k pairs][16 x rows x 2]: the weights are the A
// operand, read as stored (bf16) or decoded 16 rows at a time (FP8 / FP4 times their power-of-two scales: bf16
// numbers), so no weight is ever rearranged; the x rows, the B operand, are laid out once per call in pairs
// (prepare_rows). Products exact, fp32 sums (as vdpbf16ps). Tiles: C 0-3 (64 x rows), A 4, B 5-7.
constexpr int64_t kAmxMinRows = 5;  // up to 4 rows the vdpbf16ps loops read the weights as fast

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
thread_local bool tl_tiles_configured = false;
thread_local ThreadBuffer<uint16_t> tl_wtile;  // 16 decoded weight rows, bf16
thread_local ThreadBuffer<float> tl_ctile;     // 4 C tiles as stored

inline int64_t pair_padded(int64_t k) { return (k + 31) / 32 * 32; }

int64_t amx_prepared_bytes(int64_t rows, int64_t k) {
  return rows >= kAmxMinRows ? (rows + 15) / 16 * pair_padded(k) * 16 * 2 : 0;
}

// out[block of 16 rows][k pair][row in block] = (x[row][2i], x[row][2i+1]) as one dword of two bf16, zero padded
bool amx_prepare_rows(const float* x, int64_t ldx, int64_t rows, int64_t k, void* out) {
  if (!bf16_valued(x, ldx, rows, k)) return false;
  const int64_t pairs = pair_padded(k) / 2;
  uint32_t* o = (uint32_t*)out;
  memset(o, 0, (size_t)amx_prepared_bytes(rows, k));
  for (int64_t m = 0; m < rows; ++m) {
    uint32_t* dst = o + (m / 16) * pairs * 16 + m % 16;
    const float* xm = x + m * ldx;
    for (int64_t i = 0; i < k / 2; ++i)
      dst[i * 16] = (float_bits(xm[2 * i]) >> 16) | (float_bits(xm[2 * i + 1]) & 0xFFFF0000u);
    if (k % 2) dst[(k / 2) * 16] = float_bits(xm[k - 1]) >> 16;
  }
  return true;
}

inline void configure_tiles() {
  if (tl_tiles_configured) return;
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  tl_tiles_configured = true;
}

// e = log2(s) for a scale s that is a power of two within 2^+-100 (so adding e to a bf16 exponent is exact);
// false for any other scale (the float decode then decides).
inline bool pow2_exponent(float s, int32_t& e) {
  const uint32_t bits = float_bits(s);
  e = (int32_t)((bits >> 23) & 0xFF) - 127;
  return !(bits & 0x807FFFFFu) && e >= -100 && e <= 100;
}

// FP4 row j straight to bf16 in kernel order (per block of 32 its evens, then its odds): e2m1 codes -> bf16 bits
// by vpermw, times the block's power-of-two scale by adding its exponent to every nonzero value (exact). false for
// a scale that is not a power of two within 2^+-100 (the float decode then decides).
bool decode_fp4_row_bf16(const QuantWeight& w, RowScales& scales, int64_t j, uint16_t* out) {
  const int64_t K = w.k, nblk = K / 32;
  const uint8_t* row = (const uint8_t*)w.data + j * (K / 2);
  const float* srow = scales(j);
  const __m256i table = _mm256_load_si256((const __m256i*)kE2m1Bf16), nibble = _mm256_set1_epi16(0x0F),
                magnitude = _mm256_set1_epi16(0x7FFF);
  for (int64_t b = 0; b < nblk; ++b) {
    int32_t e;
    if (!pow2_exponent(srow[b], e)) return false;
    const __m256i shift = _mm256_set1_epi16((short)(e * 128));
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(row + b * 16)));
    __m256i even = _mm256_permutexvar_epi16(_mm256_and_si256(bytes, nibble), table);
    __m256i odd = _mm256_permutexvar_epi16(_mm256_srli_epi16(bytes, 4), table);
    even = _mm256_mask_add_epi16(even, _mm256_test_epi16_mask(even, magnitude), even, shift);
    odd = _mm256_mask_add_epi16(odd, _mm256_test_epi16_mask(odd, magnitude), odd, shift);
    _mm256_storeu_si256((__m256i*)(out + b * 32), even);
    _mm256_storeu_si256((__m256i*)(out + b * 32 + 16), odd);
  }
  return true;
}

// FP8 row j straight to bf16 (in order): an e4m3 magnitude shifted left by 4 is the bf16 bit pattern of the same
// mantissa with the exponent biased 7 instead of 127, so adding (120 + the block's power-of-two exponent) << 7
// gives the scaled value of a normal code; the 7 subnormal codes (m/8 2^-6) come from a table, their exponent
// moved the same way; the sign is bit 7 moved to bit 15. Exact; false for a scale that is not a power of two
// within 2^+-100 (the float decode then decides). (The NaN codes 0x7f / 0xff are not handled: quantised weights
// never hold them, as in decode_fp8_16.)
const uint16_t kE4m3SubnormalBf16[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
// 32 e4m3 bytes widened to words -> bf16 bits, the block's exponent in `bias` (normal codes) and `sub` (subnormals)
inline __m512i fp8_words_bf16(__m512i bytes, __m512i bias, __m512i sub) {
  const __m512i mag = _mm512_and_si512(bytes, _mm512_set1_epi16(0x7F));
  __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), bias);
  v = _mm512_mask_permutexvar_epi16(v, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, sub);
  return _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(0x80)), 8));
}

bool decode_fp8_row_bf16(const QuantWeight& w, RowScales& scales, int64_t j, uint16_t* out) {
  const int64_t K = w.k;
  const uint8_t* row = (const uint8_t*)w.data + j * K;
  const float* srow = scales(j);
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    int32_t e;
    if (!pow2_exponent(srow[k0 / 128], e)) return false;
    const __m512i bias = _mm512_set1_epi16((short)((e + 120) * 128));
    __m512i sub = _mm512_maskz_loadu_epi16(0xFF, kE4m3SubnormalBf16);  // the 8 codes, then zeros
    sub = _mm512_mask_add_epi16(sub, _mm512_test_epi16_mask(sub, sub), sub, _mm512_set1_epi16((short)(e * 128)));
    const int64_t k1 = lo(K, k0 + 128);
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32)
      _mm512_storeu_si512(out + k, fp8_words_bf16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(row + k))),
                                                   bias, sub));
    if (k < k1) {  // a ragged block's last values, masked
      const __mmask32 take = (1u << (k1 - k)) - 1;
      _mm512_mask_storeu_epi16(out + k, take,
                               fp8_words_bf16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(take, row + k)), bias, sub));
    }
  }
  return true;
}

// 16 weight rows from j0 (fewer at the end: zero rows) as bf16 [16][kp]; false if a value is not a bf16 number
bool decode_tile(const QuantWeight& w, int64_t j0, int64_t nb, uint16_t* out, int64_t kp) {
  float* row = tl_row.get(w.k);
  RowScales scales(w);
  if (nb < 16) memset(out + nb * kp, 0, (size_t)(16 - nb) * kp * 2);  // rows past the weight's last: zero
  if (w.k < kp)
    for (int64_t r = 0; r < nb; ++r) memset(out + r * kp + w.k, 0, (size_t)(kp - w.k) * 2);  // the padded pair
  for (int64_t r = 0; r < nb; ++r) {
    if (w.format == kFp4 && decode_fp4_row_bf16(w, scales, j0 + r, out + r * kp)) continue;
    if (w.format == kFp8 && decode_fp8_row_bf16(w, scales, j0 + r, out + r * kp)) continue;
    decode_row(w, scales, j0 + r, row);
    if (!to_bf16_exact(row, out + r * kp, w.k)) return false;
  }
  return true;
}

// false: a weight tile was not bf16-valued; the caller then computes every row the other way
bool amx_linear(const QuantWeight& w, const uint32_t* xp, int64_t rows, float* y, int64_t ldy, int64_t n0,
                int64_t n1) {
  configure_tiles();
  const int64_t K = w.k, kp = pair_padded(K), pairs = kp / 2, mblocks = (rows + 15) / 16;
  uint16_t* wt = tl_wtile.get(16 * kp);
  float* c = tl_ctile.get(4 * 256);
  for (int64_t j0 = n0; j0 < n1; j0 += 16) {
    const int64_t nb = lo(16, n1 - j0);
    const uint16_t* a = wt;
    int64_t stride = kp * 2;
    if (w.format == kBf16 && K == kp && nb == 16) {
      a = (const uint16_t*)w.data + j0 * K, stride = K * 2;  // read in place
    } else if (w.format == kBf16) {
      memset(wt, 0, (size_t)16 * kp * 2);
      for (int64_t r = 0; r < nb; ++r) memcpy(wt + r * kp, (const uint16_t*)w.data + (j0 + r) * K, (size_t)K * 2);
    } else if (!decode_tile(w, j0, nb, wt, kp)) {
      return false;
    }
    for (int64_t mb = 0; mb < mblocks; mb += 4) {
      const int64_t g = lo(4, mblocks - mb);
      const uint32_t* b = xp + mb * pairs * 16;  // x block mb at k pair 0
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kc = 0; kc < kp; kc += 32) {
        const uint32_t* bk = b + (kc / 2) * 16;
        _tile_loadd(4, a + kc, stride);
        _tile_loadd(5, bk, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (g > 1) {
          _tile_loadd(6, bk + pairs * 16, 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (g > 2) {
          _tile_loadd(7, bk + 2 * pairs * 16, 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (g > 3) {
          _tile_loadd(5, bk + 3 * pairs * 16, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      _tile_stored(0, c, 64);
      _tile_stored(1, c + 256, 64);
      _tile_stored(2, c + 512, 64);
      _tile_stored(3, c + 768, 64);
      for (int64_t q = 0; q < g; ++q)  // C [weight row][x row] -> y [x row][weight row]
        for (int64_t m = 0; m < lo(16, rows - (mb + q) * 16); ++m) {
          float* ym = y + ((mb + q) * 16 + m) * ldy + j0;
          for (int64_t r = 0; r < nb; ++r) ym[r] = c[q * 256 + r * 16 + m];
        }
    }
  }
  return true;
}
#endif

int64_t prepared_bytes(int64_t rows, int64_t k) {
#if defined(__AMX_BF16__)
  return amx_prepared_bytes(rows, k);
#else
  return 0;
#endif
}

bool prepare_rows(const float* x, int64_t ldx, int64_t rows, int64_t k, void* out) {
#if defined(__AMX_BF16__)
  return amx_prepare_rows(x, ldx, rows, k, out);
#else
  return false;
#endif
}

void linear(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy, int64_t n0,
            int64_t n1, const void* prepared) {
  if (rows <= 0 || n1 <= n0) return;
#if defined(__AMX_BF16__)
  if (prepared && amx_linear(w, (const uint32_t*)prepared, rows, y, ldy, n0, n1)) return;
#endif
  linear_impl(w, x, ldx, rows, y, ldy, n0, n1);
}

}  // namespace

void sparse_attn_query(const float* q, const void* kv, int64_t n_kv, const void* cmp, bool rows_bf16,
                       const int64_t* idx, int64_t k, const float* sink, int64_t h0, int64_t h1, int64_t d, float scale,
                       bool bf16, float* out, float* scratch) {
  if (rows_bf16)
    sparse_attn_rows(q, (const uint16_t*)kv, n_kv, (const uint16_t*)cmp, idx, k, sink, h0, h1, d, scale, bf16, out,
                     scratch);
  else
    sparse_attn_rows(q, (const float*)kv, n_kv, (const float*)cmp, idx, k, sink, h0, h1, d, scale, bf16, out, scratch);
}

void indexer_scores(const float* q, const float* w, int64_t heads, const void* k, bool k_bf16, int64_t d, int64_t n0,
                    int64_t n1, bool bf16, float* scores) {
  if (k_bf16)
    indexer_rows(q, w, heads, (const uint16_t*)k, d, n0, n1, bf16, scores);
  else
    indexer_rows(q, w, heads, (const float*)k, d, n0, n1, bf16, scores);
}

#define DSV4_STR2(x) #x
#define DSV4_STR(x) DSV4_STR2(x)
const IsaKernels kernels = {DSV4_STR(DSV4_ISA), linear,        prepared_bytes, prepare_rows,  sparse_attn_query,
                            indexer_scores,      swiglu,        pool_channels,  hc_pre_token, hc_post_token,
                            abs_max,             quant_e4m3};

}  // namespace DSV4_ISA
}  // namespace dsv4
