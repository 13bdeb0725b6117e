// kernels/upsample_bilinear_add.cu compiled by the host compiler against the CUDA emulation: the very
// source nvcc compiles, its kernels registered as resattn_fast_emulated::upsample_bilinear_add (CPU tensors).
#include "upsample_bilinear_add.cu"
