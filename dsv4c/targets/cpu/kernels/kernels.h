// The inner loops of the dsv4 ONNX Runtime kernels, behind one table per instruction set.
//
// kernels_impl.h is compiled four times: isa_generic.cc (the compiler's baseline, runs anywhere), isa_avx2.cc
// (-mavx2 -mfma -mf16c), isa_avx512bf16.cc (AVX2 + AVX-512 F/BW/VL/DQ/BF16) and isa_amx.cc (that + AMX-BF16).
// ops.cc picks a table at kernel creation from the CPU's cpuid, so the library stays portable while the hot
// loops use what the CPU has. Only plain pointers cross this interface: the ISA translation units instantiate
// no std:: templates, so no AVX2 code can be shared with the generic path by the linker's merging of identical
// inline functions.
#pragma once

#include <cstdint>

namespace dsv4 {

// Values of dsv4c.graphs.quant (tests/test_shared_constants.py checks that they agree):
enum WeightFormat : int32_t { kFp4 = 0, kFp8 = 1, kF32 = 2 };  // = ExpertFormat, the `fmt` attribute of MoeExperts
constexpr int32_t kBf16 = 3;  // QuantWeight::format of Bf16Linear's weights (not an expert format)
constexpr int64_t kFp8Block = 128;  // = FP8_BLOCK: FP8 weight scales per 128x128, activation ones per 1x128
constexpr int64_t kFp4Block = 32;   // = FP4_BLOCK: FP4 scales per 1x32

// One [N, K] weight matrix as stored in the model.
//   fp4: uint8 [N, K/2], two e2m1 values per byte (element 2i in the low nibble), scale [N, K/32]
//   fp8: uint8 [N, K] e4m3fn bits, scale [ceil(N/128), ceil(K/128)]
//   f32: float [N, K], no scale
//   bf16: uint16 [N, K] bfloat16 bits, no scale (widened exactly: a bf16 is the upper half of a float)
// The scales are floats (`scale`) or, as the checkpoint ships them, e8m0 bytes (`scale_e8m0`: 2^(e-127), 0xFF
// NaN; the CPU build stores them so, dsv4c.targets.cpu.passes); one of the two is set.
struct QuantWeight {
  int32_t format;
  const void* data;
  const float* scale;
  int64_t n, k;
  const uint8_t* scale_e8m0 = nullptr;
};

// x rows multiplied with an fp4 weight are given in "fp4 order": within each block of 32 the even elements
// first, then the odd ones (x0 x2 .. x30 x1 x3 .. x31), the order in which the vector decoder produces the
// packed nibbles. fp4_order() in ops.cc makes it; fp8 and f32 take x as is.

struct IsaKernels {
  const char* name;

  // y[m * ldy + j] = sum_k x[m * ldx + k] * W[j, k] for j in [n0, n1), m in [0, rows). `prepared`: x's rows
  // as prepare_rows laid them out (made once per call, shared by its tasks), or null.
  void (*linear)(const QuantWeight& w, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                 int64_t n0, int64_t n1, const void* prepared);

  // Bytes of x rows [rows, k] laid out for this table's matrix loops (AMX: bf16 pairs per 16 rows); 0 when the
  // table has no such layout or it does not pay at this many rows.
  int64_t (*prepared_bytes)(int64_t rows, int64_t k);
  // Lays x out into `out` (prepared_bytes of it); false (nothing usable) unless every value is a bf16 number.
  bool (*prepare_rows)(const float* x, int64_t ldx, int64_t rows, int64_t k, void* out);

  // Sparse attention of one query position, heads [h0, h1): q [H, D], the K = V rows in two parts, kv [n_kv, D]
  // and cmp [*, D] (float, or bf16 bits with rows_bf16: cache rows stored as the reference stores them, widened
  // exactly as they are read), idx [K] rows of [kv | cmp] (-1 = none; row n_kv + j is cmp's row j), sink [H];
  // out [H, D] rows h0..h1-1. An online softmax over blocks of 64 picks in idx order; with `bf16` each block's
  // unnormalised probabilities are rounded to bf16 before the P.V product (registry.sparse_attn). scratch: at
  // least 4 * (64 + D) floats.
  void (*sparse_attn_query)(const float* q, const void* kv, int64_t n_kv, const void* cmp, bool rows_bf16,
                            const int64_t* idx, int64_t k, const float* sink, int64_t h0, int64_t h1, int64_t d,
                            float scale, bool bf16, float* out, float* scratch);

  // Lightning-indexer scores of one query for entries [n0, n1): score[j] = r(sum_h r(w[h] relu(r(q[h] . k[j])))),
  // h summed in order (as the reference's reduction), r = bf16 rounding with `bf16` (else identity).
  // q [h, d], k [N, d] (float, or bf16 bits with k_bf16), scores indexed by entry.
  void (*indexer_scores)(const float* q, const float* w, int64_t heads, const void* k, bool k_bf16, int64_t d,
                         int64_t n0, int64_t n1, bool bf16, float* scores);

  // MoE activation of one pick: h[i] = r(silu(g') u' weight), g' = r(g) clamped above at limit, u' = r(u)
  // clamped to [-limit, limit] (no clamp when limit <= 0), r = bf16 rounding when `bf16` (else identity).
  void (*swiglu)(const float* gate, const float* up, int64_t n, float weight, float limit, bool bf16, float* h);

  // One compressed entry over channels [0, nc): out[i] = sum_j softmax_j(score_j[i]) kv_j[i], j over the span
  // candidate rows (row j at offset j * stride, plus `shift` channels for j >= split). scratch: (span + 2) * nc.
  void (*pool_channels)(const float* kv, const float* score, int64_t stride, int64_t span, int64_t split,
                        int64_t shift, int64_t nc, float* out, float* scratch);

  // mHC pre of one token: x [n, D] -> y [D], post [n], comb [n, n]. fn [(2+n)n, nD], scale [3],
  // base [(2+n)n]. scratch: at least (2+n)n floats.
  void (*hc_pre_token)(const float* x, const float* fn, const float* scale, const float* base, int64_t n,
                       int64_t d, int64_t iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                       float* scratch);

  // mHC post of one token: out[k] = post[k] f + sum_j comb[j, k] res[j], j summed in order with every product
  // and sum rounded on its own (bit-exact with registry.hc_post). f [D], res [n, D], out [n, D].
  void (*hc_post_token)(const float* f, const float* res, const float* post, const float* comb, int64_t n,
                        int64_t d, float* out);

  // FP8 fake quantisation (quant.fake_quant_fp8), one block at a time: the block's largest |x| (NaN skipped, as
  // fmax does), and y[i] = e4m3(x[i] / scale clamped to +-448) * scale for a power-of-two scale, the e4m3
  // rounding to nearest even with subnormals, NaN kept (bit-exact with ops.cc round_e4m3).
  float (*abs_max)(const float* x, int64_t n);
  void (*quant_e4m3)(const float* x, float* y, int64_t n, float scale);
};

namespace generic {
extern const IsaKernels kernels;
}
namespace avx2 {
extern const IsaKernels kernels;
}
namespace avx512bf16 {
extern const IsaKernels kernels;
}
namespace amx {
extern const IsaKernels kernels;
}

}  // namespace dsv4
