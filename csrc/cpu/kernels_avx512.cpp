// The CPU kernels built for AVX-512 (F, BW, VL, DQ, as PyTorch's own AVX512 kernels) in a build
// with baseline compiler flags: the instruction set is switched for this translation
// unit only, after isa_prelude.h (read it for why the order matters), and the table is
// used only when cpu_kernels() finds the CPU supports it. GCC on x86-64 only; elsewhere
// kernels_avx512() returns nullptr and the DEFAULT kernels run.
#include "isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RESATTN_BUILD_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// sleef.h declares its vector functions only under the ISA macros, which the target
// pragma does not define: define them around that one header of declarations.
#ifndef __AVX__
#define __AVX__ 1
#define RESATTN_UNDEF__AVX__
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define RESATTN_UNDEF__AVX512F__
#endif
#define SLEEF_STATIC_LIBS
#include <sleef.h>
#ifdef RESATTN_UNDEF__AVX__
#undef __AVX__
#undef RESATTN_UNDEF__AVX__
#endif
#ifdef RESATTN_UNDEF__AVX512F__
#undef __AVX512F__
#undef RESATTN_UNDEF__AVX512F__
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "attention_residual_kernel.h"
#include "batch_norm_relu_kernel.h"
#include "upsample_bilinear_add_kernel.h"
#pragma GCC pop_options
#endif

namespace resattn {
namespace cpu {

const CpuKernels* kernels_avx512() {
#ifdef RESATTN_BUILD_AVX512
  static const CpuKernels table{"AVX512", &AVX512::upsample_forward, &AVX512::upsample_backward,
                                &AVX512::attention_forward, &AVX512::attention_backward,
                                &AVX512::bn_stats, &AVX512::bn_forward, &AVX512::bn_backward_reduce,
                                &AVX512::bn_backward_apply};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace resattn
