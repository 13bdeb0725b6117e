// The CPU kernels built for the baseline instruction set of the compiler flags: runs on
// any CPU (at::vec's generic Vectorized, which the compiler maps to SSE2 on x86-64).
#include "isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "attention_residual_kernel.h"
#include "batch_norm_relu_kernel.h"
#include "upsample_bilinear_add_kernel.h"

namespace resattn {
namespace cpu {

const CpuKernels* kernels_default() {
  static const CpuKernels table{"DEFAULT", &DEFAULT::upsample_forward, &DEFAULT::upsample_backward,
                                &DEFAULT::attention_forward, &DEFAULT::attention_backward,
                                &DEFAULT::bn_stats, &DEFAULT::bn_forward, &DEFAULT::bn_backward_reduce,
                                &DEFAULT::bn_backward_apply};
  return &table;
}

}  // namespace cpu
}  // namespace resattn
