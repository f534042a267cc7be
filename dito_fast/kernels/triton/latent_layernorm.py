"""Triton affine-free LayerNorm of the latent over (C, H, W), per sample (DiTo's latent normalisation).

y = (z - mean) * rstd, rstd = 1 / sqrt(var + eps), biased variance over each sample's C*H*W values.
Backward from the saved output and rstd:  dz = rstd * (g - mean(g) - y * mean(g * y)).

One program per sample walks its values block by block (latents hold at most ~16k values per
sample). The reduction covers all of a sample, so the memory order does not matter: contiguous
and channels_last inputs are used as they are.
"""

import torch

from . import HAS_TRITON, dense_like, next_power_of_2, tensor_reasons

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def unsupported_reasons(z, eps: float = 1e-5, *args, **kwargs) -> list[str]:
    """Why :func:`latent_layernorm` cannot run these inputs (empty list: it can)."""
    reasons = tensor_reasons(z=z)
    if not HAS_TRITON or not isinstance(z, torch.Tensor):
        return reasons
    if z.dim() != 4:
        reasons.append(f"z must have shape (B, C, H, W), got {tuple(z.shape)}")
    return reasons


def _block(n: int) -> int:
    return max(16, min(2048, next_power_of_2(n)))


if HAS_TRITON:

    @triton.jit
    def _sample_moments(z_ptr, base, N, offs, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # Mean and biased variance in DTYPE of one sample's N values: two passes (mean, then
        # centred squares).
        acc = tl.zeros([BLOCK], dtype=DTYPE)
        for start in range(0, N, BLOCK):
            m = start + offs < N
            acc += tl.load(z_ptr + base + start + offs, mask=m, other=0.0).to(DTYPE)
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=DTYPE)
        for start in range(0, N, BLOCK):
            m = start + offs < N
            d = tl.load(z_ptr + base + start + offs, mask=m, other=0.0).to(DTYPE) - mean
            acc += tl.where(m, d * d, 0.0)
        return mean, tl.sum(acc, axis=0) / N

    @triton.jit
    def _latent_ln_fwd_kernel(z_ptr, y_ptr, rstd_ptr, N, eps, BLOCK: tl.constexpr):
        # grid: (B,). Statistics in float32, then one pass to write. Finite values with |z - mean|
        # above ~1.8e19 overflow the float32 sum of squares (rstd would come out 0 and the output
        # silently 0): such a sample's statistics are formed again in float64, as the CPU kernel
        # does (refine_overflowed_moments); one holding inf or NaN stays non-finite.
        b = tl.program_id(0).to(tl.int64)
        base = b * N
        offs = tl.arange(0, BLOCK)
        mean, var = _sample_moments(z_ptr, base, N, offs, tl.float32, BLOCK)
        # (cast: under torch.compile, Inductor passes eps as a float64 constant)
        rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
        if not (tl.abs(var) < float("inf")):  # rare: overflowed (or inf/NaN in the sample)
            mean64, var64 = _sample_moments(z_ptr, base, N, offs, tl.float64, BLOCK)
            mean = mean64.to(tl.float32)
            rstd = (1.0 / tl.sqrt(var64 + eps)).to(tl.float32)
        tl.store(rstd_ptr + b, rstd)
        for start in range(0, N, BLOCK):
            m = start + offs < N
            z = tl.load(z_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(y_ptr + base + start + offs, ((z - mean) * rstd).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _latent_ln_bwd_kernel(g_ptr, y_ptr, rstd_ptr, dz_ptr, N, BLOCK: tl.constexpr):
        # grid: (B,). dz = rstd * (g - mean(g) - y * mean(g * y))
        b = tl.program_id(0).to(tl.int64)
        base = b * N
        offs = tl.arange(0, BLOCK)
        sg = tl.zeros([BLOCK], dtype=tl.float32)
        sgy = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            m = start + offs < N
            g = tl.load(g_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
            sg += g
            sgy += g * y
        mean_g = tl.sum(sg, axis=0) / N
        mean_gy = tl.sum(sgy, axis=0) / N
        rstd = tl.load(rstd_ptr + b)
        for start in range(0, N, BLOCK):
            m = start + offs < N
            g = tl.load(g_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
            dz = rstd * (g - mean_g - y * mean_gy)
            tl.store(dz_ptr + base + start + offs, dz.to(dz_ptr.dtype.element_ty), mask=m)

    @triton_op("dito_fast_triton::latent_layernorm", mutates_args=())
    def _latent_layernorm_op(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = dense_like(z, z)
        B = z.shape[0]
        N = z.numel() // B if B else 0
        y = torch.empty_like(z)
        rstd = torch.empty((B,), dtype=torch.float32, device=z.device)
        if z.numel() > 0:
            wrap_triton(_latent_ln_fwd_kernel)[(B,)](z, y, rstd, N, eps, BLOCK=_block(N), num_warps=4)
        return y, rstd

    @triton_op("dito_fast_triton::latent_layernorm_backward", mutates_args=())
    def _latent_layernorm_backward_op(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        y = dense_like(y, y)
        grad = dense_like(grad, y)
        B = y.shape[0]
        N = y.numel() // B if B else 0
        dz = torch.empty_like(y)
        if y.numel() > 0:
            wrap_triton(_latent_ln_bwd_kernel)[(B,)](grad, y, rstd, dz, N, BLOCK=_block(N), num_warps=4)
        return dz

    def _setup(ctx, inputs, output):
        y, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(y, rstd)

    def _backward(ctx, grad_y, grad_rstd):
        y, rstd = ctx.saved_tensors
        if grad_y is None:
            return None, None
        return _latent_layernorm_backward_op(grad_y, y, rstd), None

    _latent_layernorm_op.register_autograd(_backward, setup_context=_setup)


def latent_layernorm(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each sample of ``z`` (B, C, H, W) to zero mean and unit variance over (C, H, W).

    Float32/float16/bfloat16 storage, float32 arithmetic (float64 statistics for a sample whose
    float32 sum of squares overflows). Returns the shape, dtype and layout of z.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    return _latent_layernorm_op(z, float(eps))[0]
