// The dsv4 inner loops for any x86-64 / other CPU: the compiler's baseline instruction set (see kernels_impl.h).
#define DSV4_ISA generic
#include "kernels_impl.h"
