"""Triton kernels of ``batch_norm_relu``: ``relu(batch_norm(x))``, its backward and the
running-statistics update.

Registered as ``torch.ops.resattn_fast.batch_norm_relu_triton``,
``torch.ops.resattn_fast.batch_norm_relu_backward_triton`` and
``torch.ops.resattn_fast.batch_norm_update_stats_triton`` with ``torch.library.triton_op``
(kernels launched through ``wrap_triton``, so torch.compile traces into them), with the
schemas of csrc/schemas.h and the math of kernels/batch_norm_relu.h; autograd comes from
``resattn_fast.ops._registry`` (x, weight, bias, mean and var saved, never the output):

  invstd = 1 / sqrt(var + eps),  scale = weight * invstd,
  out = relu((x - mean) * scale + bias)
  backward: dy = grad where (x - mean) * scale + bias > 0 (the ReLU mask, recomputed from
  x), grad_bias = sum(dy), grad_weight = sum(dy * x_hat), x_hat = (x - mean) * invstd,
  grad_x = scale * (dy - grad_bias / M - x_hat * grad_weight / M) in training (M = N*H*W),
  scale * dy in eval, plus grad_residual when given.

Layouts: x is read dense in its own memory format, NCHW or channels_last (any other
layout, e.g. a sliced view, is copied into ``x.suggest_memory_format()`` first); out and
grad_x are allocated in that format.

Reductions (the batch statistics; sum(dy) and sum(dy * x_hat)) run in two stages with a
fixed order, so results are bit-identical run to run: stage 1 gives each program one
contiguous chunk of the (N, H, W) elements of one channel (NCHW) or of a block of
``_BLOCK_C`` channels (channels_last, whose channels are the contiguous dimension) and
writes one partial per (chunk, channel) to a workspace; stage 2 combines a channel's
partials in chunk order. In eager mode stage 2 runs in the same launch, in the last
program of each channel tile to finish stage 1 (an atomic count per tile decides which;
the combination order does not depend on it), so a training pass pair is two launches, as
in kernels/batch_norm_relu.cu; traced by torch.compile (the counters are state kept
between calls), it runs in a kernel of its own, one small program per block of channels,
with the same code and bits. The statistics are
per-block mean and M2 (sum of squared deviations from the block mean) combined with Chan
et al.'s formula, stable for large M and large means. The reduction kernels have one
config each (the autotuner picking another block size or warp count would change the
summation order, so the results, between processes).

Accumulation in float32 (float64 for float64 x); half types round once, at the store.
Correctly rounded division and square root (``div_rn``, ``sqrt_rn``; float64 ``/`` and
``sqrt`` are) wherever the math divides (invstd, means, Chan's weights), as the C++
backends do: float32 ``/`` compiles to an approximate division on NVIDIA GPUs.
"""

import struct
import threading
from typing import Any, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..._format import memory_format_of
from .. import _registry
from ._common import (
    INTERPRETED,
    acc,
    configs,
    device_guard,
    flat_grid,
    needs_fake,
    needs_int64,
    opaque_when_interpreted,
    size_class,
    triton_op_kwargs,
)

__all__ = [
    "batch_norm_relu",
    "batch_norm_relu_backward",
    "batch_norm_update_stats",
]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (BLOCK, num_warps). Elementwise passes: memory bound, autotuned per size class.
_APPLY_CONFIGS = configs([(1024, 4), (2048, 8), (4096, 8)], interpreted_block=4096)


def _prune_fp64(configs: Any, nargs: Any, **kwargs: Any) -> Any:
    """The apply configs a launch may tune over: float64 at most 1024 elements per block
    (larger float64 blocks need more registers than ptxas gives them on sm_80: 4096
    spills with Triton 3.8, 2048 in the forward with Triton 3.6; see
    benchmarks/gpu_resources.py)."""
    if kwargs.get("IS_FP64"):
        return [c for c in configs if c.kwargs.get("BLOCK", 0) <= 1024] or configs[:1]
    return configs


# Reductions: one config each (see the module docstring). channels_last tiles are
# (BLOCK // _BLOCK_C rows) x (_BLOCK_C channels).
_REDUCE_CONFIGS = configs([(2048, 8)], interpreted_block=256)
# Per-channel kernels (C values, a few loads each): one channel per thread (float64
# divisions are subroutine calls; with two channels per thread their saved registers
# spill on sm_90).
_CHANNEL_CONFIGS = configs([(128, 4)], interpreted_block=256)

# Channels per channels_last reduction tile (the kernels' _BLOCK_C).
_CHANNEL_TILE = 32
_BLOCK_C = tl.constexpr(_CHANNEL_TILE)
# Stage 1 splits each channel's M = N*H*W elements into chunks so that about this many
# programs run (more chunks: more parallelism and a larger stage 2).
_TARGET_PROGRAMS = 1024

# The rows of the per-channel parameter workspace (acc dtype, _PAR_ROWS x C).
_PAR_ROWS = 4  # mean, scale = weight * invstd, bias (0 when None), invstd


# ----------------------------------------------------------------------- device helpers
@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    """a / b correctly rounded (float32 ``/`` compiles to an approximate division)."""
    if IS_FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _invstd(var, eps, IS_FP64: tl.constexpr):
    """1 / sqrt(var + eps), correctly rounded at each step (bn_invstd)."""
    if IS_FP64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _scalar_arg(v32, v64_bits, IS_FP64: tl.constexpr):
    """A float argument in the accumulation type: float64 from the int64 bits of the
    host's double (Triton passes Python floats as float32), else the float32 value."""
    if IS_FP64:
        return tl.cast(v64_bits, tl.int64).to(tl.float64, bitcast=True)
    else:
        # tl.cast: Triton 3.6's interpreter passes a float argument as a Python float.
        return tl.cast(v32, tl.float32)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b, IS_FP64: tl.constexpr):
    """Chan et al.'s combination of (n_a, mean_a, m2_a) with (n_b, mean_b, m2_b), n_b > 0
    (welford_combine of kernels/batch_norm_relu.h). With n_a = 0 it returns b's
    statistics exactly (n_b / n = 1), so the first combination needs no branch."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac_b = _div(n_b, n, IS_FP64)
    return n, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * n_a * frac_b


@triton.jit
def _update_running(rm_ptr, rv_ptr, cs, cmask, mean, var, count, momentum32, momentum64,
                    IS_FP64: tl.constexpr):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    var * count / (count - 1) into running_var (bn_update_running), in place, for channels
    cs; math in float64 when IS_FP64 (float64 running statistics), else float32. Shared
    by the update kernel and the channel kernel's fused update: the same bits."""
    momentum = _scalar_arg(momentum32, momentum64, IS_FP64)
    rm = acc(tl.load(rm_ptr + cs, mask=cmask, other=0.0), IS_FP64)
    rv = acc(tl.load(rv_ptr + cs, mask=cmask, other=0.0), IS_FP64)
    n = tl.zeros_like(rm) + tl.cast(count, rm.dtype)
    unbiased = _div(var * n, n - 1.0, IS_FP64)
    rm = momentum * mean + (1.0 - momentum) * rm
    rv = momentum * unbiased + (1.0 - momentum) * rv
    tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _divmod(a, d, INT64: tl.constexpr):
    """(a // d, a % d) of a scalar 0 <= a (int64 when INT64, < 2**53) by 0 < d < 2**31.

    32-bit: the division. 64-bit: without a 64-bit integer division, which is a
    subroutine call on NVIDIA GPUs whose saved registers count as spills (Triton 3.8 on
    sm_80): a float estimate of the quotient from an approximate float32 reciprocal,
    refined twice with the exact int64 remainder (each step multiplies the error by about
    2**-21), then corrected by one either way."""
    if INT64:
        dd = tl.cast(d, tl.int64)
        inv = (1.0 / tl.cast(d, tl.float32)).to(tl.float64)
        q = (a.to(tl.float64) * inv).to(tl.int64)
        q += ((a - q * dd).to(tl.float64) * inv).to(tl.int64)
        q += ((a - q * dd).to(tl.float64) * inv).to(tl.int64)
        r = a - q * dd
        q = tl.where(r < 0, q - 1, tl.where(r >= dd, q + 1, q))
        return q, a - q * dd
    else:
        q = a // d
        return q, a - q * d


@triton.jit
def _block_channels(base, C, HW, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
                    BLOCK: tl.constexpr):
    """The channel of each of the BLOCK flat offsets ``base + arange(BLOCK)`` into a dense
    (N, C, H, W) tensor in NCHW or NHWC order.

    ``base`` (64-bit with INT64) is split once per program; the per-element divisions are
    32-bit: within a block the plane index moves by at most BLOCK / HW + 1 (H*W < 2**31 -
    BLOCK, checked on the host)."""
    local = tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        _q, c0 = _divmod(base, C, INT64)
        return (c0.to(tl.int32) + local) % C
    else:
        q0, r0 = _divmod(base, HW, INT64)
        _q, c0 = _divmod(q0, C, INT64)
        return (c0.to(tl.int32) + (r0.to(tl.int32) + local) // HW) % C


@triton.jit
def _apply_block(total, C, HW, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """(offsets, mask, channels) of this program's BLOCK elements of an elementwise pass
    over a dense tensor of ``total`` elements, in its memory order."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    base = pid * BLOCK
    offs = base + tl.arange(0, BLOCK)
    return offs, offs < total, _block_channels(base, C, HW, CHANNELS_LAST, INT64, BLOCK)


@triton.jit
def _load_rows(par_ptr, c, mask, C, IS_FP64: tl.constexpr):
    """(mean, scale, bias) of channels c from the parameter rows par (_store_rows)."""
    mean = acc(tl.load(par_ptr + c, mask=mask, other=0.0), IS_FP64)
    scale = acc(tl.load(par_ptr + C + c, mask=mask, other=0.0), IS_FP64)
    bias = acc(tl.load(par_ptr + 2 * C + c, mask=mask, other=0.0), IS_FP64)
    return mean, scale, bias


@triton.jit
def _chunk(M, CHUNK, INT64: tl.constexpr):
    """(channel, or channel block, chunk index, the chunk's first element, one past its
    last) of a stage-1 program of the 2-D grid (channel [block], chunk)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if INT64:
        pid_c = pid_c.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    m0 = pid_s * CHUNK
    return pid_c, pid_s, m0, m0 + tl.minimum(CHUNK, M - m0)


@triton.jit
def _split(m, HW, INT64: tl.constexpr):
    """(n, p) = (m // HW, m % HW) of a scalar element index of one NCHW channel: n of m's
    type, p 32-bit. The reduction loops then step p by BLOCK and carry into n, so each
    element costs one 32-bit division (H*W < 2**31 - BLOCK, checked on the host)."""
    n, p = _divmod(m, HW, INT64)
    return n, p.to(tl.int32)


@triton.jit
def _advance(n, p, HW, STEP: tl.constexpr):
    """(n, p) of the element STEP further on (p + STEP < 2**31)."""
    p = p + STEP
    q = p // HW
    return n + q, p - q * HW


@triton.jit
def _cl_tile(start, m_end, cs, cmask, C, ROWS: tl.constexpr):
    """(offsets, mask) of rows [start, start + ROWS), those below m_end, of channels cs
    (cmask) of a channels_last tensor seen as an (M, C) matrix: one step of a
    channels_last reduction loop."""
    rows = start + tl.arange(0, ROWS)
    return rows[:, None] * C + cs[None, :], (rows < m_end)[:, None] & cmask[None, :]


@triton.jit
def _plane_stride(C, HW, INT64: tl.constexpr):
    """C * H * W, the stride of n in an NCHW tensor (64-bit with INT64)."""
    if INT64:
        return tl.cast(C, tl.int64) * HW
    else:
        return C * HW


@triton.jit
def _nchw_tile(start, m_end, n, p, c, HW, chw, BLOCK: tl.constexpr):
    """(offsets, mask) of channel c's elements [start, start + BLOCK), those below m_end,
    in an NCHW tensor, element ``start`` being (n, p) (_split, _advance): one step of an
    NCHW reduction loop."""
    local = p + tl.arange(0, BLOCK)
    dn = local // HW
    return (n + dn) * chw + c * HW + (local - dn * HW), start + tl.arange(0, BLOCK) < m_end


@triton.jit
def _arrive_last(cnt_ptr, tile, S):
    """Whether this program is the last of the S chunk programs of channel tile ``tile``
    to finish stage 1 (stage 2 then runs in it, in the same launch: arrive_last of
    kernels/batch_norm_relu.cu). The barrier orders every thread's partial stores before
    the count, a gpu-scope acquire-release atomic; the last program reads the partials
    from L2 (``.cg``), where the others' stores are, and resets the count to 0 for the
    next launch on the stream (the counters are kept, never cleared by a kernel of their
    own). Under TRITON_INTERPRET=1 the programs run one after another: the last in grid
    order finalizes."""
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return old == S - 1


@triton.jit
def _stats_stage2(pmean_ptr, pm2_ptr, cs, cmask, C, M, S, CHUNK, IS_FP64: tl.constexpr):
    """(mean, biased var) of channels cs from the S chunk partials, combined in chunk
    order (Chan et al.), var = M2 / M. Loads bypass L1 (``.cg``): in the fused finalize
    other programs of the same launch wrote them."""
    zero = acc(tl.zeros_like(cs), IS_FP64)
    n_a = zero
    mean_a = zero
    m2_a = zero
    s = 0
    while s < S:
        mean_b = acc(tl.load(pmean_ptr + s * C + cs, mask=cmask, other=0.0, cache_modifier=".cg"), IS_FP64)
        m2_b = acc(tl.load(pm2_ptr + s * C + cs, mask=cmask, other=0.0, cache_modifier=".cg"), IS_FP64)
        n_b = zero + tl.cast(tl.minimum(M - s * CHUNK, CHUNK), zero.dtype)
        n_a, mean_a, m2_a = _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b, IS_FP64)
        s += 1
    return mean_a, _div(m2_a, n_a, IS_FP64)


@triton.jit
def _channel_rows(w_ptr, b_ptr, cs, cmask, mean, var, eps32, eps64, HAS_W, HAS_B,
                  IS_FP64: tl.constexpr):
    """(scale, bias, invstd) of channels cs: invstd = 1 / sqrt(var + eps), scale =
    weight * invstd (invstd without weight), bias (0 without). HAS_W/HAS_B may be
    compile-time or run-time flags."""
    invstd = _invstd(var, _scalar_arg(eps32, eps64, IS_FP64), IS_FP64)
    scale = invstd
    if HAS_W:
        scale = acc(tl.load(w_ptr + cs, mask=cmask, other=0.0), IS_FP64) * invstd
    bias = tl.zeros_like(mean)
    if HAS_B:
        bias = acc(tl.load(b_ptr + cs, mask=cmask, other=0.0), IS_FP64)
    return scale, bias, invstd


@triton.jit
def _store_rows(par_ptr, cs, cmask, C, mean, scale, bias, invstd):
    """The parameter rows the elementwise passes read: par[0] = mean, par[1] = scale,
    par[2] = bias, par[3] = invstd."""
    tl.store(par_ptr + cs, mean, mask=cmask)
    tl.store(par_ptr + C + cs, scale, mask=cmask)
    tl.store(par_ptr + 2 * C + cs, bias, mask=cmask)
    tl.store(par_ptr + 3 * C + cs, invstd, mask=cmask)


@triton.jit
def _finalize_stats(pmean_ptr, pm2_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, par_ptr,
                    nbt_ptr, cs, cmask, first, C, M, S, CHUNK, eps32, eps64, momentum32, momentum64,
                    update, has_nbt, HAS_W, HAS_B, IS_FP64: tl.constexpr):
    """Stage 2 of the training statistics for channels cs: mean and var (written), with
    ``update`` the running statistics (count M) and, in the ``first`` tile, the batch
    count; then the parameter rows. The channel kernel and the statistics kernel's fused
    finalize both run this: the same bits."""
    mean, var = _stats_stage2(pmean_ptr, pm2_ptr, cs, cmask, C, M, S, CHUNK, IS_FP64)
    tl.store(mean_ptr + cs, mean, mask=cmask)
    tl.store(var_ptr + cs, var, mask=cmask)
    if update != 0:
        _update_running(rm_ptr, rv_ptr, cs, cmask, mean, var, M, momentum32, momentum64, IS_FP64)
        if has_nbt != 0:
            if first:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    scale, bias, invstd = _channel_rows(w_ptr, b_ptr, cs, cmask, mean, var, eps32, eps64, HAS_W,
                                        HAS_B, IS_FP64)
    _store_rows(par_ptr, cs, cmask, C, mean, scale, bias, invstd)


# --------------------------------------------------------------------- forward kernels
@triton.autotune(configs=_REDUCE_CONFIGS, key=["CHANNELS_LAST", "INT64"])
# The run-time flags are never specialized (Triton would compile the value 1 as a
# constant): one compiled variant per layout and dtype, as benchmarks/gpu_resources.py checks.
@triton.jit(do_not_specialize=["eps64", "momentum64", "finalize", "update", "has_nbt", "has_w", "has_b"])
def _bn_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr, cnt_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, par_ptr,
    nbt_ptr, C, HW, M, CHUNK, S, eps32, eps64, momentum32, momentum64, finalize, update, has_nbt,
    has_w, has_b,
    CHANNELS_LAST: tl.constexpr, IS_FP64: tl.constexpr, INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Stage 1 of the statistics: (mean, M2) of one chunk of M per channel, to
    pmean/pm2[chunk, c]. Each BLOCK of the chunk gives its own mean and M2 (deviations
    from the block mean, in registers), combined into the chunk's in order. With
    ``finalize`` (a run-time flag), the last program of each channel tile to finish
    (_arrive_last, counters cnt) runs stage 2 for the tile (_finalize_stats: mean, var,
    the running update with ``update``, the rows), so the training forward is two
    launches; without it the channel kernel does, a launch of its own."""
    pid_c, pid_s, m0, m_end = _chunk(M, CHUNK, INT64)
    if CHANNELS_LAST:
        ROWS: tl.constexpr = BLOCK // _BLOCK_C
        cs = pid_c * _BLOCK_C + tl.arange(0, _BLOCK_C)
        cmask = cs < C
        n_a = tl.sum(acc(tl.zeros([ROWS, _BLOCK_C], dtype=tl.float32), IS_FP64), axis=0)
        mean_a = n_a
        m2_a = n_a
        start = m0
        while start < m_end:
            off, mask = _cl_tile(start, m_end, cs, cmask, C, ROWS)
            v = acc(tl.load(x_ptr + off, mask=mask, other=0.0), IS_FP64)
            cnt = tl.cast(tl.minimum(m_end - start, ROWS), v.dtype)
            n_b = tl.zeros_like(n_a) + cnt
            mean_b = _div(tl.sum(v, axis=0), n_b, IS_FP64)
            d = tl.where(mask, v - mean_b[None, :], 0.0)
            m2_b = tl.sum(d * d, axis=0)
            n_a, mean_a, m2_a = _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b, IS_FP64)
            start += ROWS
        out = pid_s * C + cs
        tl.store(pmean_ptr + out, mean_a, mask=cmask)
        tl.store(pm2_ptr + out, m2_a, mask=cmask)
    else:
        cs = pid_c  # the tile: one channel
        cmask = pid_c < C
        zero = tl.sum(acc(tl.zeros([BLOCK], dtype=tl.float32), IS_FP64), axis=0)
        n_a = zero
        mean_a = zero
        m2_a = zero
        chw = _plane_stride(C, HW, INT64)
        n_cur, p_cur = _split(m0, HW, INT64)
        start = m0
        while start < m_end:
            off, mask = _nchw_tile(start, m_end, n_cur, p_cur, pid_c, HW, chw, BLOCK)
            v = acc(tl.load(x_ptr + off, mask=mask, other=0.0), IS_FP64)
            n_b = zero + tl.cast(tl.minimum(m_end - start, BLOCK), zero.dtype)
            mean_b = _div(tl.sum(v, axis=0), n_b, IS_FP64)
            d = tl.where(mask, v - mean_b, 0.0)
            m2_b = tl.sum(d * d, axis=0)
            n_a, mean_a, m2_a = _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b, IS_FP64)
            start += BLOCK
            n_cur, p_cur = _advance(n_cur, p_cur, HW, BLOCK)
        tl.store(pmean_ptr + pid_s * C + pid_c, mean_a)
        tl.store(pm2_ptr + pid_s * C + pid_c, m2_a)
    if finalize != 0:
        if _arrive_last(cnt_ptr, pid_c, S):
            _finalize_stats(pmean_ptr, pm2_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
                            par_ptr, nbt_ptr, cs, cmask, pid_c == 0, C, M, S, CHUNK, eps32, eps64,
                            momentum32, momentum64, update, has_nbt, has_w != 0, has_b != 0,
                            IS_FP64)
            tl.store(cnt_ptr + pid_c, 0)


@triton.autotune(configs=_CHANNEL_CONFIGS, key=[])
@triton.jit(do_not_specialize=["eps64"])
def _bn_channel_kernel(
    pmean_ptr, pm2_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, par_ptr, nbt_ptr,
    C, M, S, CHUNK, eps32, eps64, momentum32, momentum64, update, has_nbt,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    WRITE_STATS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per channel: the statistics (TRAINING: stage 2, the S chunk partials combined in
    chunk order, var = M2 / M; else read from rm/rv), written to mean/var when
    WRITE_STATS, and the parameter rows the elementwise passes read: par[0] = mean,
    par[1] = weight * invstd, par[2] = bias, par[3] = invstd. TRAINING with update != 0
    (batch_norm_relu_with_update; running statistics of x's accumulation type): rm/rv
    updated from the batch statistics with count M (_update_running), and with has_nbt,
    program 0 adds one to num_batches_tracked. update and has_nbt are run-time flags:
    no compiled variants of their own."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cs < C
    if TRAINING:
        _finalize_stats(pmean_ptr, pm2_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, par_ptr,
                        nbt_ptr, cs, cmask, tl.program_id(0) == 0, C, M, S, CHUNK, eps32, eps64,
                        momentum32, momentum64, update, has_nbt, HAS_W, HAS_B, IS_FP64)
    else:
        mean = acc(tl.load(rm_ptr + cs, mask=cmask, other=0.0), IS_FP64)
        var = acc(tl.load(rv_ptr + cs, mask=cmask, other=0.0), IS_FP64)
        if WRITE_STATS:
            tl.store(mean_ptr + cs, mean, mask=cmask)
            tl.store(var_ptr + cs, var, mask=cmask)
        scale, bias, invstd = _channel_rows(w_ptr, b_ptr, cs, cmask, mean, var, eps32, eps64, HAS_W,
                                            HAS_B, IS_FP64)
        _store_rows(par_ptr, cs, cmask, C, mean, scale, bias, invstd)


# Autotuned once per size class (size_class(total), in the key; unused by the kernel).
@triton.autotune(configs=_APPLY_CONFIGS, key=["size_cls", "CHANNELS_LAST", "INT64"],
                 prune_configs_by={"early_config_prune": _prune_fp64})
@triton.jit(do_not_specialize=["size_cls"])
def _bn_relu_fwd_kernel(
    x_ptr, par_ptr, out_ptr, total, size_cls, C, HW,
    CHANNELS_LAST: tl.constexpr, IS_FP64: tl.constexpr, INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = relu((x - mean) * scale + bias) (bn_relu_forward), elementwise in x's memory
    order. ``y < 0 ? 0 : y`` lets NaN through, as torch.relu does."""
    offs, mask, c = _apply_block(total, C, HW, CHANNELS_LAST, INT64, BLOCK)
    x = acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
    mean, scale, bias = _load_rows(par_ptr, c, mask, C, IS_FP64)
    y = (x - mean) * scale + bias
    y = tl.where(y < 0.0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------- backward kernels
@triton.jit
def _bwd_terms(g, x, mean, scale, bias, invstd):
    """(dy, dy * x_hat): grad where the recomputed ReLU passed (bn_relu_dy)."""
    xc = x - mean
    dy = tl.where(xc * scale + bias > 0.0, g, 0.0)
    return dy, dy * (xc * invstd)


@triton.jit
def _finalize_grads(pdy_ptr, pdyx_ptr, gw_ptr, gb_ptr, coef_ptr, cs, cmask, C, M, S, training,
                    IS_FP64: tl.constexpr):
    """Stage 2 of the backward reduction for channels cs: the S chunk partials summed in
    chunk order into grad_bias = sum(dy) and grad_weight = sum(dy * x_hat) (stored in their
    own dtypes), and with ``training`` the apply pass's coefficients coef[0] =
    grad_bias / M, coef[1] = grad_weight / M. Shared by the backward channel kernel and
    the reduction kernel's fused finalize (partials read from L2, ``.cg``)."""
    s_dy = acc(tl.zeros_like(cs), IS_FP64)
    s_dyx = s_dy
    s = 0
    while s < S:
        s_dy += acc(tl.load(pdy_ptr + s * C + cs, mask=cmask, other=0.0, cache_modifier=".cg"), IS_FP64)
        s_dyx += acc(tl.load(pdyx_ptr + s * C + cs, mask=cmask, other=0.0, cache_modifier=".cg"), IS_FP64)
        s += 1
    tl.store(gb_ptr + cs, s_dy.to(gb_ptr.dtype.element_ty), mask=cmask)
    tl.store(gw_ptr + cs, s_dyx.to(gw_ptr.dtype.element_ty), mask=cmask)
    if training:
        m = tl.zeros_like(s_dy) + tl.cast(M, s_dy.dtype)
        tl.store(coef_ptr + cs, _div(s_dy, m, IS_FP64), mask=cmask)
        tl.store(coef_ptr + C + cs, _div(s_dyx, m, IS_FP64), mask=cmask)


@triton.autotune(configs=_REDUCE_CONFIGS, key=["CHANNELS_LAST", "INT64"])
@triton.jit(do_not_specialize=["eps64", "finalize", "training", "has_w", "has_b"])
def _bn_relu_bwd_reduce_kernel(
    g_ptr, x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdy_ptr, pdyx_ptr, cnt_ptr, gw_ptr, gb_ptr,
    coef_ptr, par_ptr, C, HW, M, CHUNK, S, eps32, eps64, finalize, training, has_w, has_b,
    CHANNELS_LAST: tl.constexpr, IS_FP64: tl.constexpr, INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Stage 1 of the backward reduction: sum(dy) and sum(dy * x_hat) of one chunk of M
    per channel, to pdy/pdyx[chunk, c] (same chunks and orders as _bn_stats_kernel), each
    program computing its channels' rows from mean, var, weight and bias. With
    ``finalize`` (a run-time flag), the last program of each channel tile (_arrive_last)
    runs stage 2 for the tile (_finalize_grads) and writes its rows for the apply pass,
    so the backward is two launches; without it the channel kernels do."""
    pid_c, pid_s, m0, m_end = _chunk(M, CHUNK, INT64)
    if CHANNELS_LAST:
        ROWS: tl.constexpr = BLOCK // _BLOCK_C
        cs = pid_c * _BLOCK_C + tl.arange(0, _BLOCK_C)
        cmask = cs < C
        mean_v = acc(tl.load(mean_ptr + cs, mask=cmask, other=0.0), IS_FP64)
        var_v = acc(tl.load(var_ptr + cs, mask=cmask, other=0.0), IS_FP64)
        scale_v, bias_v, invstd_v = _channel_rows(w_ptr, b_ptr, cs, cmask, mean_v, var_v, eps32, eps64,
                                                  has_w != 0, has_b != 0, IS_FP64)
        r_cs, r_mask, r_mean, r_scale, r_bias, r_invstd = cs, cmask, mean_v, scale_v, bias_v, invstd_v
        mean = mean_v[None, :]
        scale = scale_v[None, :]
        bias = bias_v[None, :]
        invstd = invstd_v[None, :]
        s_dy = tl.sum(acc(tl.zeros([ROWS, _BLOCK_C], dtype=tl.float32), IS_FP64), axis=0)
        s_dyx = s_dy
        start = m0
        while start < m_end:
            off, mask = _cl_tile(start, m_end, cs, cmask, C, ROWS)
            g = acc(tl.load(g_ptr + off, mask=mask, other=0.0), IS_FP64)
            x = acc(tl.load(x_ptr + off, mask=mask, other=0.0), IS_FP64)
            dy, dyx = _bwd_terms(g, x, mean, scale, bias, invstd)
            s_dy += tl.sum(dy, axis=0)
            s_dyx += tl.sum(dyx, axis=0)
            start += ROWS
        out = pid_s * C + cs
        tl.store(pdy_ptr + out, s_dy, mask=cmask)
        tl.store(pdyx_ptr + out, s_dyx, mask=cmask)
    else:
        mean = acc(tl.load(mean_ptr + pid_c), IS_FP64)
        var = acc(tl.load(var_ptr + pid_c), IS_FP64)
        scale, bias, invstd = _channel_rows(w_ptr, b_ptr, pid_c, pid_c < C, mean, var, eps32, eps64,
                                            has_w != 0, has_b != 0, IS_FP64)
        r_cs, r_mask, r_mean, r_scale, r_bias, r_invstd = pid_c, pid_c < C, mean, scale, bias, invstd
        s_dy = tl.sum(acc(tl.zeros([BLOCK], dtype=tl.float32), IS_FP64), axis=0)
        s_dyx = s_dy
        chw = _plane_stride(C, HW, INT64)
        n_cur, p_cur = _split(m0, HW, INT64)
        start = m0
        while start < m_end:
            off, mask = _nchw_tile(start, m_end, n_cur, p_cur, pid_c, HW, chw, BLOCK)
            g = acc(tl.load(g_ptr + off, mask=mask, other=0.0), IS_FP64)
            x = acc(tl.load(x_ptr + off, mask=mask, other=0.0), IS_FP64)
            dy, dyx = _bwd_terms(g, x, mean, scale, bias, invstd)
            s_dy += tl.sum(dy, axis=0)
            s_dyx += tl.sum(dyx, axis=0)
            start += BLOCK
            n_cur, p_cur = _advance(n_cur, p_cur, HW, BLOCK)
        tl.store(pdy_ptr + pid_s * C + pid_c, s_dy)
        tl.store(pdyx_ptr + pid_s * C + pid_c, s_dyx)
    if finalize != 0:
        if _arrive_last(cnt_ptr, pid_c, S):
            _finalize_grads(pdy_ptr, pdyx_ptr, gw_ptr, gb_ptr, coef_ptr, r_cs, r_mask, C, M, S,
                            training != 0, IS_FP64)
            # The apply pass's rows: this program's own (its tile's channels).
            _store_rows(par_ptr, r_cs, r_mask, C, r_mean, r_scale, r_bias, r_invstd)
            tl.store(cnt_ptr + pid_c, 0)


@triton.autotune(configs=_CHANNEL_CONFIGS, key=[])
@triton.jit
def _bn_relu_bwd_channel_kernel(
    pdy_ptr, pdyx_ptr, gw_ptr, gb_ptr, coef_ptr, C, M, S,
    TRAINING: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 2 of the backward reduction in a launch of its own (_finalize_grads), per
    block of channels."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _finalize_grads(pdy_ptr, pdyx_ptr, gw_ptr, gb_ptr, coef_ptr, cs, cs < C, C, M, S, TRAINING,
                    IS_FP64)


@triton.autotune(configs=_APPLY_CONFIGS,
                 key=["size_cls", "CHANNELS_LAST", "TRAINING", "HAS_RES", "INT64"],
                 prune_configs_by={"early_config_prune": _prune_fp64})
@triton.jit(do_not_specialize=["size_cls"])
def _bn_relu_bwd_kernel(
    g_ptr, x_ptr, par_ptr, coef_ptr, res_ptr, gx_ptr, total, size_cls, C, HW,
    CHANNELS_LAST: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr,
    IS_FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_x = scale * (dy - k_mean - x_hat * k_xhat) in training (bn_relu_grad_x_train),
    scale * dy in eval, + grad_residual (HAS_RES), elementwise in x's memory order."""
    offs, mask, c = _apply_block(total, C, HW, CHANNELS_LAST, INT64, BLOCK)
    g = acc(tl.load(g_ptr + offs, mask=mask, other=0.0), IS_FP64)
    x = acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
    mean, scale, bias = _load_rows(par_ptr, c, mask, C, IS_FP64)
    xc = x - mean
    dy = tl.where(xc * scale + bias > 0.0, g, 0.0)
    if TRAINING:
        invstd = acc(tl.load(par_ptr + 3 * C + c, mask=mask, other=0.0), IS_FP64)
        k_mean = acc(tl.load(coef_ptr + c, mask=mask, other=0.0), IS_FP64)
        k_xhat = acc(tl.load(coef_ptr + C + c, mask=mask, other=0.0), IS_FP64)
        gx = scale * (dy - k_mean - (xc * invstd) * k_xhat)
    else:
        gx = scale * dy
    if HAS_RES:
        gx += acc(tl.load(res_ptr + offs, mask=mask, other=0.0), IS_FP64)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- running statistics
@triton.autotune(configs=_CHANNEL_CONFIGS, key=[])
@triton.jit(do_not_specialize=["momentum64"])
def _bn_update_stats_kernel(
    rm_ptr, rv_ptr, mean_ptr, var_ptr, nbt_ptr, C, count, momentum32, momentum64,
    IS_FP64: tl.constexpr, HAS_NBT: tl.constexpr, BLOCK: tl.constexpr,
):
    """running = (1 - momentum) * running + momentum * batch, the unbiased variance
    var * count / (count - 1) into running_var (bn_update_running), in place; with
    HAS_NBT, program 0 also adds one to num_batches_tracked (int64)."""
    if HAS_NBT:
        if tl.program_id(0) == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cs < C
    mean = acc(tl.load(mean_ptr + cs, mask=cmask, other=0.0), IS_FP64)
    var = acc(tl.load(var_ptr + cs, mask=cmask, other=0.0), IS_FP64)
    _update_running(rm_ptr, rv_ptr, cs, cmask, mean, var, count, momentum32, momentum64, IS_FP64)


# ------------------------------------------------------------------------- host side
_CXX_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
              torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
              torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
              torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _dt(dtype: torch.dtype) -> str:
    """A dtype as the C++ checks print it (at::ScalarType's name)."""
    return _CXX_DTYPE.get(dtype, str(dtype).replace("torch.", ""))


def _sz(t: torch.Tensor) -> str:
    """A shape as the C++ checks print it (``[2, 3]``)."""
    return str(list(t.shape))


def _check_floating(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOATING:
        raise RuntimeError(f"resattn_fast: {name} must be float32, float64, float16 or "
                           f"bfloat16, got {_dt(t.dtype)}")


def _check_4d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 4:
        raise RuntimeError(f"resattn_fast: {name} must be a 4-D (N, C, H, W) tensor, got "
                           f"{t.dim()}-D with shape {_sz(t)}")


def _check_same(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise RuntimeError(f"resattn_fast: {a_name} and {b_name} must be on the same device, "
                           f"got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise RuntimeError(f"resattn_fast: {a_name} and {b_name} must have the same dtype, "
                           f"got {_dt(a.dtype)} and {_dt(b.dtype)}")


def _check_channel_vector(v: torch.Tensor, name: str, x: torch.Tensor) -> None:
    C = x.shape[1]
    if v.dim() != 1 or v.shape[0] != C:
        raise RuntimeError(f"resattn_fast: {name} must be a 1-D tensor of C = {C} values, "
                           f"got shape {_sz(v)}")
    if v.device != x.device:
        raise RuntimeError(f"resattn_fast: {name} must be on x's device ({x.device}), "
                           f"got {v.device}")
    if v.dtype != torch.float32 and v.dtype != x.dtype:
        raise RuntimeError(f"resattn_fast: {name} must be float32 or x's dtype "
                           f"({_dt(x.dtype)}), got {_dt(v.dtype)}")


def _check_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   training: bool, eps: float) -> None:
    """check_batch_norm_relu_args of csrc/checks.h, for direct ``torch.ops`` calls."""
    _check_4d(x, "x")
    _check_floating(x, "x")
    if x.shape[1] < 1:
        raise RuntimeError(f"resattn_fast: x must have at least one channel, got {_sz(x)}")
    if not eps >= 0:
        raise RuntimeError(f"resattn_fast: eps must be >= 0, got {eps:g}")
    for v, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        if v is not None:
            _check_channel_vector(v, name, x)
    if training:
        # PyTorch's own rule and words (torch.nn.functional._verify_batch_size).
        if x.numel() != 0 and x.numel() // x.shape[1] <= 1:
            raise RuntimeError("Expected more than 1 value per channel when training, "
                               f"got input size {_sz(x)}")
    elif running_mean is None or running_var is None:
        raise RuntimeError("resattn_fast: running_mean and running_var are required when "
                           "training=False")


def _check_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    grad_residual: Optional[torch.Tensor]) -> None:
    """check_batch_norm_relu_backward_args of csrc/checks.h."""
    _check_4d(x, "x")
    _check_floating(x, "x")
    _check_same(grad, "grad", x, "x")
    if grad.shape != x.shape:
        raise RuntimeError(f"resattn_fast: grad must have x's shape, got {_sz(grad)} and {_sz(x)}")
    if grad_residual is not None:
        _check_same(grad_residual, "grad_residual", x, "x")
        if grad_residual.shape != x.shape:
            raise RuntimeError(f"resattn_fast: grad_residual must have x's shape, got "
                               f"{_sz(grad_residual)} and {_sz(x)}")
    _check_channel_vector(mean, "mean", x)
    _check_channel_vector(var, "var", x)


def _check_num_batches_tracked(num_batches_tracked: Optional[torch.Tensor],
                               running_mean: torch.Tensor) -> None:
    """check_num_batches_tracked of csrc/checks.h."""
    if num_batches_tracked is not None:
        n = num_batches_tracked
        if n.dtype != torch.int64 or n.numel() != 1:
            raise RuntimeError(f"resattn_fast: num_batches_tracked must hold one int64 value, got "
                               f"{_dt(n.dtype)} of shape {_sz(n)}")
        if n.device != running_mean.device:
            raise RuntimeError(f"resattn_fast: num_batches_tracked must be on running_mean's device "
                               f"({running_mean.device}), got {n.device}")


def _check_running(running_mean: torch.Tensor, running_var: torch.Tensor,
                   num_batches_tracked: Optional[torch.Tensor]) -> None:
    """The running tensors' part of check_batch_norm_relu_with_update_args (csrc/checks.h;
    _check_forward has checked their shape, device and dtype against x)."""
    if running_mean.dtype != running_var.dtype:
        raise RuntimeError(f"resattn_fast: running_mean and running_var must have the same "
                           f"dtype, got {_dt(running_mean.dtype)} and {_dt(running_var.dtype)}")
    _check_num_batches_tracked(num_batches_tracked, running_mean)


def _check_update(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                  var: torch.Tensor, count: int, num_batches_tracked: Optional[torch.Tensor]) -> None:
    """check_batch_norm_update_args of csrc/checks.h."""
    _check_num_batches_tracked(num_batches_tracked, running_mean)
    C = running_mean.shape[0] if running_mean.dim() >= 1 else 0
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (mean, "mean"), (var, "var")):
        if t.dim() != 1 or t.shape[0] != C:
            raise RuntimeError(f"resattn_fast: {name} must be a 1-D tensor of {C} values, "
                               f"got shape {_sz(t)}")
        if t.device != running_mean.device:
            raise RuntimeError(f"resattn_fast: {name} must be on running_mean's device "
                               f"({running_mean.device}), got {t.device}")
        _check_floating(t, name)
    if running_mean.dtype != running_var.dtype:
        raise RuntimeError(f"resattn_fast: running_mean and running_var must have the same "
                           f"dtype, got {_dt(running_mean.dtype)} and {_dt(running_var.dtype)}")
    if count <= 1:
        raise RuntimeError(f"resattn_fast: count must be > 1 (values per channel), got {count}")


# The kernels split flat offsets into (plane, offset in the plane) with 32-bit math inside
# a block: one H*W plane plus the largest block must stay below 2**31.
_MAX_PLANE = 2**31 - 1 - 2 * max(c.kwargs["BLOCK"] for c in _APPLY_CONFIGS + _REDUCE_CONFIGS)


def _check_plane(x: torch.Tensor) -> None:
    if x.shape[2] * x.shape[3] > _MAX_PLANE:
        raise RuntimeError(f"resattn_fast: the Triton kernels need H*W <= {_MAX_PLANE}, got "
                           f"x of shape {_sz(x)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bits(v: float) -> int:
    """The int64 bits of the double ``v`` (how a float64 scalar reaches a kernel)."""
    (bits,) = struct.unpack("<q", struct.pack("<d", float(v)))
    return bits


def _dense(x: torch.Tensor) -> Tuple[torch.Tensor, torch.memory_format]:
    """``x`` dense in its memory format (NCHW or channels_last; anything else copied into
    ``x.suggest_memory_format()``), and that format."""
    fmt = memory_format_of(x)
    if x.is_contiguous(memory_format=fmt):
        return x, fmt
    return x.contiguous(memory_format=fmt), fmt


def _like(t: torch.Tensor, ref: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` (ref's shape) dense in ``fmt``, the layout of ``ref``: itself or a copy."""
    if t.is_contiguous(memory_format=fmt):
        return t
    return t.contiguous(memory_format=fmt)


def _vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (C,) vector the kernels can index densely: itself or a contiguous copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _chunks(C: int, M: int, channels_last: bool) -> Tuple[int, int]:
    """(CHUNK, S): the stage-1 split of each channel's M elements into S chunks of CHUNK
    (a multiple of the reduction BLOCK; the last one shorter). Depends on the shape only,
    so the reduction order, and the result, is the same on every run."""
    block = _REDUCE_CONFIGS[0].kwargs["BLOCK"]
    step = block // _CHANNEL_TILE if channels_last else block
    c_programs = triton.cdiv(C, _CHANNEL_TILE) if channels_last else C
    want = max(1, _TARGET_PROGRAMS // c_programs)
    s = min(want, triton.cdiv(M, step))
    chunk = triton.cdiv(triton.cdiv(M, s), step) * step
    return chunk, triton.cdiv(M, chunk)


class _NoLaunch:
    """A launcher that launches nothing (see _kernel)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def _kernel(kernel: Any, like: torch.Tensor) -> Any:
    """``wrap_triton(kernel)``, whose launches do nothing on fake tensors (opcheck and
    torch.compile trace the op body on them). An interpreted kernel (TRITON_INTERPRET=1)
    cannot be traced (wrap_triton hands it back bare, or, in older torch, fails on it):
    on fake tensors it gets a launcher that does nothing."""
    if INTERPRETED and is_fake(like):
        return _NoLaunch()
    return wrap_triton(kernel)


def _reduce_grid(C: int, S: int, channels_last: bool) -> Tuple[int, int]:
    return (triton.cdiv(C, _CHANNEL_TILE) if channels_last else C, S)


def _channel_grid(C: int) -> Any:
    return lambda meta: (triton.cdiv(C, meta["BLOCK"]),)


# _arrive_last's counters, per (device, stream) (per thread for interpreted CPU tensors):
# zeroed once and kept, every launch leaving them zero (the last program of each tile
# resets its count), so no launch pays a memset; reductions on different streams may run
# at once, hence one buffer each (reduction_counters of kernels/batch_norm_relu.cu).
_COUNTERS: Dict[Tuple[Any, ...], torch.Tensor] = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(x: torch.Tensor, n: int) -> torch.Tensor:
    """At least ``n`` zero int32 counters for a launch on x's device and current stream."""
    if x.is_cuda:
        key: Tuple[Any, ...] = (x.device, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        key = (x.device, threading.get_ident())
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < n:
            # Replacing a smaller buffer is safe: the launches on this stream that still
            # use it run before any later use of its memory (the caching allocator's order).
            buf = _COUNTERS[key] = torch.zeros((max(n, 4096),), dtype=torch.int32, device=x.device)
        return buf


def _finalize_in_kernel(x: torch.Tensor) -> bool:
    """Whether each reduction's stage 2 runs in the reduction's own launch (two launches
    per pass pair).
    Not while torch.compile or a fake-tensor check traces the op: the counters are state
    kept across calls, which a traced graph cannot hold; the traced op then runs the
    finalize kernels of their own (same results)."""
    return not is_fake(x) and not torch.compiler.is_compiling()


def _cnt(x: torch.Tensor, tiles: int, fused: bool) -> torch.Tensor:
    """The counters of a fused launch, else a placeholder of their type (never read)."""
    if fused:
        return _counters(x, tiles)
    return torch.empty((1,), dtype=torch.int32, device=x.device)


@torch.library.triton_op(
    "resattn_fast::batch_norm_relu_triton",
    **triton_op_kwargs("(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
                       "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)"),
)
def batch_norm_relu_triton(x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], training: bool,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var) = (relu(batch_norm(x)), the statistics it normalised with).

    x: (N, C, H, W), float32/float64/float16/bfloat16, any strides; weight, bias,
    running_mean, running_var: (C,), float32 or x's dtype, or None (weight 1, bias 0; the
    running statistics are required in eval). training: the batch's mean and biased
    variance over (N, H, W), two passes over x (statistics; normalise + ReLU); else the
    running statistics, one pass. out: x's dtype, channels_last if x is, else contiguous
    NCHW; mean, var: new (C,) tensors in float32 (float64 for float64 x). Never writes the
    running statistics (batch_norm_update_stats does). Also the op's fake kernel (only
    torch ops and ``wrap_triton`` launches, which do nothing on fake tensors)."""
    _check_forward(x, weight, bias, running_mean, running_var, training, eps)
    return _forward(x, weight, bias, running_mean, running_var, training, eps, None)


def _forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
             training: bool, eps: float, update: Optional[Tuple[float, Optional[torch.Tensor]]],
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_norm_relu_triton after its checks; ``update`` = (momentum, num_batches_tracked):
    training only, running statistics of x's accumulation type, x not empty: the
    statistics' finalize also updates running_mean/var (in place) and counts the batch."""
    weight, bias = _vec(weight), _vec(bias)
    running_mean, running_var = _vec(running_mean), _vec(running_var)
    _check_plane(x)
    N, C, H, W = x.shape
    accd = _acc_dtype(x.dtype)
    xd, fmt = _dense(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    mean = torch.empty((C,), dtype=accd, device=x.device)
    var = torch.empty((C,), dtype=accd, device=x.device)
    total = out.numel()
    if training and total == 0:
        return out, mean.zero_(), var.zero_()
    M, HW = N * H * W, H * W
    cl = fmt == torch.channels_last
    is_fp64 = x.dtype == torch.float64
    int64 = needs_int64(xd)
    par = torch.empty((_PAR_ROWS, C), dtype=accd, device=x.device)
    momentum, nbt = update if update is not None else (0.0, None)
    w_arg = weight if weight is not None else par
    b_arg = bias if bias is not None else par
    nbt_arg = nbt if nbt is not None else par
    with device_guard(x):
        fused = False
        if training:
            chunk, S = _chunks(C, M, cl)
            pmean = torch.empty((S, C), dtype=accd, device=x.device)
            pm2 = torch.empty((S, C), dtype=accd, device=x.device)
            if update is None:
                rm, rv = pmean, pm2  # never read in training without update: any valid pointer
            else:
                rm, rv = running_mean, running_var  # contiguous (_vec): updated in place
            fused = _finalize_in_kernel(x)
            grid = _reduce_grid(C, S, cl)
            _kernel(_bn_stats_kernel, x)[grid](
                xd, pmean, pm2, _cnt(x, grid[0], fused), rm, rv, w_arg, b_arg, mean, var, par,
                nbt_arg, C, HW, M, chunk, S, float(eps), _bits(eps), float(momentum), _bits(momentum),
                int(fused), int(update is not None), int(nbt is not None), int(weight is not None),
                int(bias is not None),
                CHANNELS_LAST=cl, IS_FP64=is_fp64, INT64=int64,
            )
        else:
            chunk, S = 1, 1
            pmean = pm2 = par
            rm, rv = running_mean, running_var
        if not fused:
            _kernel(_bn_channel_kernel, x)[_channel_grid(C)](
                pmean, pm2, rm, rv, w_arg, b_arg, mean, var, par, nbt_arg, C, M, S, chunk,
                float(eps), _bits(eps), float(momentum), _bits(momentum), int(update is not None),
                int(nbt is not None),
                TRAINING=bool(training), HAS_W=weight is not None, HAS_B=bias is not None,
                WRITE_STATS=True, IS_FP64=is_fp64,
            )
        if total:
            _kernel(_bn_relu_fwd_kernel, x)[flat_grid(total)](
                xd, par, out, total, size_class(total), C, HW,
                CHANNELS_LAST=cl, IS_FP64=is_fp64, INT64=int64,
            )
    return out, mean, var


def _running_update_kwargs(schema: str) -> Dict[str, Any]:
    """triton_op keywords of an op that updates the running statistics and the count in place."""
    kwargs = triton_op_kwargs(schema)
    kwargs["mutates_args"] = ("running_mean", "running_var", "num_batches_tracked")
    return kwargs


@torch.library.triton_op(
    "resattn_fast::batch_norm_relu_with_update_triton",
    **_running_update_kwargs("(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
                             "Tensor(b!) running_var, float momentum, float eps, "
                             "Tensor(c!)? num_batches_tracked) -> (Tensor, Tensor, Tensor)"),
)
def batch_norm_relu_with_update_triton(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
    num_batches_tracked: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_norm_relu_triton(training=True) and batch_norm_update_stats_triton in one call:
    the code that finalizes the statistics (the statistics kernel's last program of each
    channel tile; the channel kernel when traced) also updates the running statistics and
    num_batches_tracked (no launch of its own), with count = N*H*W. An empty x leaves
    the running statistics as they are and still counts the batch. Running statistics of
    float32 with float64 x (the one mix whose update math differs from x's) take the
    separate update kernel, with the same results. Forward only (see
    resattn_fast.ops.batch_norm_relu for autograd)."""
    _check_forward(x, weight, bias, running_mean, running_var, True, eps)
    _check_running(running_mean, running_var, num_batches_tracked)
    if x.numel() == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _forward(x, weight, bias, None, None, True, eps, None)
    if (x.dtype == torch.float64) != (running_mean.dtype == torch.float64):
        out, mean, var = _forward(x, weight, bias, None, None, True, eps, None)
        _update(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1],
                num_batches_tracked)
        return out, mean, var
    rm, rv = _vec(running_mean), _vec(running_var)
    result = _forward(x, weight, bias, rm, rv, True, eps, (momentum, num_batches_tracked))
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)
    return result


@torch.library.triton_op(
    "resattn_fast::batch_norm_relu_backward_triton",
    **triton_op_kwargs("(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
                       "Tensor var, bool training, float eps, Tensor? grad_residual, "
                       "bool weight_grads) -> (Tensor, Tensor, Tensor)"),
)
def batch_norm_relu_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor, training: bool,
    eps: float, grad_residual: Optional[torch.Tensor], weight_grads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of batch_norm_relu from x and the forward's
    mean/var (the ReLU mask and x_hat recomputed; nothing else saved).

    grad, grad_residual: x's shape and dtype, any strides; grad_residual (the identity
    shortcut's gradient), when given, is added to grad_x in the apply pass. Training: a
    per-channel reduction (sum(dy), sum(dy * x_hat)) then the apply pass; eval with
    weight_grads=False: the apply pass only. grad_x: x's dtype, laid out like x's forward
    output; grad_weight / grad_bias: (C,) in weight's / bias's dtype (the accumulation
    dtype when None), or empty (0,) tensors when weight_grads is False."""
    _check_backward(grad, x, mean, var, grad_residual)
    if weight is not None:
        _check_channel_vector(weight, "weight", x)
    if bias is not None:
        _check_channel_vector(bias, "bias", x)
    weight, bias, mean, var = _vec(weight), _vec(bias), _vec(mean), _vec(var)
    _check_plane(x)
    N, C, H, W = x.shape
    accd = _acc_dtype(x.dtype)
    xd, fmt = _dense(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if weight_grads:
        grad_weight = torch.empty((C,), dtype=weight.dtype if weight is not None else accd,
                                  device=x.device)
        grad_bias = torch.empty((C,), dtype=bias.dtype if bias is not None else accd,
                                device=x.device)
    else:
        grad_weight = torch.empty((0,), dtype=accd, device=x.device)
        grad_bias = torch.empty((0,), dtype=accd, device=x.device)
    total = grad_x.numel()
    if total == 0:
        if weight_grads:
            grad_weight.zero_()
            grad_bias.zero_()
        return grad_x, grad_weight, grad_bias
    M, HW = N * H * W, H * W
    cl = fmt == torch.channels_last
    is_fp64 = x.dtype == torch.float64
    g = _like(grad, xd, fmt)
    res = _like(grad_residual, xd, fmt) if grad_residual is not None else None
    int64 = needs_int64(xd)
    par = torch.empty((_PAR_ROWS, C), dtype=accd, device=x.device)
    coef = torch.empty((2, C), dtype=accd, device=x.device)
    reduce = bool(training) or bool(weight_grads)
    w_arg = weight if weight is not None else par
    b_arg = bias if bias is not None else par
    with device_guard(x):
        fused = reduce and _finalize_in_kernel(x)
        if not fused:  # the apply pass's rows, in a kernel of their own
            _kernel(_bn_channel_kernel, x)[_channel_grid(C)](
                par, par, mean, var, w_arg, b_arg, par, par, par, par, C, M, 1, 1, float(eps),
                _bits(eps), 0.0, 0, 0, 0,
                TRAINING=False, HAS_W=weight is not None, HAS_B=bias is not None,
                WRITE_STATS=False, IS_FP64=is_fp64,
            )
        if reduce:
            chunk, S = _chunks(C, M, cl)
            pdy = torch.empty((S, C), dtype=accd, device=x.device)
            pdyx = torch.empty((S, C), dtype=accd, device=x.device)
            gw = grad_weight if weight_grads else torch.empty((C,), dtype=accd, device=x.device)
            gb = grad_bias if weight_grads else torch.empty((C,), dtype=accd, device=x.device)
            grid = _reduce_grid(C, S, cl)
            _kernel(_bn_relu_bwd_reduce_kernel, x)[grid](
                g, xd, mean, var, w_arg, b_arg, pdy, pdyx, _cnt(x, grid[0], fused), gw, gb, coef, par,
                C, HW, M, chunk, S, float(eps), _bits(eps), int(fused), int(bool(training)),
                int(weight is not None), int(bias is not None),
                CHANNELS_LAST=cl, IS_FP64=is_fp64, INT64=int64,
            )
            if not fused:
                _kernel(_bn_relu_bwd_channel_kernel, x)[_channel_grid(C)](
                    pdy, pdyx, gw, gb, coef, C, M, S,
                    TRAINING=bool(training), IS_FP64=is_fp64,
                )
        _kernel(_bn_relu_bwd_kernel, x)[flat_grid(total)](
            g, xd, par, coef, res if res is not None else g, grad_x, total, size_class(total),
            C, HW,
            CHANNELS_LAST=cl, TRAINING=bool(training), HAS_RES=res is not None,
            IS_FP64=is_fp64, INT64=int64,
        )
    return grad_x, grad_weight, grad_bias


@torch.library.triton_op(
    "resattn_fast::batch_norm_update_stats_triton",
    **_running_update_kwargs("(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
                             "Tensor var, float momentum, int count, "
                             "Tensor(c!)? num_batches_tracked) -> ()"),
)
def batch_norm_update_stats_triton(running_mean: torch.Tensor, running_var: torch.Tensor,
                                   mean: torch.Tensor, var: torch.Tensor, momentum: float,
                                   count: int, num_batches_tracked: Optional[torch.Tensor]) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch, with the unbiased
    variance var * count / (count - 1) into running_var, and num_batches_tracked += 1 when
    given; one launch for all, math in float32 (float64 for float64 running statistics).
    running_mean, running_var, mean, var: (C,) on one device; count: the values per
    channel (N*H*W), > 1; num_batches_tracked: one int64 value."""
    _check_update(running_mean, running_var, mean, var, count, num_batches_tracked)
    _update(running_mean, running_var, mean, var, momentum, count, num_batches_tracked)


def _update(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
            var: torch.Tensor, momentum: float, count: int,
            num_batches_tracked: Optional[torch.Tensor]) -> None:
    """batch_norm_update_stats_triton after its checks."""
    C = running_mean.shape[0]
    has_nbt = num_batches_tracked is not None
    if C == 0 and not has_nbt:
        return
    # Strided running statistics are updated through contiguous copies, copied back.
    rm, rv = _vec(running_mean), _vec(running_var)
    with device_guard(running_mean):
        # One program at least: num_batches_tracked counts a call with no channels too.
        _kernel(_bn_update_stats_kernel, running_mean)[_channel_grid(max(C, 1))](
            rm, rv, _vec(mean), _vec(var), num_batches_tracked if has_nbt else rm, C, int(count),
            float(momentum), _bits(momentum), IS_FP64=running_mean.dtype == torch.float64,
            HAS_NBT=has_nbt,
        )
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)


for _op in (batch_norm_relu_triton, batch_norm_relu_backward_triton, batch_norm_update_stats_triton,
            batch_norm_relu_with_update_triton):
    opaque_when_interpreted(_op)
_registry.register_batch_norm_relu(batch_norm_relu_triton, batch_norm_relu_backward_triton,
                                   batch_norm_update_stats_triton, batch_norm_relu_with_update_triton,
                                   fakes=needs_fake(batch_norm_relu_triton))


def batch_norm_relu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                    training: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var) on the Triton kernels; see batch_norm_relu_triton."""
    return batch_norm_relu_triton(x, weight, bias, running_mean, running_var, bool(training),
                                  float(eps))


def batch_norm_relu_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                             training: bool, eps: float, grad_residual: Optional[torch.Tensor],
                             weight_grads: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) on the Triton kernels; see
    batch_norm_relu_backward_triton."""
    return batch_norm_relu_backward_triton(grad, x, weight, bias, mean, var, bool(training),
                                           float(eps), grad_residual, bool(weight_grads))


def batch_norm_relu_with_update(x: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                                running_var: torch.Tensor, momentum: float, eps: float,
                                num_batches_tracked: Optional[torch.Tensor] = None,
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward and running update on the Triton kernels; see
    batch_norm_relu_with_update_triton."""
    return batch_norm_relu_with_update_triton(x, weight, bias, running_mean, running_var,
                                              float(momentum), float(eps), num_batches_tracked)


def batch_norm_update_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                            mean: torch.Tensor, var: torch.Tensor, momentum: float,
                            count: int, num_batches_tracked: Optional[torch.Tensor] = None) -> None:
    """The in-place running-statistics update on the Triton kernel; see
    batch_norm_update_stats_triton."""
    batch_norm_update_stats_triton(running_mean, running_var, mean, var, float(momentum),
                                   int(count), num_batches_tracked)

