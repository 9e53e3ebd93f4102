// The dsv4 custom ops for ONNX Runtime's CPU execution provider: one kernel per op of
// dsv4c/graphs/ops/registry.py, registered in the ONNX domain "dsv4" under the op types, inputs and attributes
// that dsv4c/graphs/ops/onnx.py gives the nodes, so the library is a drop-in for the ops' function bodies.
//
// Built against the C API only (onnxruntime_c_api.h, ORT_API_VERSION of the headers; newer runtimes accept it) and
// not linked to libonnxruntime: ORT hands the API table to RegisterCustomOps. Work is split into tasks run on the
// session's intra-op thread pool (KernelContext_ParallelFor), so `intra_op_num_threads` bounds the threads used.
// Numerics follow the torch references: fake-quant, bf16 rounding, Hadamard and hc_post are bit-exact; matmuls and
// softmaxes agree to float rounding (summation order, exp), so a bf16 rounding right after one of them (attention
// probabilities, indexer scores) lands on the other side of a rounding boundary now and then.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace dsv4 {
namespace {

const OrtApi* api = nullptr;

// ---- numerics shared with the torch reference (bit-exact) ---------------------------------------------------
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// float -> bfloat16 -> float, round half to even (torch's conversion).
inline float round_bf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t u = to_bits(x);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return from_bits(u & 0xFFFF0000u);
}

inline float round_bf16_if(bool bf16, float x) { return bf16 ? round_bf16(x) : x; }

// Smallest power of two >= v > 0 (quant.ceil_pow2: frexp, exact).
inline float ceil_pow2(float v) {
  int e;
  const float m = std::frexp(v, &e);
  return std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
}

// |v| <= 448 (clamped) -> nearest float8_e4m3fn value, ties to even, subnormals included.
inline float round_e4m3(float v) {
  if (std::isnan(v)) return v;
  const uint32_t u = to_bits(v), sign = u & 0x80000000u, a = u ^ sign;
  if (a >= 0x3C800000u) {  // >= 2^-6: keep 3 mantissa bits
    return from_bits(((a + 0x7FFFFu + ((a >> 20) & 1u)) & 0xFFF00000u) | sign);
  }
  const float r = (from_bits(a) + 16384.0f) - 16384.0f;  // the float add rounds to a multiple of 2^-9
  return from_bits(to_bits(r) | sign);
}

// |v| -> nearest e2m1 value (ties to even on the 0.5 / 1 / 2 step grid), saturating at 6, sign kept.
inline float round_e2m1(float v) {
  const float mag = std::fmin(std::fabs(v), 6.0f);
  const float step = mag < 2.f ? 0.5f : (mag < 4.f ? 1.f : 2.f);
  return std::copysign(std::fmin(std::nearbyint(mag / step) * step, 6.0f), v);
}

// quant.block_scales for one block of n values: 2^ceil(log2(max(amax, amax_min) / qmax)), a power of two (so
// dividing by it is exact). The floors: FP8 activations 1e-4 (the reference's act_quant), FP4 the smallest amax
// with a normal scale.
constexpr float kFp8AmaxMin = 1e-4f, kFp4AmaxMin = 6.0f * 0x1p-126f;
inline float block_scale(const float* x, int64_t n, float amax_min, float qmax) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) {  // fmax(amax, |x|), which skips NaN as this does, is a libm call per value
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  return ceil_pow2(std::fmax(amax, amax_min) / qmax);
}

// quant.fake_quant_fp8 on `n` values in blocks of `block`, with the inner loops of `isa`.
void fake_quant_fp8(const IsaKernels* isa, const float* x, float* y, int64_t n, int64_t block) {
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const float scale = ceil_pow2(std::fmax(isa->abs_max(x + b0, block), kFp8AmaxMin) / 448.0f);
    isa->quant_e4m3(x + b0, y + b0, block, scale);
  }
}

// quant.fake_quant_fp4 (blocks of 32) of quant.hadamard(x) rounded to bf16 (registry.hadamard_fp4: the reference's
// Hadamard returns bf16) for one row of d (a power of two, >= 32).
void hadamard_fp4(const float* x, float* y, int64_t d) {
  std::memcpy(y, x, d * sizeof(float));
  for (int64_t h = 1; h < d; h *= 2)  // butterflies in the reference's order: bit-exact
    for (int64_t i = 0; i < d; i += 2 * h)
      for (int64_t t = i; t < i + h; ++t) {
        const float a = y[t], b = y[t + h];
        y[t] = a + b;
        y[t + h] = a - b;
      }
  const float norm = (float)std::pow((double)d, -0.5);
  for (int64_t i = 0; i < d; ++i) y[i] = round_bf16(y[i] * norm);
  for (int64_t b0 = 0; b0 < d; b0 += 32) {
    const float scale = block_scale(y + b0, 32, kFp4AmaxMin, 6.0f), inv = 1.0f / scale;
    for (int64_t i = b0; i < b0 + 32; ++i) y[i] = round_e2m1(y[i] * inv) * scale;
  }
}

// ---- packed cache rows (quant.py: pack_kv_fp8 / pack_fp4_rows; the layouts are described there) ---------------
constexpr int64_t kKvScaleBlock = 64;  // = quant.KV_SCALE_BLOCK

int64_t kv_row_bytes(int64_t d, int64_t rope) {
  const int64_t nope = d - rope;
  return (nope + 2 * rope + nope / kKvScaleBlock + 7) / 8 * 8;
}
int64_t fp4_row_bytes(int64_t d) { return d / 2 + d / 32; }

inline float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v = e == 0 ? std::ldexp((float)m, -9) : std::ldexp((float)(8 + m), e - 10);
  if ((b & 0x7f) == 0x7f) v = NAN;
  return (b & 0x80) ? -v : v;
}
// the byte of a value on the e4m3 grid (round_e4m3's output), sign of zero kept
inline uint8_t e4m3_code(float v) {
  const uint32_t u = to_bits(v), sign = (u >> 31) << 7, a = u & 0x7FFFFFFFu;
  if (a >= 0x3C800000u) return (uint8_t)(sign | (((a >> 23) - 127 + 7) << 3) | ((a >> 20) & 7));  // >= 2^-6
  return (uint8_t)(sign | (uint32_t)std::ldexp(from_bits(a), 9));  // subnormal: a multiple of 2^-9
}
inline float e2m1_value(uint8_t c) {
  static const float mag[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  return (c & 8) ? -mag[c & 7] : mag[c & 7];
}
// the nibble of a value on the e2m1 grid (round_e2m1's output), sign of zero kept
inline uint8_t e2m1_code(float v) {
  const float m = std::fabs(v);
  const int code = m < 2.f ? (int)(m * 2) : (m < 4.f ? (int)m + 2 : (int)(m / 2) + 4);
  return (uint8_t)((std::signbit(v) ? 8 : 0) | code);
}
inline uint8_t e8m0_byte(float pow2) {
  int e;
  std::frexp(pow2, &e);
  return (uint8_t)std::clamp(e - 1 + 127, 0, 254);
}
inline float e8m0_value(uint8_t b) { return std::ldexp(1.0f, (int)b - 127); }

void pack_kv_row(const float* x, int64_t d, int64_t rope, uint8_t* out) {
  const int64_t nope = d - rope;
  uint8_t* scales = out + nope + 2 * rope;
  for (int64_t b0 = 0; b0 < nope; b0 += kKvScaleBlock) {  // fake_quant_fp8(x, 64)'s arithmetic
    const float scale = block_scale(x + b0, kKvScaleBlock, kFp8AmaxMin, 448.0f), inv = 1.0f / scale;
    for (int64_t i = b0; i < b0 + kKvScaleBlock; ++i) out[i] = e4m3_code(round_e4m3(std::clamp(x[i] * inv, -448.f, 448.f)));
    scales[b0 / kKvScaleBlock] = e8m0_byte(scale);
  }
  for (int64_t i = 0; i < rope; ++i) {
    const uint32_t bits = to_bits(round_bf16(x[nope + i])) >> 16;
    out[nope + 2 * i] = (uint8_t)(bits & 0xFF);
    out[nope + 2 * i + 1] = (uint8_t)(bits >> 8);
  }
  for (int64_t i = nope + 2 * rope + nope / kKvScaleBlock; i < kv_row_bytes(d, rope); ++i) out[i] = 0;
}

// Every byte's value: e4m3 (fp8), and the two e2m1 values of a byte (fp4 pairs, low nibble first). Unpacking runs
// on every picked row of every decode step: a table lookup and one multiply per value, the scale per block.
struct PackedTables {
  float fp8[256];
  float fp4_pairs[256][2];
  PackedTables() {
    for (int b = 0; b < 256; ++b) {
      fp8[b] = e4m3_value((uint8_t)b);
      fp4_pairs[b][0] = e2m1_value((uint8_t)(b & 15));
      fp4_pairs[b][1] = e2m1_value((uint8_t)(b >> 4));
    }
  }
};
const PackedTables& packed_tables() {
  static const PackedTables tables;
  return tables;
}

void unpack_kv_row(const uint8_t* row, int64_t d, int64_t rope, float* out) {
  const int64_t nope = d - rope;
  const uint8_t* scales = row + nope + 2 * rope;
  const float* fp8 = packed_tables().fp8;
  for (int64_t b0 = 0; b0 < nope; b0 += kKvScaleBlock) {
    const float scale = e8m0_value(scales[b0 / kKvScaleBlock]);  // a power of two: the products are exact
    for (int64_t i = b0; i < b0 + kKvScaleBlock; ++i) out[i] = fp8[row[i]] * scale;
  }
  for (int64_t i = 0; i < rope; ++i)
    out[nope + i] = from_bits((uint32_t)(row[nope + 2 * i] | (row[nope + 2 * i + 1] << 8)) << 16);
}

// The same row as bf16 bits, when bf16 holds every value (an FP8 value times a power-of-two scale does, unless a
// scale below 2^-124 puts small codes past bf16's subnormals): false otherwise, out partly written.
bool unpack_kv_row_bf16(const uint8_t* row, int64_t d, int64_t rope, uint16_t* out) {
  const int64_t nope = d - rope;
  const uint8_t* scales = row + nope + 2 * rope;
  const float* fp8 = packed_tables().fp8;
  uint32_t low = 0;  // the low 16 bits of every value, or-ed: 0 when each is a bf16 number
  for (int64_t b0 = 0; b0 < nope; b0 += kKvScaleBlock) {
    const float scale = e8m0_value(scales[b0 / kKvScaleBlock]);
    for (int64_t i = b0; i < b0 + kKvScaleBlock; ++i) {
      const uint32_t u = to_bits(fp8[row[i]] * scale);
      low |= u & 0xFFFFu;
      out[i] = (uint16_t)(u >> 16);
    }
  }
  for (int64_t i = 0; i < rope; ++i) out[nope + i] = (uint16_t)(row[nope + 2 * i] | (row[nope + 2 * i + 1] << 8));
  return low == 0;
}

void pack_fp4_row(const float* x, int64_t d, uint8_t* out) {
  for (int64_t b0 = 0; b0 < d; b0 += 32) {  // fake_quant_fp4's arithmetic
    const float scale = block_scale(x + b0, 32, kFp4AmaxMin, 6.0f), inv = 1.0f / scale;
    for (int64_t i = b0; i < b0 + 32; i += 2)
      out[i / 2] = e2m1_code(round_e2m1(x[i] * inv)) | (e2m1_code(round_e2m1(x[i + 1] * inv)) << 4);
    out[d / 2 + b0 / 32] = e8m0_byte(scale);
  }
}

void unpack_fp4_row(const uint8_t* row, int64_t d, float* out) {
  const float(*pairs)[2] = packed_tables().fp4_pairs;
  for (int64_t b0 = 0; b0 < d; b0 += 32) {
    const float scale = e8m0_value(row[d / 2 + b0 / 32]);
    for (int64_t i = b0; i < b0 + 32; i += 2) {
      out[i] = pairs[row[i / 2]][0] * scale;
      out[i + 1] = pairs[row[i / 2]][1] * scale;
    }
  }
}

// x row [K] -> fp4 kernel order (kernels.h): per 32-block the even elements, then the odd ones.
void fp4_order(const float* x, float* out, int64_t k) {
  for (int64_t b = 0; b < k; b += 32)
    for (int64_t i = 0; i < 16; ++i) {
      out[b + i] = x[b + 2 * i];
      out[b + 16 + i] = x[b + 2 * i + 1];
    }
}

// ---- ORT plumbing --------------------------------------------------------------------------------------------
void check(OrtStatus* status) {
  if (status) {
    std::string msg = api->GetErrorMessage(status);
    api->ReleaseStatus(status);
    throw std::runtime_error(msg);
  }
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    default: return "other";
  }
}

// A tensor's shape held inline: Context::input reads a few hundred shapes per decode step, and a heap allocation
// for each was a measurable part of a small model's step. The dsv4 ops take rank <= 5.
class Dims {
 public:
  static constexpr size_t kMaxRank = 8;
  Dims() = default;
  Dims(std::initializer_list<int64_t> dims) {
    resize(dims.size());
    std::copy(dims.begin(), dims.end(), d_);
  }
  void resize(size_t n) {
    if (n > kMaxRank) throw std::runtime_error("tensor of rank " + std::to_string(n) + " (the dsv4 kernels take <= 8)");
    for (size_t i = n_; i < n; ++i) d_[i] = 0;
    n_ = n;
  }
  size_t size() const { return n_; }
  int64_t* data() { return d_; }
  const int64_t* data() const { return d_; }
  const int64_t* begin() const { return d_; }
  const int64_t* end() const { return d_ + n_; }
  int64_t& operator[](size_t i) { return d_[i]; }
  int64_t operator[](size_t i) const { return d_[i]; }
  int64_t& back() { return d_[n_ - 1]; }
  bool operator==(const Dims& o) const { return n_ == o.n_ && std::equal(begin(), end(), o.begin()); }

 private:
  int64_t d_[kMaxRank] = {};
  size_t n_ = 0;
};

std::string shape_str(const Dims& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

struct Tensor {
  const char* name;
  ONNXTensorElementDataType type;
  Dims shape;
  const void* data;

  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int64_t rank() const { return (int64_t)shape.size(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  const float* f32() const { return static_cast<const float*>(data); }
  const uint8_t* u8() const { return static_cast<const uint8_t*>(data); }
  const int64_t* i64() const { return static_cast<const int64_t*>(data); }
  // bytes per element of a cache-row tensor: float32, bf16 or packed uint8 rows
  size_t element_size() const {
    return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? 2 : (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? 1 : 4);
  }
  // row r of a [.., N, D] cache-row tensor, as the kernels' untyped row pointer
  const void* row(int64_t r) const { return static_cast<const char*>(data) + r * dim(-1) * element_size(); }
};

// An OrtValue's element type, shape and data (name left empty).
Tensor describe(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api->GetTensorTypeAndShape(value, &info));
  Tensor t{"", ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}, nullptr};
  size_t n = 0;
  OrtStatus* st = api->GetTensorElementType(info, &t.type);
  if (!st) st = api->GetDimensionsCount(info, &n);
  if (!st && n > Dims::kMaxRank) st = api->CreateStatus(ORT_INVALID_ARGUMENT, "tensor of rank > 8");
  if (!st) t.shape.resize(n);
  if (!st) st = api->GetDimensions(info, t.shape.data(), n);
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(st);
  void* data = nullptr;
  check(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  t.data = data;
  return t;
}

// The inputs of one node that are constant initializers (weights, scales, tables), read once when ORT creates
// the kernel: their type, shape and data stay as they are for the session's life, and asking ORT for a tensor's
// type and shape allocates twice (a few hundred times per decode step otherwise).
struct ConstantInputs {
  std::vector<Tensor> tensors;  // by input index, where constant[i]
  std::vector<bool> constant;

  void read(const OrtKernelInfo* info) {
    size_t n = 0;
    check(api->KernelInfo_GetInputCount(info, &n));
    tensors.assign(n, Tensor{"", ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}, nullptr});
    constant.assign(n, false);
    for (size_t i = 0; i < n; ++i) {
      int is_constant = 0;
      const OrtValue* value = nullptr;
      check(api->KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value));
      if (!is_constant || !value) continue;
      tensors[i] = describe(value);
      constant[i] = true;
    }
  }
  const Tensor* find(size_t i) const { return i < constant.size() && constant[i] ? &tensors[i] : nullptr; }
};

// Weights read once and then given back (dsv4_drop_weight_pages): the build's validation runs a whole engine to
// check its numerics, and every weight page a run touches stays in the process's resident set while the file is
// mapped, so the build's peak grew with the model's depth (build peak RSS, pages kept -> given back: real-width
// V4-Flash with 2 layers 9.66 -> 7.70 GB, mini-1b's width with 8 layers 1.43 -> 1.07 GB). Registered here are
// the read-only file mappings the executor made of the engine's weights files; after each node, the pages of its
// constant inputs inside them leave the resident set (the page cache keeps them, so the next read of them is a
// minor fault, not a disk read). Only those ranges: a constant ORT holds in its own memory is not a file page,
// and MADV_DONTNEED would zero it.
class WeightPages {
 public:
  // Between runs only (a node reads the ranges without a lock); n = 0 switches it off. What loading and earlier
  // runs read goes now.
  void set(const uintptr_t* starts, const size_t* sizes, int64_t n) {
    files_.clear();
    for (int64_t i = 0; i < n; ++i) files_.push_back(Range{starts[i], starts[i] + sizes[i]});
    for (const Range& f : files_) release(f.begin, f.end);
    enabled_.store(n > 0, std::memory_order_release);
  }
  bool enabled() const { return enabled_.load(std::memory_order_acquire); }
  void drop(const Tensor& t) const {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data), end = begin + t.numel() * value_bytes(t.type);
    for (const Range& f : files_) {
      if (end <= f.begin || begin >= f.end) continue;
      // whole pages, within the mapping (which starts on a page; its last page is all the file's)
      release(std::max(begin, f.begin) / kPage * kPage, std::min(end, f.end));
    }
  }

 private:
  static constexpr uintptr_t kPage = 4096;
  static void release(uintptr_t lo, uintptr_t hi) {
#if defined(__linux__)
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#endif
  }
  struct Range {
    uintptr_t begin, end;
  };
  // bytes per value; 1 for the byte-sized and packed formats (FP8, e8m0 scales, FP4 pairs in a uint8). Counting
  // too many would only give back more pages of the same read-only file (the range is clipped to it).
  static size_t value_bytes(ONNXTensorElementDataType t) {
    switch (t) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return 4;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return 8;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
      default: return 1;
    }
  }
  std::vector<Range> files_;
  std::atomic<bool> enabled_{false};
};
WeightPages weight_pages;

// Calls with less work (~ multiply-adds) run on the calling thread: ~10 us of one core, below which a hand-over
// to another thread costs more than it gives. DSV4C_KERNEL_INLINE_WORK overrides it (0: always split; tests).
constexpr double kInlineWork = 32768.0;
double inline_work() {
  const char* env = std::getenv("DSV4C_KERNEL_INLINE_WORK");
  return env ? std::atof(env) : kInlineWork;
}

// What a kernel learns about its node when ORT creates it (OpEntry), besides the op's own attributes.
struct NodeSetup {
  double inline_work = kInlineWork;  // inline_work() when ORT creates the kernel
  ConstantInputs constants;
  // attribute round_bf16_out=1: output 0 (float) is rounded to bf16 values after the op, in place. The CPU build
  // folds an op's bf16 round trip (Cast to bf16, Cast back) into it (dsv4c/targets/cpu/passes.py): one pass over
  // the output instead of two ONNX Runtime nodes.
  bool round_output = false;
};

// One compute call: inputs, outputs, errors naming the op, tasks on ORT's intra-op pool.

class Context {
 public:
  Context(OrtKernelContext* ctx, const char* op, const NodeSetup& node)
      : ctx_(ctx),
        op_(op),
        inline_work_(node.inline_work),
        constants_(node.constants),
        round_output_(node.round_output) {}
  // the node's output rounding happens here, once the op has written its output (not when it failed)
  ~Context() {
    if (round_output_ && rounded_ && std::uncaught_exceptions() == 0)
      for (int64_t i = 0; i < rounded_n_; ++i) rounded_[i] = round_bf16(rounded_[i]);
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  [[noreturn]] void fail(const std::string& msg) const {
    throw std::runtime_error(std::string("dsv4.") + op_ + ": " + msg);
  }
  // `message`: a string, or a callable that builds it: the decode loop calls the kernels hundreds of times a
  // step, and building every check's message up front cost ~8 % of tiny's decode step
  template <typename Message>
  void require(bool ok, Message&& message) const {
    if (ok) return;
    if constexpr (std::is_invocable_v<Message>)
      fail(message());
    else
      fail(message);
  }

  Tensor input(size_t i, const char* name, ONNXTensorElementDataType type, int rank = -1) const {
    Tensor t;
    if (const Tensor* known = constants_.find(i)) {
      t = *known;
    } else {
      const OrtValue* value = nullptr;
      check(api->KernelContext_GetInput(ctx_, i, &value));
      if (!value) fail(std::string("input '") + name + "' is missing");
      t = describe(value);
    }
    t.name = name;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED && t.type != type)
      fail(std::string("input '") + name + "' must be " + type_name(type) + ", got " + type_name(t.type) + " " +
           shape_str(t.shape));
    if (rank >= 0 && t.rank() != rank)
      fail(std::string("input '") + name + "' must have rank " + std::to_string(rank) + ", got shape " +
           shape_str(t.shape));
    return t;
  }

  // cache rows: float, bf16 where the engine stores them as the reference does, or uint8 rows in a packed format
  Tensor cache_rows(size_t i, const char* name, int rank) const {
    const Tensor t = input(i, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, rank);
    if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 &&
        t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
      fail(std::string("input '") + name + "' must be float, bfloat16 or packed uint8 rows, got " + type_name(t.type) +
           " " + shape_str(t.shape));
    return t;
  }

  template <typename T>
  T* output(size_t i, const Dims& shape) const {
    OrtValue* value = nullptr;
    check(api->KernelContext_GetOutput(ctx_, i, shape.data(), shape.size(), &value));
    void* data = nullptr;
    check(api->GetTensorMutableData(value, &data));
    if (i == 0 && round_output_) {
      if constexpr (!std::is_same_v<T, float>) fail("attribute round_bf16_out needs a float output");
      rounded_ = reinterpret_cast<float*>(data);
      rounded_n_ = 1;
      for (int64_t d : shape) rounded_n_ *= d;
    }
    return static_cast<T*>(data);
  }

  // f(i) for i in [0, n) on the session's intra-op threads; inline when the pool has one thread or the whole
  // call is less `work` (~ multiply-adds) than a hand-over to another thread costs. The first exception of any
  // task is rethrown here, so it never crosses ORT's thread pool.
  template <typename F>
  void parallel(size_t n, double work, F&& f) const {
    if (n == 0) return;
    if (n == 1 || work < inline_work_) {
      for (size_t i = 0; i < n; ++i) f(i);
      return;
    }
    struct Job {
      F* f;
      std::atomic<bool> failed{false};
      std::mutex mu;
      std::string error;
    } job;
    job.f = &f;
    auto run = [](void* p, size_t i) {
      auto* j = static_cast<Job*>(p);
      if (j->failed.load(std::memory_order_relaxed)) return;
      try {
        (*j->f)(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(j->mu);
        if (!j->failed.exchange(true)) j->error = e.what();
      }
    };
    check(api->KernelContext_ParallelFor(ctx_, run, n, 0, &job));
    if (job.failed) throw std::runtime_error(job.error);
  }

 private:
  OrtKernelContext* ctx_;
  const char* op_;
  double inline_work_;
  const ConstantInputs& constants_;
  bool round_output_;
  mutable float* rounded_ = nullptr;  // output 0, when the node rounds it
  mutable int64_t rounded_n_ = 0;
};

// Rows of a weight per task: about 64 tasks over `matrices` weights of n rows (enough to balance any pool),
// each at least 16 rows (64 when many tokens share the decode), multiples of 16 so the decode loops stay long.
int64_t rows_per_task(int64_t n, int64_t tokens, int64_t matrices = 1) {
  const int64_t min_rows = tokens > 6 ? 64 : 16;
  int64_t per = (n * matrices + 63) / 64;
  per = (per + 15) / 16 * 16;
  return std::max(min_rows, per);
}

#if defined(__x86_64__) || defined(__i386__)
#define DSV4_HAVE_AVX2_BUILD 1  // build.py compiles isa_avx2.cc on x86 only
#endif

// AMX: the CPU has the tile unit (cpuid leaf 7: EDX bits 22, 24) and Linux lets this process use the tile
// registers (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; Linux 5.16+, process-wide, asked once).
bool amx_usable() {
#if defined(DSV4_HAVE_AVX2_BUILD) && defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

const IsaKernels* select_isa() {
#ifdef DSV4_HAVE_AVX2_BUILD
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512bf16 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                 __builtin_cpu_supports("avx512bf16");
  static const bool amx = avx512bf16 && amx_usable();
#else
  static const bool avx2 = false, avx512bf16 = false, amx = false;
#endif
  // DSV4C_KERNEL_ISA forces a table (tests run each one this CPU can; debugging): generic, avx2, avx512bf16, amx
  const char* want = std::getenv("DSV4C_KERNEL_ISA");
  const std::string forced = want ? want : "";
  if (forced == "generic") return &generic::kernels;
  if (forced == "avx2" && !avx2) throw std::runtime_error("DSV4C_KERNEL_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
  if (forced == "avx512bf16" && !avx512bf16)
    throw std::runtime_error("DSV4C_KERNEL_ISA=avx512bf16 but this CPU lacks AVX-512 F/BW/VL/DQ/BF16 or AVX2");
  if (forced == "amx" && !amx)
    throw std::runtime_error("DSV4C_KERNEL_ISA=amx but this CPU lacks AMX-BF16 (or AVX-512 BF16), or the kernel "
                             "refused the tile registers");
  if (!forced.empty() && forced != "avx2" && forced != "avx512bf16" && forced != "amx")
    throw std::runtime_error("DSV4C_KERNEL_ISA=" + forced + ": expected generic, avx2, avx512bf16 or amx");
#ifdef DSV4_HAVE_AVX2_BUILD
  if (amx && (forced.empty() || forced == "amx")) return &amx::kernels;
  if (avx512bf16 && forced != "avx2") return &avx512bf16::kernels;
  if (avx2) return &avx2::kernels;
#endif
  return &generic::kernels;
}

// Large scratch blocks (over ScratchPool::kKeepBytes: a prefill chunk's MoE picks, attention rows) get memory
// of their own, kept for reuse by later calls in one process-wide cache. From malloc they would come out of its
// heap (glibc's mmap threshold rises to the largest block freed, up to 32 MiB), where blocks of changing sizes
// from two threads fragment it: mini-1b's prefill of 8 x 256 tokens grew ~70 MiB of heap a layer, 1,070 MiB at its
// peak. The cache keeps at most kCacheBytes; dsv4_release_scratch() hands it back (the runtime calls it after a
// prefill, so a decoding engine does not hold a prefill's scratch).
class LargeBlocks {
 public:
  static constexpr size_t kPage = 4096, kCacheBytes = size_t(1) << 30;
  void* take(size_t& bytes) {  // bytes: in, what the caller needs; out, what the block holds
    bytes = (bytes + kPage - 1) / kPage * kPage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)  // the smallest cached block that holds it, wasting under half
        if (free_[i].bytes >= bytes && free_[i].bytes / 2 < bytes &&
            (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best < free_.size()) {
        const Block b = free_[best];
        free_[best] = free_.back();
        free_.pop_back();
        cached_ -= b.bytes;
        bytes = b.bytes;
        return b.p;
      }
    }
    void* p = map(bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kCacheBytes) {
        free_.push_back(Block{p, bytes});
        cached_ += bytes;
        return;
      }
    }
    unmap(p, bytes);
  }
  void release() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : blocks) unmap(b.p, b.bytes);
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
#if defined(__linux__)
  static void* map(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  static void unmap(void* p, size_t bytes) { munmap(p, bytes); }
#else
  static void* map(size_t bytes) { return aligned_alloc(kPage, bytes); }
  static void unmap(void* p, size_t) { free(p); }
#endif
  std::mutex mu_;
  std::vector<Block> free_;
  size_t cached_ = 0;
};
LargeBlocks large_blocks;

// Scratch memory of one compute call, from a small per-thread pool. A decode step calls the kernels a few hundred
// times; asking glibc for a block of >= 1 KiB after small frees makes it consolidate its fast bins first, which
// cost ~5 % of tiny's step. Blocks go back to the pool when the call ends; the pool keeps at most kKeepBlocks of
// up to kKeepBytes each. Larger blocks come from (and go back to) large_blocks.
class ScratchPool {
 public:
  static constexpr size_t kKeepBlocks = 16, kKeepBytes = size_t(1) << 20;
  ~ScratchPool() {
    for (size_t i = 0; i < n_; ++i) free(blocks_[i].p);
  }
  void* take(size_t& bytes) {  // bytes: in, what the caller needs; out, what the block holds
    if (bytes > kKeepBytes) return large_blocks.take(bytes);
    size_t best = n_;
    for (size_t i = 0; i < n_; ++i)
      if (blocks_[i].bytes >= bytes && (best == n_ || blocks_[i].bytes < blocks_[best].bytes)) best = i;
    if (best < n_) {
      Block b = blocks_[best];
      blocks_[best] = blocks_[--n_];
      bytes = b.bytes;
      return b.p;
    }
    bytes = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    void* p = aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    if (!p) return;
    if (bytes > kKeepBytes) return large_blocks.give(p, bytes);
    if (n_ == kKeepBlocks) return free(p);
    blocks_[n_++] = Block{p, bytes};
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
  Block blocks_[kKeepBlocks];
  size_t n_ = 0;
};
thread_local ScratchPool tl_scratch;

// Bytes of Scratch the kernels ask for now and the most at once since the last reset: what they need beyond their
// outputs (dsv4_scratch_high_water; `dsv4c plan` counts it in the CPU engine's workspace). What they ask for, not
// the blocks they get: a pooled block may be larger, by what earlier calls of any engine in the process left.
class ScratchUse {
 public:
  void add(int64_t bytes) {
    const int64_t now = now_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    int64_t high = high_.load(std::memory_order_relaxed);
    while (now > high && !high_.compare_exchange_weak(high, now, std::memory_order_relaxed)) {
    }
  }
  void sub(int64_t bytes) { now_.fetch_sub(bytes, std::memory_order_relaxed); }
  int64_t high_water(bool reset) {
    const int64_t high = high_.load(std::memory_order_relaxed);
    if (reset) high_.store(now_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    return high;
  }

 private:
  std::atomic<int64_t> now_{0}, high_{0};
};
ScratchUse scratch_use;

// n values of T (trivially copyable) for one call: uninitialised, or all `fill`.
template <class T>
class Scratch {
  static_assert(std::is_trivially_copyable_v<T>, "Scratch holds plain values");

 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { resize(n); }
  Scratch(int64_t n, T fill) : Scratch(n) { std::fill(begin(), end(), fill); }
  Scratch(Scratch&& o) noexcept : p_(o.p_), n_(o.n_), bytes_(o.bytes_), asked_(o.asked_) {
    o.p_ = nullptr, o.n_ = o.bytes_ = o.asked_ = 0;
  }
  Scratch& operator=(Scratch&& o) noexcept {
    std::swap(p_, o.p_), std::swap(n_, o.n_), std::swap(bytes_, o.bytes_), std::swap(asked_, o.asked_);
    return *this;
  }
  ~Scratch() { give(); }
  void resize(int64_t n) {  // contents not kept
    const size_t asked = size_t(n) * sizeof(T);
    if (asked > bytes_) {
      give();
      bytes_ = asked;
      p_ = static_cast<T*>(tl_scratch.take(bytes_));
    }
    scratch_use.add(int64_t(asked) - int64_t(asked_));
    asked_ = asked;
    n_ = n;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }

 private:
  void give() {
    scratch_use.sub(int64_t(asked_));
    tl_scratch.give(p_, bytes_);
    p_ = nullptr;
    asked_ = 0;
  }

  T* p_ = nullptr;
  int64_t n_ = 0;
  size_t bytes_ = 0;  // the block's size
  size_t asked_ = 0;  // what resize asked for (scratch_use)
};

// ---- kernels --------------------------------------------------------------------------------------------------
struct Kernel {
  const IsaKernels* isa = select_isa();
  NodeSetup node;  // filled when ORT creates the kernel (OpEntry)
  virtual ~Kernel() = default;
  virtual void compute(OrtKernelContext* ctx) = 0;
};

int64_t attr_int(const OrtKernelInfo* info, const char* op, const char* name) {
  int64_t v = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    throw std::runtime_error(std::string("dsv4.") + op + ": missing int attribute '" + name + "'");
  }
  return v;
}

int64_t optional_attr_int(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t v = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v)) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return v;
}

float attr_float(const OrtKernelInfo* info, const char* op, const char* name) {
  float v = 0.f;
  OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    throw std::runtime_error(std::string("dsv4.") + op + ": missing float attribute '" + name + "'");
  }
  return v;
}

constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr auto I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
constexpr auto BF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr auto ANY = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

// `qw` reading the scales `s`: float32, or e8m0 bytes as the checkpoint ships them (the CPU build's graph pass
// stores them so); any other type is refused, naming the input.
QuantWeight with_scales(const Context& c, QuantWeight qw, const Tensor& s) {
  c.require(s.type == F32 || s.type == U8, [&] {
    return std::string("input '") + s.name + "' must be float32 or uint8 (e8m0) scales, got " + type_name(s.type);
  });
  if (s.type == U8)
    qw.scale_e8m0 = s.u8();
  else
    qw.scale = s.f32();
  return qw;
}

// FP8 weight [N, K] with scales [ceil(N/128), ceil(K/128)], checked.
QuantWeight fp8_weight(const Context& c, const Tensor& w, const Tensor& s) {
  c.require(w.rank() == 2,
            [&] { return std::string("input '") + w.name + "' must be uint8 [N, K], got " + shape_str(w.shape); });
  const int64_t n = w.dim(0), k = w.dim(1);
  const int64_t nb = (n + kFp8Block - 1) / kFp8Block, kb = (k + kFp8Block - 1) / kFp8Block;
  c.require(s.rank() == 2 && s.dim(0) == nb && s.dim(1) == kb, [&] {
    return std::string("input '") + s.name + "' must be [ceil(N/128), ceil(K/128)] = [" + std::to_string(nb) + ", " +
           std::to_string(kb) + "] for " + w.name + " " + shape_str(w.shape) + ", got " + shape_str(s.shape);
  });
  return with_scales(c, QuantWeight{kFp8, w.data, nullptr, n, k}, s);
}

// Activations [rows, K] fake-quantised to FP8 (blocks of 128) into `buf`, in parallel; returns buf.
const float* act_quant_rows(const Context& c, const IsaKernels* isa, const float* x, int64_t rows, int64_t k,
                           Scratch<float>& buf) {
  c.require(k % kFp8Block == 0,
            [&] { return "act_quant needs the last dim of x to be a multiple of 128, got " + std::to_string(k); });
  buf.resize(rows * k);
  const int64_t per = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  c.parallel((rows + per - 1) / per, 4.0 * rows * k, [&](size_t t) {
    for (int64_t r = t * per; r < std::min(rows, (int64_t)(t + 1) * per); ++r)
      fake_quant_fp8(isa, x + r * k, buf.data() + r * k, k, kFp8Block);
  });
  return buf.data();
}

// x rows laid out once per call for the table's matrix loops (IsaKernels::prepare_rows), shared by the call's
// tasks; data is null when the table has no layout for this many rows or the rows are not bf16 values.
struct PreparedRows {
  Scratch<uint8_t> bytes;
  const void* data = nullptr;
  PreparedRows() = default;
  PreparedRows(const IsaKernels* isa, const float* x, int64_t ldx, int64_t rows, int64_t k) {
    const int64_t n = isa->prepared_bytes(rows, k);
    if (n <= 0) return;
    bytes.resize(n);
    if (isa->prepare_rows(x, ldx, rows, k, bytes.data())) data = bytes.data();
  }
};

// y[..., N] = x[..., K] . W^T (x FP8-quantised first with `act_quant`): the body of the linear kernels, after
// each has checked its weight into `qw`.
void linear_rows(const Context& c, const IsaKernels* isa, const Tensor& x, const Tensor& w, const QuantWeight& qw,
                 bool act_quant) {
  c.require(x.rank() >= 1 && x.dim(-1) == qw.k, [&] {
    return "x " + shape_str(x.shape) + " does not match w " + shape_str(w.shape) + " (last dims must agree)";
  });
  const int64_t rows = x.numel() / std::max<int64_t>(qw.k, 1);
  Dims shape = x.shape;
  shape.back() = qw.n;
  float* y = c.output<float>(0, shape);
  if (rows == 0 || qw.n == 0) return;
  if (qw.k == 0) return (void)std::fill(y, y + rows * qw.n, 0.f);
  Scratch<float> xq;
  const float* xin = act_quant ? act_quant_rows(c, isa, x.f32(), rows, qw.k, xq) : x.f32();
  const PreparedRows prepared(isa, xin, qw.k, rows, qw.k);
  const int64_t per = rows_per_task(qw.n, rows);
  c.parallel((qw.n + per - 1) / per, double(rows + 1) * qw.n * qw.k, [&](size_t t) {
    isa->linear(qw, xin, qw.k, rows, y, qw.n, t * per, std::min(qw.n, (int64_t)(t + 1) * per), prepared.data);
  });
}

struct Fp8Linear : Kernel {
  bool act_quant;
  explicit Fp8Linear(const OrtKernelInfo* info) : act_quant(attr_int(info, "Fp8Linear", "act_quant") != 0) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "Fp8Linear", node);
    const Tensor x = c.input(0, "x", F32), w = c.input(1, "w", U8), s = c.input(2, "w_scale", ANY);
    linear_rows(c, isa, x, w, fp8_weight(c, w, s), act_quant);
  }
};

// y[..., N] = x[..., K] . float(w)[N, K]^T, w bfloat16 read as stored (registry.bf16_linear).
struct Bf16Linear : Kernel {
  explicit Bf16Linear(const OrtKernelInfo*) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "Bf16Linear", node);
    const Tensor x = c.input(0, "x", F32), w = c.input(1, "w", BF16);
    c.require(w.rank() == 2, [&] { return "input 'w' must be bfloat16 [N, K], got " + shape_str(w.shape); });
    linear_rows(c, isa, x, w, QuantWeight{kBf16, w.data, nullptr, w.dim(0), w.dim(1)}, false);
  }
};

// The cache with rows[b, k] written at slots[b, k] (registry.cache_write): one copy of the cache into the
// output and the few written rows. When the runtime binds the output to the input's own buffer (the CPU executor
// does for a cache read by nothing else: cache updated in place), the copy is skipped.
struct CacheWrite : Kernel {
  explicit CacheWrite(const OrtKernelInfo*) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "CacheWrite", node);
    const Tensor cache = c.cache_rows(0, "cache", 3), rows = c.input(1, "rows", cache.type),
                 slots = c.input(2, "slots", I64);
    const int64_t B = cache.dim(0), N = cache.dim(1), D = cache.dim(2);
    c.require(slots.rank() == 2 && slots.dim(0) == B, [&] {
      return "slots " + shape_str(slots.shape) + " must be [B, K] for cache " + shape_str(cache.shape);
    });
    const int64_t K = slots.dim(1);
    c.require(rows.shape == Dims{B, K, D},
              [&] { return "rows " + shape_str(rows.shape) + " must be [B, K, D] = " + shape_str({B, K, D}); });
    const size_t row_bytes = cache.element_size() * D;
    char* out = c.output<char>(0, cache.shape);
    const char* in = static_cast<const char*>(cache.data);
    // the copy is the whole cost (a long context's cache is MBs per layer): split it into ~256 KB pieces
    const int64_t total = B * N * row_bytes, piece = 1 << 18;
    if (out != in) c.parallel((total + piece - 1) / piece, double(total) / 4, [&](size_t t) {
      const int64_t i0 = t * piece;
      memcpy(out + i0, in + i0, std::min(piece, total - i0));
    });
    const char* src = static_cast<const char*>(rows.data);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t slot = slots.i64()[b * K + k];
        if (slot >= 0 && slot < N) memcpy(out + (b * N + slot) * row_bytes, src + (b * K + k) * row_bytes, row_bytes);
      }
  }
};

struct Fp8GroupedLinear : Kernel {
  bool act_quant;
  explicit Fp8GroupedLinear(const OrtKernelInfo* info)
      : act_quant(attr_int(info, "Fp8GroupedLinear", "act_quant") != 0) {}

  // x [..., G, K], w [G*R, K] -> y[..., g, r] = x[..., g, :] . w[g*R + r, :]
  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "Fp8GroupedLinear", node);
    const Tensor x = c.input(0, "x", F32), w = c.input(1, "w", U8), s = c.input(2, "w_scale", ANY);
    const QuantWeight qw = fp8_weight(c, w, s);
    c.require(x.rank() >= 2 && x.dim(-1) == qw.k, [&] {
      return "x must be [..., G, K] with K = w's last dim " + std::to_string(qw.k) + ", got " + shape_str(x.shape);
    });
    const int64_t g = x.dim(-2), k = qw.k;
    c.require(g > 0 && qw.n % g == 0, [&] {
      return "w rows (" + std::to_string(qw.n) + ") must be a multiple of the " + std::to_string(g) + " groups of x " +
             shape_str(x.shape);
    });
    const int64_t r = qw.n / g, rows = x.numel() / std::max<int64_t>(g * k, 1);
    Dims shape = x.shape;
    shape.back() = r;
    float* y = c.output<float>(0, shape);
    if (rows == 0 || r == 0) return;
    if (k == 0) return (void)std::fill(y, y + rows * g * r, 0.f);
    Scratch<float> xq;
    const float* xin = act_quant ? act_quant_rows(c, isa, x.f32(), rows * g, k, xq) : x.f32();
    std::vector<PreparedRows> prepared;
    for (int64_t gi = 0; gi < g; ++gi) prepared.emplace_back(isa, xin + gi * k, g * k, rows, k);
    const int64_t per = rows_per_task(r, rows, g), chunks = (r + per - 1) / per;
    c.parallel(g * chunks, double(rows + 1) * qw.n * k, [&](size_t t) {  // group gi's rows, its slice of x
      const int64_t gi = t / chunks, r0 = (t % chunks) * per;
      isa->linear(qw, xin + gi * k, g * k, rows, y, g * r, gi * r + r0, gi * r + std::min(r, r0 + per),
                  prepared[gi].data);
    });
  }
};

struct MoeExperts : Kernel {
  int64_t fmt;
  float swiglu_limit;
  bool act_quant, bf16;
  explicit MoeExperts(const OrtKernelInfo* info)
      : fmt(attr_int(info, "MoeExperts", "fmt")),
        swiglu_limit(attr_float(info, "MoeExperts", "swiglu_limit")),
        act_quant(attr_int(info, "MoeExperts", "act_quant") != 0),
        bf16(attr_int(info, "MoeExperts", "bf16") != 0) {
    if (fmt < kFp4 || fmt > kF32)
      throw std::runtime_error("dsv4.MoeExperts: attribute fmt must be 0 (fp4), 1 (fp8) or 2 (float), got " +
                               std::to_string(fmt));
  }

  // Stacked weights [E, N, K(/2)] -> one expert's QuantWeight; checks shapes and scales against (E, N, K).
  struct Stack {
    int32_t format;
    const uint8_t* data;
    QuantWeight scales;  // the stack's scales (float or e8m0), expert 0's
    int64_t e, n, k, w_stride, s_stride;
    QuantWeight at(int64_t i) const {
      QuantWeight w{format, data + i * w_stride, nullptr, n, k};
      if (scales.scale) w.scale = scales.scale + i * s_stride;
      if (scales.scale_e8m0) w.scale_e8m0 = scales.scale_e8m0 + i * s_stride;
      return w;
    }
  };

  Stack stack(const Context& c, const Tensor& w, const Tensor& s, int64_t e, int64_t n, int64_t k) const {
    const std::string what = std::string("input '") + w.name + "'";
    const Dims want_w = fmt == kFp4 ? Dims{e, n, k / 2} : Dims{e, n, k};
    c.require(w.type == (fmt == kF32 ? F32 : U8), [&] {
      return what + " must be " + (fmt == kF32 ? "float32" : "uint8") + " for fmt " + std::to_string(fmt) + ", got " +
             type_name(w.type);
    });
    c.require(w.shape == want_w,
              [&] { return what + " must be " + shape_str(want_w) + ", got " + shape_str(w.shape); });
    if (fmt == kFp4)
      c.require(k % kFp4Block == 0,
                [&] { return "fp4 experts need dims that are multiples of 32, got " + std::to_string(k); });
    Stack st{(int32_t)fmt, w.u8(), QuantWeight{}, e, n, k, 0, 0};
    st.w_stride = (fmt == kFp4 ? n * k / 2 : n * k) * (fmt == kF32 ? 4 : 1);
    if (fmt == kF32) return st;  // float experts carry no scales (model.Experts passes an empty tensor)
    const int64_t nb = (n + kFp8Block - 1) / kFp8Block, kb = (k + kFp8Block - 1) / kFp8Block;
    const Dims want_s = fmt == kFp4 ? Dims{e, n, k / kFp4Block} : Dims{e, nb, kb};
    c.require(s.shape == want_s, [&] {
      return std::string("input '") + s.name + "' must be " + shape_str(want_s) + ", got " + shape_str(s.shape);
    });
    st.scales = with_scales(c, QuantWeight{}, s);
    st.s_stride = want_s[1] * want_s[2];
    return st;
  }

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "MoeExperts", node);
    const Tensor x = c.input(0, "x", F32, 2), wts = c.input(1, "weights", F32, 2), ids = c.input(2, "indices", I64, 2);
    const Tensor w1 = c.input(3, "w1", ANY, 3), s1 = c.input(4, "s1", ANY), w3 = c.input(5, "w3", ANY, 3),
                 s3 = c.input(6, "s3", ANY), w2 = c.input(7, "w2", ANY, 3), s2 = c.input(8, "s2", ANY);
    const int64_t T = x.dim(0), D = x.dim(1), K = ids.dim(1), E = w1.dim(0), I = w1.dim(1);
    c.require(ids.dim(0) == T && wts.shape == ids.shape, [&] {
      return "weights " + shape_str(wts.shape) + " and indices " + shape_str(ids.shape) +
             " must both be [T, k] for x " + shape_str(x.shape);
    });
    const Stack up1 = stack(c, w1, s1, E, I, D), up3 = stack(c, w3, s3, E, I, D), down = stack(c, w2, s2, E, D, I);
    if (act_quant)
      c.require(D % kFp8Block == 0 && I % kFp8Block == 0, [&] {
        return "act_quant needs hidden (" + std::to_string(D) + ") and expert (" + std::to_string(I) +
               ") dims that are multiples of 128";
      });
    float* y = c.output<float>(0, {T, D});
    std::fill(y, y + T * D, 0.f);

    // picks grouped by expert, ascending; within an expert in (token, slot) order, as the reference loops
    Scratch<int64_t> count(E + 1, 0);
    const int64_t* idx = ids.i64();
    for (int64_t p = 0; p < T * K; ++p) {
      if (idx[p] < 0) continue;
      c.require(idx[p] < E, [&] {
        return "indices holds expert " + std::to_string(idx[p]) + ", the weights have " + std::to_string(E) +
               " experts";
      });
      ++count[idx[p] + 1];
    }
    for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];  // count[e]: first pick of expert e
    const int64_t P = count[E];
    if (P == 0 || D == 0) return;
    Scratch<int64_t> pick(P), fill(E);
    std::copy(count.begin(), count.end() - 1, fill.begin());
    for (int64_t p = 0; p < T * K; ++p)
      if (idx[p] >= 0) pick[fill[idx[p]]++] = p;  // flat (token * k + slot)

    // jobs: (expert, row range) over the used experts
    struct Job {
      int64_t e, r0, r1;
    };
    int64_t used = 0;
    for (int64_t e = 0; e < E; ++e) used += count[e + 1] > count[e];
    auto jobs_for = [&](int64_t rows) {  // ~64 jobs over all used experts together
      auto per = [&](int64_t e) { return rows_per_task(rows, count[e + 1] - count[e], used); };
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (count[e + 1] == count[e]) continue;
        const int64_t step = per(e);
        n += (rows + step - 1) / step;
      }
      Scratch<Job> jobs(n);
      n = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (count[e + 1] == count[e]) continue;
        const int64_t step = per(e);
        for (int64_t r0 = 0; r0 < rows; r0 += step) jobs[n++] = Job{e, r0, std::min(rows, r0 + step)};
      }
      return jobs;
    };

    // each expert's rows laid out once for the matrix loops (gate/up read x, down reads h)
    auto prepare = [&](const float* rows, int64_t k, std::vector<PreparedRows>& out) {
      out.resize(E);
      c.parallel(E, double(P) * k, [&](size_t e) {
        const int64_t p0 = count[e], m = count[e + 1] - p0;
        if (m) out[e] = PreparedRows(isa, rows + p0 * k, k, m, k);
      });
    };
    // Phase by phase, so a chunk's picks hold at most x, its prepared rows, gate, up and h at once, not all of
    // it until the end (the large blocks in use at once, prefill of 2 x 256 tokens at mini-1b's width: 44 -> 30
    // MiB; 8 x 256: 180 -> 126 MiB)
    Scratch<float> h(P * I);
    {
      // x rows of every pick, quantised if asked, in the kernel order of the weight format
      Scratch<float> xp(P * D);
      {
        Scratch<float> xq;
        const float* xs = act_quant ? act_quant_rows(c, isa, x.f32(), T, D, xq) : x.f32();
        c.parallel((P + 63) / 64, double(P) * D, [&](size_t t) {
          for (int64_t p = t * 64; p < std::min(P, (int64_t)(t + 1) * 64); ++p) {
            const float* src = xs + (pick[p] / K) * D;
            if (fmt == kFp4)
              fp4_order(src, xp.data() + p * D, D);
            else
              std::memcpy(xp.data() + p * D, src, D * sizeof(float));
          }
        });
      }

      std::vector<PreparedRows> x_rows;
      prepare(xp.data(), D, x_rows);

      Scratch<float> gate(P * I), up(P * I);
      const Scratch<Job> gu = jobs_for(I);
      c.parallel(gu.size(), 2.0 * (P + used) * I * D, [&](size_t t) {
        const Job& j = gu[t];
        const int64_t p0 = count[j.e], m = count[j.e + 1] - p0;
        isa->linear(up1.at(j.e), xp.data() + p0 * D, D, m, gate.data() + p0 * I, I, j.r0, j.r1, x_rows[j.e].data);
        isa->linear(up3.at(j.e), xp.data() + p0 * D, D, m, up.data() + p0 * I, I, j.r0, j.r1, x_rows[j.e].data);
      });

      // h = silu(gate) * up * routing weight, with the reference's clamps and roundings
      const float* rw = wts.f32();
      c.parallel((P + 15) / 16, 8.0 * P * I, [&](size_t t) {
        thread_local std::vector<float> tmp;
        tmp.resize(I);
        for (int64_t p = t * 16; p < std::min(P, (int64_t)(t + 1) * 16); ++p) {
          float* hp = tmp.data();
          isa->swiglu(gate.data() + p * I, up.data() + p * I, I, rw[pick[p]], swiglu_limit, bf16, hp);
          if (act_quant) fake_quant_fp8(isa, hp, hp, I, kFp8Block);
          if (fmt == kFp4)
            fp4_order(hp, h.data() + p * I, I);
          else
            std::memcpy(h.data() + p * I, hp, I * sizeof(float));
        }
      });
    }
    std::vector<PreparedRows> h_rows;
    prepare(h.data(), I, h_rows);
    Scratch<float> out(P * D);
    const Scratch<Job> dn = jobs_for(D);
    c.parallel(dn.size(), double(P + used) * I * D, [&](size_t t) {
      const Job& j = dn[t];
      const int64_t p0 = count[j.e], m = count[j.e + 1] - p0;
      isa->linear(down.at(j.e), h.data() + p0 * I, I, m, out.data() + p0 * D, D, j.r0, j.r1, h_rows[j.e].data);
    });

    // y[t] += each pick's output, experts ascending (the reference's index_add_ order); tokens in parallel
    Scratch<int64_t> order(P);  // picks sorted by token, stable: expert order kept within a token
    for (int64_t p = 0; p < P; ++p) order[p] = p;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return pick[a] / K < pick[b] / K; });
    Scratch<int64_t> start(T + 1, 0);
    for (int64_t p = 0; p < P; ++p) ++start[pick[p] / K + 1];
    for (int64_t t = 0; t < T; ++t) start[t + 1] += start[t];
    c.parallel((T + 15) / 16, double(P) * D, [&](size_t task) {
      for (int64_t t = task * 16; t < std::min(T, (int64_t)(task + 1) * 16); ++t)
        for (int64_t q = start[t]; q < start[t + 1]; ++q) {
          const float* o = out.data() + order[q] * D;
          float* yt = y + t * D;
          for (int64_t i = 0; i < D; ++i) yt[i] += round_bf16_if(bf16, o[i]);
        }
    });
  }
};

struct FakeQuantFp8 : Kernel {
  int64_t block;
  explicit FakeQuantFp8(const OrtKernelInfo* info) : block(attr_int(info, "FakeQuantFp8", "block")) {
    if (block <= 0) throw std::runtime_error("dsv4.FakeQuantFp8: attribute block must be positive");
  }

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "FakeQuantFp8", node);
    const Tensor x = c.input(0, "x", F32);
    c.require(x.rank() >= 1 && x.dim(-1) % block == 0, [&] {
      return "the last dim of x " + shape_str(x.shape) + " must be a multiple of block=" + std::to_string(block);
    });
    float* y = c.output<float>(0, x.shape);
    const int64_t n = x.numel(), chunk = std::max<int64_t>(block, 65536 / block * block);
    c.parallel((n + chunk - 1) / chunk, 4.0 * n, [&](size_t t) {
      const int64_t i0 = t * chunk;
      fake_quant_fp8(isa, x.f32() + i0, y + i0, std::min(chunk, n - i0), block);
    });
  }
};

// f(row of x, row of y) for every row of the last dim D, the rows split into tasks of ~16k values each.
template <typename F>
void each_row(const Context& c, const Tensor& x, float* y, int64_t D, double work, F&& f) {
  const int64_t rows = D ? x.numel() / D : 0, per = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  c.parallel((rows + per - 1) / per, work, [&](size_t t) {
    for (int64_t r = t * per; r < std::min(rows, (int64_t)(t + 1) * per); ++r) f(x.f32() + r * D, y + r * D);
  });
}

struct HadamardFp4 : Kernel {
  explicit HadamardFp4(const OrtKernelInfo*) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "HadamardFp4", node);
    const Tensor x = c.input(0, "x", F32);
    const int64_t d = x.rank() ? x.dim(-1) : 0;
    c.require(d >= 32 && (d & (d - 1)) == 0, [&] {
      return "the last dim of x " + shape_str(x.shape) + " must be a power of two >= 32 (Hadamard, FP4 blocks of 32)";
    });
    float* y = c.output<float>(0, x.shape);
    each_row(c, x, y, d, 8.0 * x.numel(), [&](const float* in, float* out) { hadamard_fp4(in, out, d); });
  }
};

// registry.pack_kv_fp8 / pack_fp4: float rows [..., d] -> packed uint8 rows of `width` bytes (quant.py's layouts),
// pack(row of x, packed row) for every row
template <typename F>
void pack_rows(const Context& c, const Tensor& x, int64_t d, int64_t width, F&& pack) {
  Dims shape = x.shape;
  shape.back() = width;
  uint8_t* y = c.output<uint8_t>(0, shape);
  c.parallel(x.numel() / d, 4.0 * x.numel(), [&](size_t r) { pack(x.f32() + r * d, y + r * width); });
}

struct PackKvFp8 : Kernel {
  int64_t rope;
  explicit PackKvFp8(const OrtKernelInfo* info) : rope(attr_int(info, "PackKvFp8", "rope_dim")) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "PackKvFp8", node);
    const Tensor x = c.input(0, "x", F32);
    const int64_t d = x.rank() ? x.dim(-1) : 0;
    c.require(rope > 0 && rope < d && (d - rope) % kKvScaleBlock == 0, [&] {
      return "rope_dim=" + std::to_string(rope) + " must leave a multiple of 64 non-RoPE dims of x " +
             shape_str(x.shape);
    });
    pack_rows(c, x, d, kv_row_bytes(d, rope), [&](const float* in, uint8_t* out) { pack_kv_row(in, d, rope, out); });
  }
};

struct PackFp4 : Kernel {
  explicit PackFp4(const OrtKernelInfo*) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "PackFp4", node);
    const Tensor x = c.input(0, "x", F32);
    const int64_t d = x.rank() ? x.dim(-1) : 0;
    c.require(d > 0 && d % 32 == 0,
              [&] { return "the last dim of x " + shape_str(x.shape) + " must be a multiple of 32"; });
    pack_rows(c, x, d, fp4_row_bytes(d), [&](const float* in, uint8_t* out) { pack_fp4_row(in, d, out); });
  }
};

// registry.rms_norm: y = (x * r) * w with r = 1 / sqrt(mean(x^2) + eps) per row of D. The squares are summed in
// double and the sum rounded once (torch sums them in fp32 lanes: the two agree within an fp32 ulp of the mean).
// With bf16 the input is rounded to bf16 as it is read and the result as it is written.
struct RmsNorm : Kernel {
  float eps;
  bool bf16;
  explicit RmsNorm(const OrtKernelInfo* info)
      : eps(attr_float(info, "RmsNorm", "eps")), bf16(attr_int(info, "RmsNorm", "bf16") != 0) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "RmsNorm", node);
    const Tensor x = c.input(0, "x", F32), w = c.input(1, "weight", F32, 1);
    const int64_t D = x.rank() ? x.dim(-1) : 0;
    c.require(x.rank() >= 1 && w.dim(0) == D,
              [&] { return "weight " + shape_str(w.shape) + " must be [D] for x " + shape_str(x.shape); });
    float* y = c.output<float>(0, x.shape);
    each_row(c, x, y, D, 3.0 * x.numel(), [&](const float* in, float* out) {
      for (int64_t i = 0; i < D; ++i) out[i] = round_bf16_if(bf16, in[i]);  // the input as read
      double sum = 0;
      for (int64_t i = 0; i < D; ++i) sum += (double)(out[i] * out[i]);
      const float r = 1.f / std::sqrt((float)sum / (float)D + eps);
      for (int64_t i = 0; i < D; ++i) out[i] = round_bf16_if(bf16, out[i] * r * w.f32()[i]);
    });
  }
};

// registry.head_rescale: x * r per row of D, r = 1 / sqrt(mean(x^2) + eps); with bf16 each step rounded to bf16
// (the squares, their mean, + eps, the reciprocal root, the product) as the reference's op-by-op bf16 path. The
// squares are summed in double (torch: fp32 lanes; the bf16 rounding of the mean hides the difference but for
// sums within an fp32 ulp of a bf16 midpoint).
struct HeadRescale : Kernel {
  float eps;
  bool bf16;
  explicit HeadRescale(const OrtKernelInfo* info)
      : eps(attr_float(info, "HeadRescale", "eps")), bf16(attr_int(info, "HeadRescale", "bf16") != 0) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "HeadRescale", node);
    const Tensor x = c.input(0, "x", F32);
    const int64_t D = x.rank() ? x.dim(-1) : 0;
    float* y = c.output<float>(0, x.shape);
    const auto rnd = [this](float v) { return round_bf16_if(bf16, v); };
    each_row(c, x, y, D, 3.0 * x.numel(), [&](const float* in, float* out) {
      double sum = 0;
      for (int64_t i = 0; i < D; ++i) sum += (double)rnd(in[i] * in[i]);
      const float r = rnd(1.f / std::sqrt(rnd(rnd((float)sum / (float)D) + eps)));
      for (int64_t i = 0; i < D; ++i) out[i] = rnd(in[i] * r);
    });
  }
};

// registry.rope: x [B, S, ..., D], the trailing r = 2 * len(freqs) dims turned as interleaved pairs by
// pos[b, s] * freqs[i] (an fp32 product). cos and sin are taken in double and rounded once to float: within half
// an fp32 ulp of the true values, where torch's fp32 cos/sin (the reference) are within one. One task per
// position: its r/2 angles serve every head of that position.
struct Rope : Kernel {
  bool inverse, bf16;
  explicit Rope(const OrtKernelInfo* info)
      : inverse(attr_int(info, "Rope", "inverse") != 0), bf16(attr_int(info, "Rope", "bf16") != 0) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "Rope", node);
    const Tensor x = c.input(0, "x", F32), freqs = c.input(1, "freqs", F32, 1), pos = c.input(2, "pos", I64, 2);
    c.require(x.rank() >= 3 && x.dim(0) == pos.dim(0) && x.dim(1) == pos.dim(1),
              [&] { return "x " + shape_str(x.shape) + " must be [B, S, ..., D] for pos " + shape_str(pos.shape); });
    const int64_t half = freqs.dim(0), r = 2 * half, D = x.dim(-1);
    c.require(r <= D, [&] {
      return "x's last dim (" + std::to_string(D) + ") must hold the " + std::to_string(r) + " rotated dims of " +
             std::to_string(half) + " frequencies";
    });
    float* y = c.output<float>(0, x.shape);
    const int64_t positions = pos.numel(), rows = positions ? x.numel() / (positions * D) : 0, keep = D - r;
    const float sign = inverse ? -1.f : 1.f;
    c.parallel(positions, 6.0 * x.numel(), [&](size_t t) {
      thread_local std::vector<float> cs;  // one position's cos, sin pairs
      cs.resize(2 * half);
      const float p = (float)pos.i64()[t];
      for (int64_t i = 0; i < half; ++i) {
        const double angle = (double)(p * freqs.f32()[i]);
        cs[2 * i] = (float)std::cos(angle);
        cs[2 * i + 1] = sign * (float)std::sin(angle);
      }
      for (int64_t m = 0; m < rows; ++m) {
        const float* in = x.f32() + (t * rows + m) * D;
        float* out = y + (t * rows + m) * D;
        for (int64_t i = 0; i < keep; ++i) out[i] = round_bf16_if(bf16, in[i]);
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = in[keep + 2 * i], x1 = in[keep + 2 * i + 1], cos = cs[2 * i], sin = cs[2 * i + 1];
          const float y0 = x0 * cos - x1 * sin, y1 = x0 * sin + x1 * cos;  // no FMA: -ffp-contract=off
          out[keep + 2 * i] = round_bf16_if(bf16, y0);
          out[keep + 2 * i + 1] = round_bf16_if(bf16, y1);
        }
      }
    });
  }
};

// The key rows come in two parts, kv (window ring and the step's tokens) and cmp (compressed entries, a cache as long
// as the context allows), read where they are: joining them would copy all of cmp every step. Packed FP8 rows
// (kv_rope > 0) are unpacked once per call into a float buffer the head groups share, and the float kernel runs on
// it (the same values, so the same result as float rows): every row of both parts when there are no more rows than
// picks (prefill; HCA decode), else each query's picks in pick order (long-context decode).
struct SparseAttn : Kernel {
  float scale;
  bool bf16;
  int64_t kv_rope;
  explicit SparseAttn(const OrtKernelInfo* info)
      : scale(attr_float(info, "SparseAttn", "scale")), bf16(attr_int(info, "SparseAttn", "bf16") != 0),
        kv_rope(attr_int(info, "SparseAttn", "kv_rope")) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "SparseAttn", node);
    const Tensor q = c.input(0, "q", F32, 4), kv = c.cache_rows(1, "kv", 3), cmp = c.cache_rows(2, "cmp", 3),
                 sink = c.input(3, "sink", F32, 1), idx = c.input(4, "idx", I64, 3);
    const int64_t B = q.dim(0), S = q.dim(1), H = q.dim(2), D = q.dim(3), N = kv.dim(1), M = cmp.dim(1),
                  K = idx.dim(2);
    const bool packed = kv.type == U8;
    c.require(packed == (kv_rope > 0), [&] {
      return "kv must be packed uint8 rows exactly when attribute kv_rope > 0 (kv_rope=" + std::to_string(kv_rope) +
             ", kv " + type_name(kv.type) + ")";
    });
    const int64_t width = packed ? kv_row_bytes(D, kv_rope) : D;
    c.require(!packed || (kv_rope < D && (D - kv_rope) % kKvScaleBlock == 0), [&] {
      return "kv_rope=" + std::to_string(kv_rope) +
             " must leave a multiple of 64 non-RoPE dims of D=" + std::to_string(D);
    });
    c.require(kv.dim(0) == B && kv.dim(2) == width, [&] {
      return "kv " + shape_str(kv.shape) + " must be [B, N, " + std::to_string(width) + "] for q " + shape_str(q.shape);
    });
    c.require(cmp.type == kv.type && cmp.dim(0) == B && cmp.dim(2) == width, [&] {
      return "cmp " + std::string(type_name(cmp.type)) + " " + shape_str(cmp.shape) + " must be " + type_name(kv.type) +
             " [B, M, " + std::to_string(width) + "] like kv";
    });
    c.require(sink.dim(0) == H,
              [&] { return "sink " + shape_str(sink.shape) + " must be [H] = [" + std::to_string(H) + "]"; });
    c.require(idx.dim(0) == B && idx.dim(1) == S,
              [&] { return "idx " + shape_str(idx.shape) + " must be [B, S, K] for q " + shape_str(q.shape); });
    const int64_t* ix = idx.i64();
    for (int64_t i = 0; i < idx.numel(); ++i)
      c.require(ix[i] < N + M, [&] {
        return "idx holds row " + std::to_string(ix[i]) + ", kv and cmp have " + std::to_string(N) + " + " +
               std::to_string(M) + " rows";
      });
    float* out = c.output<float>(0, q.shape);
    auto packed_row = [&](int64_t b, int64_t r) {  // row r of batch b's [kv | cmp]
      return r < N ? kv.u8() + (b * N + r) * width : cmp.u8() + (b * M + r - N) * width;
    };
    const bool whole = packed && N + M <= S * K;
    // unpacked rows: [B, N + M, D] (whole) or [B, S, K, D] (each query's picks), as bf16 bits where bf16 holds
    // every value, else as float. Half the bytes to write and read again: mini-1b's decode at batch 8 (Zen 4),
    // CSA 0.89 -> 0.77 ms per call, HCA 0.55 -> 0.46; the same values, so the same results.
    Scratch<uint16_t> values16;
    Scratch<float> values;
    Scratch<int64_t> order;  // picks into the latter: 0 .. K-1 per query, -1 kept
    bool rows16 = false;
    if (packed) {
      const int64_t rows = whole ? B * (N + M) : B * S * K, per = 16;
      if (!whole) {
        order.resize(B * S * K);
        for (int64_t i = 0; i < B * S * K; ++i) order[i] = ix[i] < 0 ? -1 : i % K;
      }
      auto unpack = [&](auto* out, auto row_fn) {  // every row (whole) or each named pick into out[r * D ..]
        c.parallel((rows + per - 1) / per, 2.0 * rows * D, [&](size_t t) {
          for (int64_t r = t * per; r < std::min(rows, (int64_t)(t + 1) * per); ++r) {
            if (whole)
              row_fn(packed_row(r / (N + M), r % (N + M)), out + r * D);
            else if (ix[r] >= 0)
              row_fn(packed_row(r / (S * K), ix[r]), out + r * D);
          }
        });
      };
      values16.resize(rows * D);
      std::fill(values16.begin(), values16.end(), 0);  // rows no pick names stay defined
      std::atomic<bool> exact{true};
      unpack(values16.data(), [&](const uint8_t* row, uint16_t* out) {
        if (!unpack_kv_row_bf16(row, D, kv_rope, out)) exact.store(false, std::memory_order_relaxed);
      });
      rows16 = exact.load();
      if (!rows16) {
        values16 = Scratch<uint16_t>();
        values.resize(rows * D);
        std::fill(values.begin(), values.end(), 0.f);
        unpack(values.data(), [&](const uint8_t* row, float* out) { unpack_kv_row(row, D, kv_rope, out); });
      }
    }
    const int64_t groups = (H + 3) / 4;  // tasks: (query position, 4 heads): decode still spreads over threads
    c.parallel(B * S * groups, 2.0 * B * S * H * K * D, [&](size_t t) {
      thread_local std::vector<float> scratch;
      scratch.resize(4 * (64 + D));
      const int64_t bs = t / groups, h0 = (t % groups) * 4, b = bs / S;
      // the rows the picks index: the two parts as stored, or one unpacked part (batch b's kv rows then its cmp
      // rows; or this query's picks in order)
      const void* rows = kv.row(b * N);
      const void* cmp_rows = cmp.row(b * M);
      int64_t n_rows = N;
      const int64_t* picks = ix + bs * K;
      if (packed) {
        const int64_t first = whole ? b * (N + M) * D : bs * K * D;
        rows = rows16 ? (const void*)(values16.data() + first) : (const void*)(values.data() + first);
        cmp_rows = nullptr;
        n_rows = whole ? N + M : K;
        if (!whole) picks = order.data() + bs * K;
      }
      isa->sparse_attn_query(q.f32() + bs * H * D, rows, n_rows, cmp_rows, packed ? rows16 : kv.type == BF16, picks,
                             K, sink.f32(), h0, std::min(H, h0 + 4), D, scale, bf16, out + bs * H * D,
                             scratch.data());
    });
  }
};

// Indexer scores of query bs (of [B, S]) for entries [n0, n1) into scores[n0 .. n1): packed FP4 keys (uint8 rows)
// are unpacked into a float buffer first (the same values as the simulation's).
void indexer_scores_range(const IsaKernels* isa, const Tensor& q, const Tensor& k, const Tensor& w, int64_t bs,
                          int64_t n0, int64_t n1, bool bf16, float* scores) {
  const int64_t S = q.dim(1), Hh = q.dim(2), D = q.dim(3), N = k.dim(1), b = bs / S;
  const float* qs = q.f32() + bs * Hh * D;
  const float* ws = w.f32() + bs * Hh;
  if (k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    isa->indexer_scores(qs, ws, Hh, k.row(b * N), k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, D, n0, n1, bf16,
                        scores);
    return;
  }
  thread_local std::vector<float> keys;
  keys.resize((n1 - n0) * D);
  for (int64_t j = n0; j < n1; ++j) unpack_fp4_row(k.u8() + (b * N + j) * k.dim(2), D, keys.data() + (j - n0) * D);
  isa->indexer_scores(qs, ws, Hh, keys.data(), false, D, 0, n1 - n0, bf16, scores + n0);
}

// k rows as IndexerTopK / IndexerScores take them: [B, N, d] values or [B, N, d/2 + d/32] packed FP4 rows
void require_index_keys(const Context& c, const Tensor& q, const Tensor& k) {
  const int64_t D = q.dim(3), width = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? fp4_row_bytes(D) : D;
  c.require(D % 32 == 0 || k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "packed FP4 keys need d a multiple of 32");
  c.require(k.dim(0) == q.dim(0) && k.dim(2) == width, [&] {
    return "k " + shape_str(k.shape) + " must be [B, N, " + std::to_string(width) + "] for q " + shape_str(q.shape);
  });
}

struct IndexerTopK : Kernel {
  int64_t topk;
  bool bf16;
  explicit IndexerTopK(const OrtKernelInfo* info)
      : topk(attr_int(info, "IndexerTopK", "topk")), bf16(attr_int(info, "IndexerTopK", "bf16") != 0) {
    if (topk < 0) throw std::runtime_error("dsv4.IndexerTopK: attribute topk must be >= 0");
  }

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "IndexerTopK", node);
    const Tensor q = c.input(0, "q", F32, 4), k = c.cache_rows(1, "k", 3), w = c.input(2, "w", F32, 3),
                 nv = c.input(3, "n_visible", I64, 2);
    const int64_t B = q.dim(0), S = q.dim(1), Hh = q.dim(2), D = q.dim(3), N = k.dim(1), Kout = std::min(topk, N);
    require_index_keys(c, q, k);
    c.require(w.shape == Dims{B, S, Hh},
              [&] { return "w " + shape_str(w.shape) + " must be [B, S, h] for q " + shape_str(q.shape); });
    c.require(nv.shape == Dims{B, S}, [&] { return "n_visible " + shape_str(nv.shape) + " must be [B, S]"; });
    int64_t* out = c.output<int64_t>(0, {B, S, Kout});
    if (B * S * Kout == 0) return;
    auto visible = [&](int64_t bs) { return std::clamp<int64_t>(nv.i64()[bs], 0, N); };

    // scores of the visible entries, tasks of (query, 256 entries)
    Scratch<float> scores(B * S * N);
    const int64_t chunk = 256, chunks = (N + chunk - 1) / chunk;
    c.parallel(B * S * chunks, double(B) * S * N * Hh * D, [&](size_t t) {
      const int64_t bs = t / chunks, n0 = (t % chunks) * chunk, n1 = std::min(visible(bs), n0 + chunk);
      if (n0 >= n1) return;
      indexer_scores_range(isa, q, k, w, bs, n0, n1, bf16, scores.data() + bs * N);
    });

    // top-K per query: descending score, ties lower entry first (NaN counts as largest, as torch's sort);
    // hidden entries come last in the reference and become -1
    c.parallel(B * S, 4.0 * B * S * N, [&](size_t bs) {
      const float* sc = scores.data() + bs * N;
      const int64_t vis = visible(bs), take = std::min(Kout, vis);
      Scratch<int64_t> ids(vis);
      for (int64_t j = 0; j < vis; ++j) ids[j] = j;
      auto before = [sc](int64_t a, int64_t b) {
        const bool na = std::isnan(sc[a]), nb = std::isnan(sc[b]);
        if (na != nb) return na;
        if (!na && sc[a] != sc[b]) return sc[a] > sc[b];
        return a < b;
      };
      std::partial_sort(ids.begin(), ids.begin() + take, ids.end(), before);
      int64_t* o = out + bs * Kout;
      for (int64_t j = 0; j < Kout; ++j) o[j] = j < take ? ids[j] : -1;
    });
  }
};

// The indexer's scores over the heads it is given, every entry (no mask, no top-k): a tensor-parallel rank's
// head-partial scores, all-reduced before the top-k. The same inner loop as IndexerTopK's scores.
struct IndexerScores : Kernel {
  bool bf16;
  explicit IndexerScores(const OrtKernelInfo* info) : bf16(attr_int(info, "IndexerScores", "bf16") != 0) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "IndexerScores", node);
    const Tensor q = c.input(0, "q", F32, 4), k = c.cache_rows(1, "k", 3), w = c.input(2, "w", F32, 3);
    const int64_t B = q.dim(0), S = q.dim(1), Hh = q.dim(2), D = q.dim(3), N = k.dim(1);
    require_index_keys(c, q, k);
    c.require(w.shape == Dims{B, S, Hh},
              [&] { return "w " + shape_str(w.shape) + " must be [B, S, h] for q " + shape_str(q.shape); });
    float* out = c.output<float>(0, {B, S, N});
    const int64_t chunk = 256, chunks = (N + chunk - 1) / chunk;  // tasks: (query, 256 entries)
    c.parallel(B * S * chunks, double(B) * S * N * Hh * D, [&](size_t t) {
      const int64_t bs = t / chunks, n0 = (t % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      indexer_scores_range(isa, q, k, w, bs, n0, n1, bf16, out + bs * N);
    });
  }
};

struct CompressPool : Kernel {
  int64_t ratio;
  bool overlap;
  explicit CompressPool(const OrtKernelInfo* info)
      : ratio(attr_int(info, "CompressPool", "ratio")), overlap(attr_int(info, "CompressPool", "overlap") != 0) {
    if (ratio <= 0) throw std::runtime_error("dsv4.CompressPool: attribute ratio must be positive");
  }

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "CompressPool", node);
    const Tensor kv = c.input(0, "kv", F32, 3), score = c.input(1, "score", F32, 3), ends = c.input(2, "ends", I64, 2);
    const int64_t B = kv.dim(0), L = kv.dim(1), cd = kv.dim(2), groups = overlap ? 2 : 1, d = cd / groups;
    const int64_t K = ends.dim(1), span = groups * ratio;
    c.require(cd % groups == 0, [&] { return "kv's last dim " + std::to_string(cd) + " must be 2 * d with overlap"; });
    c.require(score.shape == kv.shape,
              [&] { return "score " + shape_str(score.shape) + " must match kv " + shape_str(kv.shape); });
    c.require(ends.dim(0) == B,
              [&] { return "ends " + shape_str(ends.shape) + " must be [B, K] for kv " + shape_str(kv.shape); });
    float* out = c.output<float>(0, {B, K, d});
    const int64_t* e = ends.i64();
    for (int64_t i = 0; i < B * K; ++i)
      if (e[i] >= 0)
        c.require(std::max(e[i], span - 1) < L, [&] {
          return "ends holds row " + std::to_string(e[i]) + ": its window of " + std::to_string(span) +
                 " rows does not fit kv's " + std::to_string(L) + " rows";
        });
    const int64_t chunk = 64, chunks = (d + chunk - 1) / chunk;  // tasks: (entry, 64 channels)
    c.parallel(B * K * chunks, 8.0 * B * K * span * d, [&](size_t task) {
      const int64_t t = task / chunks, c0 = (task % chunks) * chunk, nc = std::min(chunk, d - c0);
      float* o = out + t * d + c0;
      if (e[t] < 0) return (void)std::fill(o, o + nc, 0.f);
      thread_local std::vector<float> scratch;
      scratch.resize((span + 2) * nc);
      // candidate j: row first + j; channels [0, d) for the previous window (overlap), [d, 2d) for its own rows
      const int64_t row0 = (t / K * L + std::max(e[t], span - 1) - span + 1) * cd + c0;
      isa->pool_channels(kv.f32() + row0, score.f32() + row0, cd, span, ratio, overlap ? d : 0, nc, o,
                         scratch.data());
    });
  }
};

struct HcPre : Kernel {
  int64_t iters;
  float norm_eps, hc_eps;
  explicit HcPre(const OrtKernelInfo* info)
      : iters(attr_int(info, "HcPre", "iters")),
        norm_eps(attr_float(info, "HcPre", "norm_eps")),
        hc_eps(attr_float(info, "HcPre", "hc_eps")) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "HcPre", node);
    const Tensor x = c.input(0, "x", F32, 4), fn = c.input(1, "fn", F32, 2), scale = c.input(2, "scale", F32, 1),
                 base = c.input(3, "base", F32, 1);
    const int64_t B = x.dim(0), S = x.dim(1), n = x.dim(2), D = x.dim(3), nmix = (2 + n) * n;
    c.require(n >= 1 && n <= 64, [&] { return "x " + shape_str(x.shape) + ": the stream count n must be in [1, 64]"; });
    c.require(fn.shape == Dims{nmix, n * D},
              [&] { return "fn " + shape_str(fn.shape) + " must be [(2+n)n, nD] = " + shape_str({nmix, n * D}); });
    c.require(scale.dim(0) == 3, [&] { return "scale " + shape_str(scale.shape) + " must be [3]"; });
    c.require(base.dim(0) == nmix,
              [&] { return "base " + shape_str(base.shape) + " must be [(2+n)n] = [" + std::to_string(nmix) + "]"; });
    float* y = c.output<float>(0, {B, S, D});
    float* post = c.output<float>(1, {B, S, n});
    float* comb = c.output<float>(2, {B, S, n, n});
    c.parallel(B * S, double(B) * S * nmix * n * D, [&](size_t t) {
      thread_local std::vector<float> mix;
      mix.resize(nmix);
      isa->hc_pre_token(x.f32() + t * n * D, fn.f32(), scale.f32(), base.f32(), n, D, iters, norm_eps, hc_eps,
                        y + t * D, post + t * n, comb + t * n * n, mix.data());
    });
  }
};

struct HcPost : Kernel {
  explicit HcPost(const OrtKernelInfo*) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "HcPost", node);
    const Tensor f = c.input(0, "f", F32, 3), res = c.input(1, "res", F32, 4), post = c.input(2, "post", F32, 3),
                 comb = c.input(3, "comb", F32, 4);
    const int64_t B = res.dim(0), S = res.dim(1), n = res.dim(2), D = res.dim(3);
    c.require(f.shape == Dims{B, S, D},
              [&] { return "f " + shape_str(f.shape) + " must be [B, S, D] for res " + shape_str(res.shape); });
    c.require(post.shape == Dims{B, S, n}, [&] { return "post " + shape_str(post.shape) + " must be [B, S, n]"; });
    c.require(comb.shape == Dims{B, S, n, n},
              [&] { return "comb " + shape_str(comb.shape) + " must be [B, S, n, n]"; });
    float* out = c.output<float>(0, res.shape);
    c.parallel(B * S, double(B) * S * (n + 2) * n * D, [&](size_t t) {
      isa->hc_post_token(f.f32() + t * D, res.f32() + t * n * D, post.f32() + t * n, comb.f32() + t * n * n, n, D,
                         out + t * n * D);
    });
  }
};

// ---- collectives ----------------------------------------------------------------------------------------------
// AllReduce / AllGather talk to the other ranks of a mesh, which this library cannot reach by itself: the runtime
// that connected the ranks installs a process-global callback (dsv4_set_collective, below) and the kernels hand it
// their buffers. Every rank runs the same graph in ORT's sequential execution mode, so every rank calls the
// callback for the same nodes in the same order. Without a callback the kernel fails naming the op: a rank that
// skipped a collective would leave the others waiting forever, and returning the input would be a wrong answer.
constexpr int32_t kCollectiveAllReduce = 0, kCollectiveAllGather = 1;

// (op, group, size, x, y, shape of x, rank of x, error buffer, its length) -> 0, or non-zero with a message
using CollectiveFn = int32_t (*)(int32_t, int64_t, int64_t, const float*, float*, const int64_t*, int64_t, char*,
                                 size_t);
std::atomic<CollectiveFn> collective_fn{nullptr};

void run_collective(const Context& c, int32_t op, int64_t group, int64_t size, const Tensor& x, float* y) {
  const CollectiveFn fn = collective_fn.load();
  if (!fn)
    c.fail("no collective callback is installed in this process: the node exchanges data with the other ranks of "
           "a mesh, which only the mesh runtime connects (load the artifact with dsv4c's Engine.load, or the "
           "torchrun entry point `python -m dsv4c.runtime.mesh`)");
  char error[2048] = {0};
  if (fn(op, group, size, x.f32(), y, x.shape.data(), x.rank(), error, sizeof(error) - 1) != 0)
    c.fail(std::string("the collective failed: ") + (error[0] ? error : "no message"));
}

struct AllReduce : Kernel {
  int64_t group;
  explicit AllReduce(const OrtKernelInfo* info) : group(attr_int(info, "AllReduce", "group")) {}

  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "AllReduce", node);
    const Tensor x = c.input(0, "x", F32);
    run_collective(c, kCollectiveAllReduce, group, 1, x, c.output<float>(0, x.shape));
  }
};

struct AllGather : Kernel {
  int64_t group, size;
  explicit AllGather(const OrtKernelInfo* info)
      : group(attr_int(info, "AllGather", "group")), size(attr_int(info, "AllGather", "size")) {
    if (size < 1) throw std::runtime_error("dsv4.AllGather: attribute size must be >= 1");
  }

  // x [..., n] of every rank of the group -> [..., size * n], rank order along the last dim
  void compute(OrtKernelContext* ctx) override {
    Context c(ctx, "AllGather", node);
    const Tensor x = c.input(0, "x", F32);
    c.require(x.rank() >= 1, "x must have rank >= 1, got a scalar");
    Dims shape = x.shape;
    shape.back() *= size;
    run_collective(c, kCollectiveAllGather, group, size, x, c.output<float>(0, shape));
  }
};

// ---- registration ---------------------------------------------------------------------------------------------
// One OrtCustomOp per op type; ORT calls these function pointers (C ABI) with the op as `this_`.
struct OpEntry : OrtCustomOp {
  const char* name;
  std::vector<ONNXTensorElementDataType> inputs, outputs;
  Kernel* (*create)(const OrtKernelInfo*);

  OpEntry(const char* op_name, std::vector<ONNXTensorElementDataType> in,
          std::vector<ONNXTensorElementDataType> out, Kernel* (*factory)(const OrtKernelInfo*))
      : OrtCustomOp{}, name(op_name), inputs(std::move(in)), outputs(std::move(out)), create(factory) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp* op) { return self(op)->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
    GetInputTypeCount = [](const OrtCustomOp* op) { return self(op)->inputs.size(); };
    GetInputType = [](const OrtCustomOp* op, size_t i) { return self(op)->inputs[i]; };  // UNDEFINED: any type
    GetOutputTypeCount = [](const OrtCustomOp* op) { return self(op)->outputs.size(); };
    GetOutputType = [](const OrtCustomOp* op, size_t i) { return self(op)->outputs[i]; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1; };  // dsv4 domain version 1
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                        void** kernel) -> OrtStatusPtr {
      try {
        Kernel* created = self(op)->create(info);
        try {
          created->node.inline_work = inline_work();
          created->node.constants.read(info);
          created->node.round_output = optional_attr_int(info, "round_bf16_out", 0) != 0;
        } catch (...) {
          delete created;
          throw;
        }
        *kernel = created;
        return nullptr;
      } catch (const std::exception& e) {
        return api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      try {
        Kernel* k = static_cast<Kernel*>(kernel);
        k->compute(ctx);
        if (weight_pages.enabled())
          for (size_t i = 0; i < k->node.constants.constant.size(); ++i)
            if (k->node.constants.constant[i]) weight_pages.drop(k->node.constants.tensors[i]);
        return nullptr;
      } catch (const std::exception& e) {
        return api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
      }
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    // an output of any type (CacheWrite: the cache's own) is typed like input 0; ORT needs this to type an
    // output when more than one input has a dynamic type (the written rows come in the cache's type too)
    if (!outputs.empty() && outputs[0] == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
      InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
        OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
        if (OrtStatus* st = api->ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return st;
        return api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
      };
  }

  static const OpEntry* self(const OrtCustomOp* op) { return static_cast<const OpEntry*>(op); }
};

template <typename K>
Kernel* make(const OrtKernelInfo* info) {
  return new K(info);
}

std::vector<OpEntry>& ops() {
  static std::vector<OpEntry> table = [] {
    std::vector<OpEntry> t;
    t.reserve(15);
    t.emplace_back("Fp8Linear", std::vector{F32, U8, ANY}, std::vector{F32}, make<Fp8Linear>);
    t.emplace_back("Bf16Linear", std::vector{F32, BF16}, std::vector{F32}, make<Bf16Linear>);
    t.emplace_back("Fp8GroupedLinear", std::vector{F32, U8, ANY}, std::vector{F32}, make<Fp8GroupedLinear>);
    t.emplace_back("MoeExperts", std::vector{F32, F32, I64, ANY, ANY, ANY, ANY, ANY, ANY}, std::vector{F32},
                   make<MoeExperts>);
    t.emplace_back("FakeQuantFp8", std::vector{F32}, std::vector{F32}, make<FakeQuantFp8>);
    t.emplace_back("HadamardFp4", std::vector{F32}, std::vector{F32}, make<HadamardFp4>);
    t.emplace_back("PackKvFp8", std::vector{F32}, std::vector{U8}, make<PackKvFp8>);
    t.emplace_back("PackFp4", std::vector{F32}, std::vector{U8}, make<PackFp4>);
    t.emplace_back("RmsNorm", std::vector{F32, F32}, std::vector{F32}, make<RmsNorm>);
    t.emplace_back("HeadRescale", std::vector{F32}, std::vector{F32}, make<HeadRescale>);
    t.emplace_back("Rope", std::vector{F32, F32, I64}, std::vector{F32}, make<Rope>);
    t.emplace_back("SparseAttn", std::vector{F32, ANY, ANY, F32, I64}, std::vector{F32}, make<SparseAttn>);
    t.emplace_back("IndexerTopK", std::vector{F32, ANY, F32, I64}, std::vector{I64}, make<IndexerTopK>);
    t.emplace_back("IndexerScores", std::vector{F32, ANY, F32}, std::vector{F32}, make<IndexerScores>);
    t.emplace_back("CompressPool", std::vector{F32, F32, I64}, std::vector{F32}, make<CompressPool>);
    t.emplace_back("HcPre", std::vector{F32, F32, F32, F32}, std::vector{F32, F32, F32}, make<HcPre>);
    t.emplace_back("CacheWrite", std::vector{ANY, ANY, I64}, std::vector{ANY}, make<CacheWrite>);
    t.emplace_back("HcPost", std::vector{F32, F32, F32, F32}, std::vector{F32}, make<HcPost>);
    t.emplace_back("AllReduce", std::vector{F32}, std::vector{F32}, make<AllReduce>);
    t.emplace_back("AllGather", std::vector{F32}, std::vector{F32}, make<AllGather>);
    return t;
  }();
  return table;
}

}  // namespace
}  // namespace dsv4

extern "C" {

// Called by ORT for SessionOptions.register_custom_ops_library(path): adds the "dsv4" domain with every op.
// The domain is created once and lives as long as the library (every session that registered it shares it).
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  using namespace dsv4;
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* init_error = nullptr;
  std::call_once(once, [&] {
    api = api_base->GetApi(ORT_API_VERSION);
    if (!api) return;
    init_error = api->CreateCustomOpDomain("dsv4", &domain);
    for (OpEntry& op : ops())
      if (!init_error) init_error = api->CustomOpDomain_Add(domain, &op);
  });
  if (!api) return nullptr;  // cannot even report: this ORT is older than the headers (ORT_API_VERSION)
  if (init_error) return api->CreateStatus(ORT_FAIL, api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}

// Which inner loops this CPU gets ("avx2" or "generic"); for tests and benchmarks (ctypes).
__attribute__((visibility("default"))) const char* dsv4_kernels_isa(void) {
  try {
    return dsv4::select_isa()->name;
  } catch (const std::exception&) {
    return "unavailable";
  }
}

// Unmaps the large scratch blocks the kernels keep for reuse (LargeBlocks above); any time: a block in use is not
// in the cache.
__attribute__((visibility("default"))) void dsv4_release_scratch(void) { dsv4::large_blocks.release(); }

// The most bytes of kernel scratch (Scratch blocks) held at once since the last reset, which `reset` != 0 starts
// anew from what is held now; for tests and benchmarks (ctypes).
__attribute__((visibility("default"))) int64_t dsv4_scratch_high_water(int reset) {
  return dsv4::scratch_use.high_water(reset != 0);
}

// Give back each node's weight pages after it ran, for weights inside these read-only file mappings (WeightPages
// above); n = 0 stops. Call it between runs.
__attribute__((visibility("default"))) void dsv4_drop_weight_pages(const uintptr_t* starts, const size_t* sizes,
                                                                    int64_t n) {
  dsv4::weight_pages.set(starts, sizes, n);
}

// The collective callback of this process (see "collectives" above); nullptr removes it. The mesh runtime sets it
// (ctypes) once per rank before the first run; it is called from the thread that runs the ORT session.
__attribute__((visibility("default"))) void dsv4_set_collective(dsv4::CollectiveFn fn) {
  dsv4::collective_fn.store(fn);
}
}
