// kernels/batch_norm_relu.cu compiled by the host compiler against the CUDA emulation: the very
// source nvcc compiles, its kernels registered as resattn_fast_emulated::batch_norm_relu (CPU tensors).
#include "batch_norm_relu.cu"
