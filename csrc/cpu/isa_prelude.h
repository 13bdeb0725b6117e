// Headers every kernel translation unit includes BEFORE it switches the instruction set
// (#pragma GCC target in kernels_avx2.cpp / kernels_avx512.cpp).
//
// Why: inline functions and templates of shared headers (std::, c10::, at::) are emitted
// as weak symbols in every object that uses them, and the linker keeps one copy for the
// whole library. A copy compiled for AVX2 that wins over the baseline one would crash
// the package with SIGILL on a CPU without AVX2, even on the DEFAULT path. GCC gives a
// function the target options in force where it is *declared*, so everything pulled in
// here stays baseline code; only at::vec (whose code lives in the per-ISA namespace
// at::vec::CPU_CAPABILITY) and the kernels themselves (resattn::cpu::<ISA>) are compiled
// for the wider instruction set. The list mirrors what <ATen/cpu/vec/vec.h> includes.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "batch_norm_relu.h"
#include "bilinear.h"
#include "dispatch.h"
#include "sigmoid.h"
