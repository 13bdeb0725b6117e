// Run-time choice of the CPU kernel table (see dispatch.h).
#include "dispatch.h"

#include <ATen/Version.h>

#include <string>

namespace resattn {
namespace cpu {

namespace {

bool cpu_has(const char* feature_set) {
#if defined(__GNUC__) && defined(__x86_64__)
  const std::string f(feature_set);
  __builtin_cpu_init();
  if (f == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
           __builtin_cpu_supports("popcnt");
  }
  if (f == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  (void)feature_set;
  return false;
}

const CpuKernels* choose() {
  // PyTorch's decision (CPU features, and the ATEN_CPU_CAPABILITY override used to test
  // the narrower paths) caps ours; the CPU check guards against a PyTorch build that
  // reports a capability our compiler flags assume more of.
  const std::string torch_cap = at::get_cpu_capability();
  const bool allow512 = torch_cap == "AVX512";
  const bool allow2 = allow512 || torch_cap == "AVX2";
  if (allow512 && kernels_avx512() != nullptr && cpu_has("avx2") && cpu_has("avx512")) {
    return kernels_avx512();
  }
  if (allow2 && kernels_avx2() != nullptr && cpu_has("avx2")) {
    return kernels_avx2();
  }
  return kernels_default();
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels* chosen = choose();
  return *chosen;
}

}  // namespace cpu
}  // namespace resattn
