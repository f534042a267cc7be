"""Triton flow-matching elementwise ops: noising with its velocity target, and the per-sample MSE.

x_t = (1 - t) x + (s + t (1 - s)) e,  v = (1 - s) e - x   (s = sigma_min; DESIGN.md §1)
loss_b = mean_i (pred_bi - target_bi)^2, accumulated in float32.

Tensors are processed in memory order, per sample: contiguous and channels_last inputs keep
their layout (outputs are ``empty_like`` the first input); other layouts are copied first.
"""

import torch

from . import HAS_TRITON, MAX_GRID_YZ, dense_like, needs_int64, tensor_reasons

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

_BLOCK = 1024  # elements per program (elementwise kernels)
_LOSS_BLOCK = 2048  # elements per program (loss partial sums)


# --------------------------------------------------------------------------------------------
# capability checks


def _shape_reasons_noise(x, noise, t) -> list[str]:
    reasons = []
    if x.dim() < 1 or x.shape != noise.shape:
        reasons.append(f"x {tuple(x.shape)} and noise {tuple(noise.shape)} must have the same shape (B, ...)")
    elif t.dim() != 1 or t.shape[0] != x.shape[0]:
        reasons.append(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    elif x.shape[0] > MAX_GRID_YZ:
        reasons.append(f"batch {x.shape[0]} exceeds the grid limit {MAX_GRID_YZ}")
    if x.dtype != noise.dtype:
        reasons.append(f"x ({x.dtype}) and noise ({noise.dtype}) must share a dtype")
    if not t.is_floating_point():
        reasons.append(f"t must be floating point, got {t.dtype}")
    return reasons


def fm_noise_unsupported_reasons(x, noise, t, sigma_min: float = 1e-5, *args, **kwargs) -> list[str]:
    """Why :func:`fm_noise` cannot run these inputs (empty list: it can)."""
    reasons = tensor_reasons(x=x, noise=noise)
    if not HAS_TRITON or not (isinstance(x, torch.Tensor) and isinstance(noise, torch.Tensor)):
        return reasons
    if not isinstance(t, torch.Tensor):
        return reasons + ["t is not a tensor"]
    if t.device != x.device:
        reasons.append(f"t is on {t.device}, x on {x.device}")
    return reasons + _shape_reasons_noise(x, noise, t)


def fm_loss_unsupported_reasons(pred, target, *args, **kwargs) -> list[str]:
    """Why :func:`fm_loss` cannot run these inputs (empty list: it can)."""
    reasons = tensor_reasons(pred=pred, target=target)
    if not HAS_TRITON or not (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor)):
        return reasons
    if pred.dim() < 1 or pred.shape != target.shape:
        reasons.append(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape (B, ...)")
    elif pred.shape[0] > MAX_GRID_YZ:
        reasons.append(f"batch {pred.shape[0]} exceeds the grid limit {MAX_GRID_YZ}")
    return reasons


def unsupported_reasons(*args, **kwargs) -> list[str]:
    """Generic check for this module's ops: triton present, every tensor argument usable."""
    tensors = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return tensor_reasons(**tensors)


# --------------------------------------------------------------------------------------------
# kernels

if HAS_TRITON:

    @triton.jit
    def _fm_noise_fwd_kernel(x_ptr, e_ptr, t_ptr, xt_ptr, v_ptr, N, sigma_min,
                             BLOCK: tl.constexpr, IDX64: tl.constexpr):
        # grid: (cdiv(N, BLOCK), B); each sample is N contiguous elements
        b = tl.program_id(1).to(tl.int64)
        blk = tl.program_id(0)
        if IDX64:
            blk = blk.to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b * N
        t = tl.load(t_ptr + b).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        sigma = sigma_min + t * (1.0 - sigma_min)
        xt = (1.0 - t) * x + sigma * e
        v = (1.0 - sigma_min) * e - x
        tl.store(xt_ptr + base + offs, xt.to(xt_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + base + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fm_noise_bwd_kernel(gxt_ptr, gv_ptr, t_ptr, dx_ptr, de_ptr, N, sigma_min,
                             BLOCK: tl.constexpr, IDX64: tl.constexpr):
        # dx = g_xt (1 - t) - g_v ; de = g_xt sigma(t) + g_v (1 - s)
        b = tl.program_id(1).to(tl.int64)
        blk = tl.program_id(0)
        if IDX64:
            blk = blk.to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b * N
        t = tl.load(t_ptr + b).to(tl.float32)
        gxt = tl.load(gxt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(gv_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        sigma = sigma_min + t * (1.0 - sigma_min)
        dx = gxt * (1.0 - t) - gv
        de = gxt * sigma + gv * (1.0 - sigma_min)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(de_ptr + base + offs, de.to(de_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fm_loss_partial_kernel(p_ptr, y_ptr, part_ptr, N, NUM_CHUNKS, BLOCK: tl.constexpr, IDX64: tl.constexpr):
        # grid: (NUM_CHUNKS, B); part[b, chunk] = sum over the chunk of (p - y)^2 in float32
        chunk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        if IDX64:
            chunk = chunk.to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(p_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - y
        tl.store(part_ptr + b * NUM_CHUNKS + chunk, tl.sum(d * d, axis=0))

    @triton.jit
    def _fm_loss_bwd_kernel(p_ptr, y_ptr, g_ptr, dp_ptr, dy_ptr, N, BLOCK: tl.constexpr, IDX64: tl.constexpr):
        # d loss_b / d pred = 2 (pred - target) / N ; the target gets the negative
        b = tl.program_id(1).to(tl.int64)
        blk = tl.program_id(0)
        if IDX64:
            blk = blk.to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(g_ptr + b).to(tl.float32)
        p = tl.load(p_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        dp = (p - y) * (2.0 * g / N)
        tl.store(dp_ptr + b * N + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + b * N + offs, (-dp).to(dy_ptr.dtype.element_ty), mask=mask)

    # ----------------------------------------------------------------------------------------
    # registered ops

    @triton_op("dito_fast_triton::fm_noise", mutates_args=())
    def _fm_noise_op(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     sigma_min: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = dense_like(x, x)
        noise = dense_like(noise, x)
        t = t.to(torch.float32).contiguous()
        x_t = torch.empty_like(x)
        v = torch.empty_like(x)
        B = x.shape[0]
        N = x.numel() // B if B else 0
        if x.numel() > 0:
            grid = (triton.cdiv(N, _BLOCK), B)
            wrap_triton(_fm_noise_fwd_kernel)[grid](x, noise, t, x_t, v, N, sigma_min, BLOCK=_BLOCK,
                                                    IDX64=needs_int64(x))
        return x_t, v

    @triton_op("dito_fast_triton::fm_noise_backward", mutates_args=())
    def _fm_noise_backward_op(grad_xt: torch.Tensor, grad_v: torch.Tensor, t: torch.Tensor,
                              sigma_min: float) -> tuple[torch.Tensor, torch.Tensor]:
        grad_v = dense_like(grad_v, grad_xt)
        grad_xt = dense_like(grad_xt, grad_v)
        t = t.to(torch.float32).contiguous()
        dx = torch.empty_like(grad_xt)
        dnoise = torch.empty_like(grad_xt)
        B = grad_xt.shape[0]
        N = grad_xt.numel() // B if B else 0
        if grad_xt.numel() > 0:
            grid = (triton.cdiv(N, _BLOCK), B)
            wrap_triton(_fm_noise_bwd_kernel)[grid](grad_xt, grad_v, t, dx, dnoise, N, sigma_min, BLOCK=_BLOCK,
                                                    IDX64=needs_int64(grad_xt))
        return dx, dnoise

    def _fm_noise_setup(ctx, inputs, output):
        x, noise, t, sigma_min = inputs
        # x and noise only for t's gradient (rarely wanted: t is sampled), as in csrc/autograd.cpp
        ctx.save_for_backward(t, *((x, noise) if ctx.needs_input_grad[2] else ()))
        ctx.sigma_min = sigma_min
        ctx.x_dtype, ctx.noise_dtype = x.dtype, noise.dtype
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.mark_non_differentiable(output[1])  # v does not depend on t

    def _fm_noise_backward(ctx, grad_xt, grad_v):
        t, *x_noise = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[2] and grad_xt is not None:
            # sum over each sample of grad_x_t * dx_t/dt = grad_x_t * v, in float32
            x, noise = (a.float() for a in x_noise)
            v = noise * (1 - ctx.sigma_min) - x
            grad_t = (grad_xt.float() * v).reshape(x.shape[0], -1).sum(1).to(t.dtype)
        like = grad_xt if grad_xt is not None else grad_v
        if grad_xt is None:
            grad_xt = torch.zeros_like(like)
        if grad_v is None:
            grad_v = torch.zeros_like(like)
        dx, dnoise = _fm_noise_backward_op(grad_xt, grad_v, t, ctx.sigma_min)
        return dx.to(ctx.x_dtype), dnoise.to(ctx.noise_dtype), grad_t, None

    _fm_noise_op.register_autograd(_fm_noise_backward, setup_context=_fm_noise_setup)

    @triton_op("dito_fast_triton::fm_loss", mutates_args=())
    def _fm_loss_op(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = dense_like(pred, pred)
        target = dense_like(target, pred)
        B = pred.shape[0]
        N = pred.numel() // B if B else 0
        if N == 0:  # empty samples: mean of nothing, as torch's mean gives
            return torch.full((B,), float("nan"), dtype=torch.float32, device=pred.device)
        chunks = triton.cdiv(N, _LOSS_BLOCK)
        part = torch.empty((B, chunks), dtype=torch.float32, device=pred.device)
        wrap_triton(_fm_loss_partial_kernel)[(chunks, B)](pred, target, part, N, chunks, BLOCK=_LOSS_BLOCK,
                                                           IDX64=needs_int64(pred))
        # a fixed-order sum of the partials keeps the loss deterministic
        return part.sum(dim=1) / N

    @triton_op("dito_fast_triton::fm_loss_backward", mutates_args=())
    def _fm_loss_backward_op(grad: torch.Tensor, pred: torch.Tensor,
                             target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = dense_like(pred, pred)
        target = dense_like(target, pred)
        grad = grad.to(torch.float32).contiguous()
        dpred = torch.empty_like(pred)
        dtarget = torch.empty_like(target)
        B = pred.shape[0]
        N = pred.numel() // B if B else 0
        if pred.numel() > 0:
            grid = (triton.cdiv(N, _BLOCK), B)
            wrap_triton(_fm_loss_bwd_kernel)[grid](pred, target, grad, dpred, dtarget, N, BLOCK=_BLOCK,
                                                   IDX64=needs_int64(pred))
        return dpred, dtarget

    def _fm_loss_setup(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target)

    def _fm_loss_backward(ctx, grad):
        pred, target = ctx.saved_tensors
        return _fm_loss_backward_op(grad, pred, target)

    _fm_loss_op.register_autograd(_fm_loss_backward, setup_context=_fm_loss_setup)


# --------------------------------------------------------------------------------------------
# public functions


def fm_noise(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 1e-5):
    """Noised sample and velocity target, differentiable w.r.t. ``x`` and ``noise``.

    x, noise: (B, ...) same shape and dtype (float32/float16/bfloat16); t: (B,) floating, in [0, 1].
    Returns (x_t, v), both shaped and typed like x (computed in float32).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    return _fm_noise_op(x, noise, t, float(sigma_min))


def fm_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, float32 accumulation. pred, target: (B, ...). Returns (B,) float32."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    return _fm_loss_op(pred, target)
