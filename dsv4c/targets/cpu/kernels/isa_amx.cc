// The dsv4 inner loops of isa_avx512bf16.cc plus AMX-BF16 tile products for the linears' 5+ row calls; built
// with those flags and -mamx-tile -mamx-bf16, and only called after ops.cc has checked the CPU and obtained the
// kernel's permission to use the tile registers (see kernels_impl.h).
#if !defined(__AMX_BF16__) || !defined(__AMX_TILE__) || !defined(__AVX512BF16__)
#error "isa_amx.cc must be compiled with the isa_avx512bf16.cc flags and -mamx-tile -mamx-bf16"
#endif
#define DSV4_ISA amx
#include "kernels_impl.h"
