// The dsv4 inner loops with AVX2 + FMA + F16C; built with -mavx2 -mfma -mf16c and only called after ops.cc has
// checked the CPU for those features (see kernels_impl.h).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "isa_avx2.cc must be compiled with -mavx2 -mfma -mf16c"
#endif
#define DSV4_ISA avx2
#include "kernels_impl.h"
