// The dsv4 inner loops with AVX-512 BF16 (vdpbf16ps) for FP4, BF16 and FP8 weights against bf16-valued x rows, and
// the AVX2 loops for the rest; built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 plus the AVX2
// flags, and only called after ops.cc has checked the CPU for all of them (see kernels_impl.h).
#if !defined(__AVX512BF16__) || !defined(__AVX512BW__) || !defined(__AVX2__) || !defined(__F16C__)
#error "isa_avx512bf16.cc needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx2 -mfma -mf16c"
#endif
#define DSV4_ISA avx512bf16
#include "kernels_impl.h"
