"""Triton GroupNorm -> per-sample scale/shift modulation -> SiLU (the UNet's norm block).

y = GroupNorm(x; weight, bias) * (1 + scale) + shift, then SiLU if ``silu``.
Per (b, c) everything folds into one affine map of the centred input,
    a = (x - mean) * alpha + beta,   alpha = rstd * w * (1 + s),   beta = bias * (1 + s) + shift.
(Centring first, rather than folding the mean into beta, avoids the cancellation between
x * alpha and mean * alpha when |mean| >> std, for one more subtraction per element.)

Kernels (arithmetic in float32, whatever the storage dtype; the per-range statistics are merged in
float64, and a range whose float32 M2 overflows is summed again in float64):
- forward: ``_gn_stats_partial_kernel`` (per (b, group, spatial range): count, mean and M2,
  merging per-tile statistics with Chan's formula so that large groups keep their precision),
  ``_gn_stats_finalize_kernel`` (merges the ranges: mean, rstd per (b, group)), then
  ``_gn_apply_kernel`` (elementwise over (b, channel tile, spatial tile)). Splitting the spatial
  axis keeps the GPU busy when B * G is small (batch-1 decoding).
- backward: ``_gn_bwd_reduce_kernel`` recomputes a from x, mean, rstd and sums, per (b, c) and
  spatial range, S1 = sum da and S2 = sum da * xhat (da = dy * silu'(a)); the ranges are summed in
  a fixed order (deterministic, no atomics); the parameter gradients and the per
  group terms A = sum_c k_c S1_c / n, Bv = sum_c k_c S2_c / n (k = w (1 + s), n = (C/G) H W)
  are small (B, C) tensor ops; ``_gn_bwd_dx_kernel`` writes dx = rstd (k da - A - xhat Bv).

Layout: the kernels address x through its (batch, channel, spatial) strides, so NCHW-contiguous
and channels_last tensors run natively (no copies) and outputs keep the input's layout. In
channels_last the per-group statistics read short channel runs with a stride of C; that is
correct but not the fastest possible NHWC schedule.
"""

from typing import Optional

import torch

from . import HAS_TRITON, MAX_GRID_YZ, is_channels_last, needs_int64, next_power_of_2, tensor_reasons

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

_TILE = 1024  # elements per tile (BLOCK_C * BLOCK_S)
_TARGET_PROGRAMS = 1024  # reductions split the spatial axis until about this many programs run
_MAX_SPLITS = 256


def unsupported_reasons(x, num_groups=None, weight=None, bias=None, scale=None, shift=None,
                        eps: float = 1e-5, silu: bool = True, *args, **kwargs) -> list[str]:
    """Why :func:`group_norm_modulate_silu` cannot run these inputs (empty list: it can)."""
    reasons = tensor_reasons(("weight", "bias", "scale", "shift"), x=x, weight=weight, bias=bias, scale=scale,
                             shift=shift)
    if not HAS_TRITON or not isinstance(x, torch.Tensor):
        return reasons
    if x.dim() != 4:
        return reasons + [f"x must have shape (B, C, H, W), got {tuple(x.shape)}"]
    B, C = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        reasons.append(f"{C} channels are not divisible into {num_groups} groups")
    for name, p, shape in (("weight", weight, (C,)), ("bias", bias, (C,)),
                           ("scale", scale, (B, C)), ("shift", shift, (B, C))):
        if isinstance(p, torch.Tensor) and tuple(p.shape) != shape:
            reasons.append(f"{name} must have shape {shape}, got {tuple(p.shape)}")
    if B > MAX_GRID_YZ:
        reasons.append(f"batch {B} exceeds the grid limit {MAX_GRID_YZ}")
    return reasons


def _strides(t: torch.Tensor):
    """(batch, channel, flattened-spatial) strides of a 4-D tensor, or None when H and W cannot be
    flattened into one index (then the caller copies to contiguous)."""
    H, W = t.shape[2], t.shape[3]
    sh, sw = t.stride(2), t.stride(3)
    if W == 1:
        ss = sh if H > 1 else 1
    elif H == 1 or sh == W * sw:
        ss = sw
    else:
        return None
    return t.stride(0), t.stride(1), ss


def _dense(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` as NCHW-contiguous or channels_last (following ``like`` if given), copying if needed."""
    ref = t if like is None else like
    if is_channels_last(ref):
        t = t.contiguous(memory_format=torch.channels_last)
    else:
        t = t.contiguous()
    if _strides(t) is None:  # size-1 dims with unusual strides
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _tiles(C: int, block_c_max: int, HW: int, channels_last: bool):
    """(BLOCK_C, BLOCK_S): long runs along the unit-stride dimension, BLOCK_C * BLOCK_S <= _TILE."""
    if channels_last:
        bc = min(next_power_of_2(block_c_max), 64)
        bs = max(1, min(next_power_of_2(HW), _TILE // bc))
    else:
        bs = min(next_power_of_2(HW), _TILE)
        bc = max(1, min(next_power_of_2(block_c_max), _TILE // bs))
    return bc, bs


def _split(HW: int, block_s: int, programs: int):
    """(S_PER_SPLIT, NSPLIT): cut the spatial axis so that about _TARGET_PROGRAMS programs run in
    all (batch-1 decoding has only G groups), in whole tiles, at most _MAX_SPLITS pieces."""
    tiles = _cdiv(HW, block_s)
    nsplit = max(1, min(tiles, _MAX_SPLITS, _cdiv(_TARGET_PROGRAMS, programs)))
    per_split = _cdiv(tiles, nsplit) * block_s
    return per_split, _cdiv(HW, per_split)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if HAS_TRITON:

    @triton.jit
    def _range_moments(base, s_lo, s_hi, Cg, sxc, sxs, offs_c, offs_s, DTYPE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        # (count, mean, M2) in DTYPE of one group's channels over the spatial range [s_lo, s_hi),
        # tile by tile, merged with Chan's formula.
        count = tl.zeros((), dtype=DTYPE)
        mean = tl.zeros((), dtype=DTYPE)
        m2 = tl.zeros((), dtype=DTYPE)
        for c0 in range(0, Cg, BLOCK_C):
            cs = c0 + offs_c
            cmask = cs < Cg
            nc = tl.minimum(Cg - c0, BLOCK_C)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                ss = s0 + offs_s
                m = cmask[:, None] & (ss < s_hi)[None, :]
                x = tl.load(base + cs[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(DTYPE)
                n_t = (nc * tl.minimum(s_hi - s0, BLOCK_S)).to(DTYPE)
                mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
                d = tl.where(m, x - mean_t, 0.0)
                m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
                n_new = count + n_t
                delta = mean_t - mean
                mean = mean + delta * (n_t / n_new)
                m2 = m2 + m2_t + delta * delta * (count * n_t / n_new)
                count = n_new
        return count, mean, m2

    @triton.jit
    def _gn_stats_partial_kernel(x_ptr, part_ptr, HW, Cg, G, S_PER_SPLIT, NSPLIT, sxb, sxc, sxs,
                                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
        # grid: (B * G, NSPLIT). (count, mean, M2) of one group over one spatial range, in float32,
        # stored as float64. Groups vary fastest, so the programs running together read
        # neighbouring channels of the same pixels (shared cache lines in channels_last). Finite
        # values with |x - mean| above ~1.8e19 overflow the float32 M2 (rstd would come out 0 and
        # the output silently silu(beta)): such a range is summed again in float64, as the CPU
        # kernels do (refine_overflowed_moments); one holding inf or NaN stays non-finite.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        if IDX64:
            split = split.to(tl.int64)  # s_lo + S_PER_SPLIT passes 2^31 for planes near that size
        b = (pid // G).to(tl.int64)
        g = pid % G
        base = x_ptr + b * sxb + (g * Cg).to(tl.int64) * sxc
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, HW)
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        if IDX64:
            offs_c = offs_c.to(tl.int64)
            offs_s = offs_s.to(tl.int64)
        count, mean32, m2_32 = _range_moments(base, s_lo, s_hi, Cg, sxc, sxs, offs_c, offs_s, tl.float32,
                                              BLOCK_C, BLOCK_S)
        mean = mean32.to(tl.float64)
        m2 = m2_32.to(tl.float64)
        if not (tl.abs(m2_32) < float("inf")):  # rare: overflowed (or inf/NaN in the range)
            _, mean, m2 = _range_moments(base, s_lo, s_hi, Cg, sxc, sxs, offs_c, offs_s, tl.float64,
                                         BLOCK_C, BLOCK_S)
        out = part_ptr + (pid.to(tl.int64) * NSPLIT + split) * 3
        tl.store(out, count.to(tl.float64))
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def _gn_stats_finalize_kernel(part_ptr, mean_ptr, rstd_ptr, NSPLIT, eps, BLOCK_P: tl.constexpr):
        # grid: (B * G,). Chan's formula over the partial statistics of one group (float64).
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_P)
        pm = offs < NSPLIT
        base = part_ptr + pid.to(tl.int64) * NSPLIT * 3 + offs * 3
        n_i = tl.load(base, mask=pm, other=0.0)
        mean_i = tl.load(base + 1, mask=pm, other=0.0)
        m2_i = tl.load(base + 2, mask=pm, other=0.0)
        n = tl.sum(n_i, axis=0)
        mean = tl.sum(n_i * mean_i, axis=0) / n
        d = tl.where(pm, mean_i - mean, 0.0)
        m2 = tl.sum(m2_i + n_i * d * d, axis=0)
        tl.store(mean_ptr + pid, mean.to(tl.float32))
        tl.store(rstd_ptr + pid, (1.0 / tl.sqrt(m2 / n + eps)).to(tl.float32))

    @triton.jit
    def _gn_coeffs(b, cs, cmask, C, Cg, G, mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-channel vectors for channel indices ``cs`` of sample ``b``."""
        grp = b * G + cs // Cg
        mean = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_B:
            bb = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            bb = tl.zeros([BLOCK_C], tl.float32)
        if HAS_SCALE:
            s1 = 1.0 + tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            s1 = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            sh = tl.zeros([BLOCK_C], tl.float32)
        k = w * s1
        alpha = rstd * k
        beta = bb * s1 + sh
        return grp, mean, rstd, k, alpha, beta

    @triton.jit
    def _sigmoid(a):
        # exp of a non-positive argument only: no overflow for large |a| (masked lanes included)
        e = tl.exp(-tl.abs(a))
        r = 1.0 / (1.0 + e)
        return tl.where(a >= 0, r, e * r)

    @triton.jit
    def _tile_indices(BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
        """Channel and spatial indices of this program's tile (grid axes 1 and 0), in int64 when
        IDX64 (offsets cs * stride_c + ss * stride_s past 2^31)."""
        cb = tl.program_id(1)
        sb = tl.program_id(0)
        if IDX64:
            cb = cb.to(tl.int64)
            sb = sb.to(tl.int64)
        return cb * BLOCK_C + tl.arange(0, BLOCK_C), sb * BLOCK_S + tl.arange(0, BLOCK_S)

    @triton.jit
    def _gn_apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
                         C, HW, Cg, G, sxb, sxc, sxs, syb, syc, sys,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
        # grid: (cdiv(HW, BLOCK_S), cdiv(C, BLOCK_C), B)
        b = tl.program_id(2).to(tl.int64)
        cs, ss = _tile_indices(BLOCK_C, BLOCK_S, IDX64)
        cmask = cs < C
        m = cmask[:, None] & (ss < HW)[None, :]
        _, mean, _, _, alpha, beta = _gn_coeffs(b, cs, cmask, C, Cg, G, mean_ptr, rstd_ptr, w_ptr, bias_ptr,
                                             scale_ptr, shift_ptr, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        x = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
        a = (x - mean[:, None]) * alpha[:, None] + beta[:, None]
        if SILU:
            a = a * _sigmoid(a)
        tl.store(y_ptr + b * syb + cs[:, None] * syc + ss[None, :] * sys, a.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_da_xhat(x, dy, mean, rstd, alpha, beta, SILU: tl.constexpr):
        """da = dy * silu'(a) (or dy) and xhat for a tile; per-channel vectors broadcast over columns."""
        xc = x - mean[:, None]
        xhat = xc * rstd[:, None]
        if SILU:
            a = xc * alpha[:, None] + beta[:, None]
            sig = _sigmoid(a)
            da = dy * (sig * (1.0 + a * (1.0 - sig)))
        else:
            da = dy
        return da, xhat

    @triton.jit
    def _gn_bwd_reduce_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
                              s1_ptr, s2_ptr, C, HW, Cg, G, S_PER_SPLIT, NSPLIT, sxb, sxc, sxs, sdb, sdc, sds,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                              HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
        # grid: (cdiv(C, BLOCK_C), B, NSPLIT). Partial sums over one spatial range:
        # S1[b, split, c] = sum_s da, S2[b, split, c] = sum_s da * xhat
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        cb = tl.program_id(0)
        offs_s = tl.arange(0, BLOCK_S)
        if IDX64:
            cb = cb.to(tl.int64)
            offs_s = offs_s.to(tl.int64)
            split = split.to(tl.int64)
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        _, mean, rstd, _, alpha, beta = _gn_coeffs(b, cs, cmask, C, Cg, G, mean_ptr, rstd_ptr, w_ptr, bias_ptr,
                                                   scale_ptr, shift_ptr, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT,
                                                   BLOCK_C)
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, HW)
        acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + offs_s
            m = cmask[:, None] & (ss < s_hi)[None, :]
            x = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + b * sdb + cs[:, None] * sdc + ss[None, :] * sds, mask=m, other=0.0).to(tl.float32)
            da, xhat = _gn_da_xhat(x, dy, mean, rstd, alpha, beta, SILU)
            da = tl.where(m, da, 0.0)
            acc1 += da
            acc2 += da * xhat
        out = (b * NSPLIT + split) * C + cs
        tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=cmask)
        tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=cmask)

    @triton.jit
    def _gn_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
                          ga_ptr, gb_ptr, C, HW, Cg, G, sxb, sxc, sxs, sdb, sdc, sds, sob, soc, sos,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
        # grid: (cdiv(HW, BLOCK_S), cdiv(C, BLOCK_C), B). dx = rstd * (k da - A - xhat Bv)
        b = tl.program_id(2).to(tl.int64)
        cs, ss = _tile_indices(BLOCK_C, BLOCK_S, IDX64)
        cmask = cs < C
        m = cmask[:, None] & (ss < HW)[None, :]
        grp, mean, rstd, k, alpha, beta = _gn_coeffs(b, cs, cmask, C, Cg, G, mean_ptr, rstd_ptr, w_ptr,
                                                     bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B, HAS_SCALE,
                                                     HAS_SHIFT, BLOCK_C)
        ga = tl.load(ga_ptr + grp, mask=cmask, other=0.0)
        gb = tl.load(gb_ptr + grp, mask=cmask, other=0.0)
        x = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + b * sdb + cs[:, None] * sdc + ss[None, :] * sds, mask=m, other=0.0).to(tl.float32)
        da, xhat = _gn_da_xhat(x, dy, mean, rstd, alpha, beta, SILU)
        dx = rstd[:, None] * (k[:, None] * da - ga[:, None] - xhat * gb[:, None])
        tl.store(dx_ptr + b * sob + cs[:, None] * soc + ss[None, :] * sos, dx.to(dx_ptr.dtype.element_ty), mask=m)

    # ----------------------------------------------------------------------------------------
    # registered ops

    def _param_args(x, weight, bias, scale, shift):
        """Kernel pointers for optional parameters (x stands in for absent ones) and their flags."""
        ptrs = [p.contiguous() if p is not None else x for p in (weight, bias, scale, shift)]
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                     HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None)
        return ptrs, flags

    @triton_op("dito_fast_triton::group_norm_modulate_silu", mutates_args=())
    def _gn_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float,
               silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x)
        B, C, H, W = x.shape
        G, HW = num_groups, H * W
        Cg = C // G
        y = torch.empty_like(x)
        mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
        rstd = torch.empty((B, G), dtype=torch.float32, device=x.device)
        if x.numel() == 0:
            return y, mean, rstd
        cl = is_channels_last(x)
        (sxb, sxc, sxs), (syb, syc, sys) = _strides(x), _strides(y)
        (w, bb, sc, sh), flags = _param_args(x, weight, bias, scale, shift)
        idx64 = needs_int64(x, y)
        bc, bs = _tiles(C, Cg, HW, cl)
        per_split, nsplit = _split(HW, bs, B * G)
        part = torch.empty((B * G, nsplit, 3), dtype=torch.float64, device=x.device)
        wrap_triton(_gn_stats_partial_kernel)[(B * G, nsplit)](x, part, HW, Cg, G, per_split, nsplit,
                                                                sxb, sxc, sxs, BLOCK_C=bc, BLOCK_S=bs, IDX64=idx64,
                                                                num_warps=4)
        wrap_triton(_gn_stats_finalize_kernel)[(B * G,)](part, mean, rstd, nsplit, eps,
                                                          BLOCK_P=next_power_of_2(nsplit), num_warps=1)
        bc, bs = _tiles(C, C, HW, cl)
        grid = (triton.cdiv(HW, bs), triton.cdiv(C, bc), B)
        wrap_triton(_gn_apply_kernel)[grid](x, y, mean, rstd, w, bb, sc, sh, C, HW, Cg, G,
                                             sxb, sxc, sxs, syb, syc, sys, SILU=silu,
                                             BLOCK_C=bc, BLOCK_S=bs, IDX64=idx64, num_warps=4, **flags)
        return y, mean, rstd

    @triton_op("dito_fast_triton::group_norm_modulate_silu_backward", mutates_args=())
    def _gn_backward_op(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        num_groups: int, silu: bool) -> list[torch.Tensor]:
        """Returns [dx, dweight, dbias, dscale, dshift]; absent parameters get empty tensors."""
        x = _dense(x)
        grad = _dense(grad, like=x)
        B, C, H, W = x.shape
        G, HW = num_groups, H * W
        Cg = C // G
        dx = torch.empty_like(x)
        cl = is_channels_last(x)
        sx, sd, so = _strides(x), _strides(grad), _strides(dx)
        (w, bb, sc, sh), flags = _param_args(x, weight, bias, scale, shift)
        idx64 = needs_int64(x, grad, dx)
        if x.numel() > 0:
            bc, bs = _tiles(C, C, HW, cl)
            per_split, nsplit = _split(HW, bs, triton.cdiv(C, bc) * B)
            s1p = torch.empty((B, nsplit, C), dtype=torch.float32, device=x.device)
            s2p = torch.empty((B, nsplit, C), dtype=torch.float32, device=x.device)
            wrap_triton(_gn_bwd_reduce_kernel)[(triton.cdiv(C, bc), B, nsplit)](
                x, grad, mean, rstd, w, bb, sc, sh, s1p, s2p, C, HW, Cg, G, per_split, nsplit, *sx, *sd,
                SILU=silu, BLOCK_C=bc, BLOCK_S=bs, IDX64=idx64, num_warps=4, **flags)
            s1, s2 = s1p.sum(dim=1), s2p.sum(dim=1)  # fixed order: deterministic
        else:
            s1 = torch.zeros((B, C), dtype=torch.float32, device=x.device)
            s2 = torch.zeros((B, C), dtype=torch.float32, device=x.device)
        # (B, C) / (B, G) algebra: tiny next to the two passes over x
        wf = weight.float() if weight is not None else torch.ones(C, dtype=torch.float32, device=x.device)
        one_s = (1.0 + scale.float()) if scale is not None else torch.ones_like(s1)
        k = wf * one_s
        n = float(Cg * HW)
        ga = (k * s1).view(B, G, Cg).sum(dim=2) / n
        gb = (k * s2).view(B, G, Cg).sum(dim=2) / n
        if x.numel() > 0:
            bc, bs = _tiles(C, C, HW, cl)
            grid = (triton.cdiv(HW, bs), triton.cdiv(C, bc), B)
            wrap_triton(_gn_bwd_dx_kernel)[grid](
                x, grad, dx, mean, rstd, w, bb, sc, sh, ga, gb, C, HW, Cg, G, *sx, *sd, *so, SILU=silu,
                BLOCK_C=bc, BLOCK_S=bs, IDX64=idx64, num_warps=4, **flags)
        # absent parameters get distinct empty tensors (a custom op's outputs may not alias)
        dweight = (one_s * s2).sum(dim=0).to(weight.dtype) if weight is not None else x.new_empty(0)
        dbias = (one_s * s1).sum(dim=0).to(bias.dtype) if bias is not None else x.new_empty(0)
        if scale is not None:
            dscale = wf * s2 + (bias.float() * s1 if bias is not None else 0.0)
            dscale = dscale.to(scale.dtype)
        else:
            dscale = x.new_empty(0)
        dshift = s1.to(shift.dtype) if shift is not None else x.new_empty(0)
        return [dx, dweight, dbias, dscale, dshift]

    def _setup(ctx, inputs, output):
        x, num_groups, weight, bias, scale, shift, eps, silu = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
        ctx.num_groups, ctx.silu = num_groups, silu

    def _backward(ctx, grad_y, grad_mean, grad_rstd):
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        if grad_y is None:
            return (None,) * 8
        dx, dweight, dbias, dscale, dshift = _gn_backward_op(grad_y, x, mean, rstd, weight, bias, scale, shift,
                                                             ctx.num_groups, ctx.silu)
        return (dx, None, dweight if weight is not None else None, dbias if bias is not None else None,
                dscale if scale is not None else None, dshift if shift is not None else None, None, None)

    _gn_op.register_autograd(_backward, setup_context=_setup)


def group_norm_modulate_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                             shift: Optional[torch.Tensor] = None, eps: float = 1e-5,
                             silu: bool = True) -> torch.Tensor:
    """Fused GroupNorm -> (1 + scale), + shift -> SiLU.

    x: (B, C, H, W) float32/float16/bfloat16, NCHW-contiguous or channels_last (other layouts are
    copied to contiguous); weight, bias: (C,) or None; scale, shift: (B, C) or None; C divisible by
    ``num_groups``. Returns y with the shape, dtype and memory layout of x. Differentiable in x and
    every given parameter.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    return _gn_op(x, int(num_groups), weight, bias, scale, shift, float(eps), bool(silu))[0]
