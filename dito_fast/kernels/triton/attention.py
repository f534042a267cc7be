"""Triton flash attention, forward and backward (non-causal, no dropout).

O = softmax(Q K^T / sqrt(D)) V for q, k, v of shape (B, heads, N, D), D in {16, 32, 64, 128}, any N.

Forward: one program per (query block, batch*head) streams over key/value blocks with the online
softmax (running max m and normaliser l, rescaling the accumulator), works in base 2 (exp2 with
log2(e) folded into the scale), and saves the row log-sum-exp (base 2, float32) for backward.
Backward recomputes P blockwise from the saved log-sum-exp:
    delta_i = sum_d dO_id O_id                      (_attn_bwd_preprocess_kernel)
    dS = P * (dP - delta), dP = dO V^T
    dV = P^T dO, dK = scale * dS^T Q               (_attn_bwd_dkdv_kernel: one program per key block)
    dQ = scale * dS K                              (_attn_bwd_dq_kernel: one program per query block)
No atomics: every gradient element is written by exactly one program (deterministic).
Matrix products use tl.dot with float32 accumulation; float32 inputs use IEEE products unless
torch.get_float32_matmul_precision() allows TF32.
Precision limit (as in flash-attention, which also keeps one float32 log-sum-exp per row): rows
whose logits reach thousands in magnitude get gradients with ~1e-4 relative error (the rounding of
the stored log-sum-exp scales the recomputed P), where the forward stays exact to float32.
"""

import math

import torch

from . import HAS_TRITON, MAX_GRID_YZ, interpreting, needs_int64, next_power_of_2, tensor_reasons

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634


def unsupported_reasons(q, k, v, *args, **kwargs) -> list[str]:
    """Why :func:`attention` cannot run these inputs (empty list: it can)."""
    reasons = tensor_reasons(q=q, k=k, v=v)
    if not HAS_TRITON or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return reasons
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        reasons.append(f"q, k, v must share the shape (B, heads, N, D); got "
                       f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        return reasons
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]} not in {HEAD_DIMS}")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreting():
        reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly (errors of 1e9 measured, Triton 3.7)")
    if q.shape[0] * q.shape[1] > MAX_GRID_YZ:
        reasons.append(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the grid limit {MAX_GRID_YZ}")
    if q.dtype == torch.float32 and q.shape[-1] == 128 and q.device.type == "cuda":
        have = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        if have < FP32_D128_SHARED_BYTES:
            reasons.append(f"float32 attention at head dim 128 needs {FP32_D128_SHARED_BYTES} bytes of shared memory "
                           f"per block, this GPU allows {have} (use float16/bfloat16)")
    return reasons


# Shared memory of the float32, head-dim-128 kernels at their 64 x 64 tiles (Triton 3.7; the
# backward's dq kernel with TF32 dots is the largest: 163,840 bytes compiled for sm_80/sm_86,
# 196,608 for sm_90): more than GPUs with 99 KiB per block (A10, L4, L40, consumer cards) allow;
# A100 (163 KiB) and H100/H200 (227 KiB) fit. The check uses the sm_80 figure.
FP32_D128_SHARED_BYTES = 163_840


def _blocks(N: int, D: int):
    """(BLOCK_M, BLOCK_N, num_warps): 64 x 64 tiles, less for short N (the backward's dk/dv kernel
    takes 32-row query blocks at D = 128)."""
    bm = max(16, min(64, next_power_of_2(N)))
    bn = max(16, min(64, next_power_of_2(N)))
    return bm, bn, 4 if D <= 64 else 8


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


if HAS_TRITON:

    @triton.jit
    def _row_indices(blk, BLOCK: tl.constexpr, BLOCK_LOOP: tl.constexpr, IDX64: tl.constexpr):
        """Rows of block ``blk`` and the offsets of one loop block, in int64 when IDX64 (row
        offsets rows * row_stride past 2^31)."""
        offs = tl.arange(0, BLOCK_LOOP)
        if IDX64:
            blk = blk.to(tl.int64)
            offs = offs.to(tl.int64)
        return blk * BLOCK + tl.arange(0, BLOCK), offs

    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                         H, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr,
                         IDX64: tl.constexpr):
        # grid: (cdiv(N, BLOCK_M), B * H)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_ptr += b * sqb + h * sqh
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        rows, offs_n = _row_indices(pid_m, BLOCK_M, BLOCK_N, IDX64)
        rmask = rows < N
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + rows[:, None] * sqn + offs_d[None, :], mask=rmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs_n
            cmask = cols < N
            k = tl.load(k_ptr + cols[:, None] * skn + offs_d[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid column
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + cols[:, None] * svn + offs_d[None, :], mask=cmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        o_ptr += b * sob + h * soh
        tl.store(o_ptr + rows[:, None] * son + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=rmask)

    @triton.jit
    def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, son, sdb, sdh, sdn, H, N,
                                    D: tl.constexpr, BLOCK_M: tl.constexpr, IDX64: tl.constexpr):
        # grid: (cdiv(N, BLOCK_M), B * H). delta = rowsum(dO * O) in float32
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows, _ = _row_indices(pid_m, BLOCK_M, 1, IDX64)
        rmask = rows < N
        offs_d = tl.arange(0, D)
        o = tl.load(o_ptr + b * sob + h * soh + rows[:, None] * son + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :],
                     mask=rmask[:, None], other=0.0).to(tl.float32)
        tl.store(delta_ptr + bh.to(tl.int64) * N + rows, tl.sum(o * do, axis=1), mask=rmask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                              H, N, qk_scale, sm_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              IDX64: tl.constexpr):
        # grid: (cdiv(N, BLOCK_N), B * H). One key/value block; loop over all query blocks.
        # dk/dv share the strides (sgb, sgh, sgn).
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_ptr += b * sqb + h * sqh
        do_ptr += b * sdb + h * sdh
        lse_ptr += bh.to(tl.int64) * N
        delta_ptr += bh.to(tl.int64) * N
        cols, offs_m = _row_indices(pid_n, BLOCK_N, BLOCK_M, IDX64)
        cmask = cols < N
        offs_d = tl.arange(0, D)
        k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=cmask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + offs_m
            rmask = rows < N
            q = tl.load(q_ptr + rows[:, None] * sqn + offs_d[None, :], mask=rmask[:, None], other=0.0)
            do = tl.load(do_ptr + rows[:, None] * sdn + offs_d[None, :], mask=rmask[:, None], other=0.0)
            lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 units
            p = tl.exp2(s - lse[:, None])
            p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dk = dk * sm_scale
        out = b * sgb + h * sgh + cols[:, None] * sgn + offs_d[None, :]
        tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=cmask[:, None])
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=cmask[:, None])

    @triton.jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                            H, N, qk_scale, sm_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            IDX64: tl.constexpr):
        # grid: (cdiv(N, BLOCK_M), B * H). One query block; loop over all key/value blocks.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        rows, offs_n = _row_indices(pid_m, BLOCK_M, BLOCK_N, IDX64)
        rmask = rows < N
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :],
                     mask=rmask[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs_n
            cmask = cols < N
            k = tl.load(k_ptr + cols[:, None] * skn + offs_d[None, :], mask=cmask[:, None], other=0.0)
            v = tl.load(v_ptr + cols[:, None] * svn + offs_d[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(cmask[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = dq * sm_scale
        tl.store(dq_ptr + b * sgb + h * sgh + rows[:, None] * sgn + offs_d[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=rmask[:, None])

    # ----------------------------------------------------------------------------------------
    # registered ops

    def _check_shapes(q, k, v):
        if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or q.shape[-1] not in HEAD_DIMS:
            raise ValueError(f"dito_fast_triton::attention needs q, k, v of one shape (B, heads, N, D) with D in "
                             f"{HEAD_DIMS}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")

    def _s3(t):  # (batch, head, row) strides; the last dim has unit stride
        return t.stride(0), t.stride(1), t.stride(2)

    @triton_op("dito_fast_triton::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_shapes(q, k, v)  # a shorter k or v would be read past its end
        q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
        B, H, N, D = q.shape
        o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        if o.numel() == 0:
            return o, lse
        bm, bn, warps = _blocks(N, D)
        qk_scale = _LOG2E / math.sqrt(D)
        grid = (triton.cdiv(N, bm), B * H)
        wrap_triton(_attn_fwd_kernel)[grid](q, k, v, o, lse, *_s3(q), *_s3(k), *_s3(v), *_s3(o), H, N, qk_scale,
                                             D=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=_dot_precision(q.dtype),
                                             IDX64=needs_int64(q, k, v, o, lead=2), num_warps=warps, num_stages=2)
        return o, lse

    @triton_op("dito_fast_triton::attention_backward", mutates_args=())
    def _attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, o = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _last_dim_unit(o)
        grad = _last_dim_unit(grad)
        B, H, N, D = q.shape
        dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, H, N, D), dtype=k.dtype, device=q.device)
        dv = torch.empty((B, H, N, D), dtype=v.dtype, device=q.device)
        if dq.numel() == 0:
            return dq, dk, dv
        delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        bm, bn, warps = _blocks(N, D)
        sm_scale = 1.0 / math.sqrt(D)
        qk_scale = sm_scale * _LOG2E
        prec = _dot_precision(q.dtype)
        idx64 = needs_int64(q, k, v, o, grad, dq, dk, dv, lead=2)
        wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(N, bm), B * H)](
            o, grad, delta, *_s3(o), *_s3(grad), H, N, D=D, BLOCK_M=bm, IDX64=idx64, num_warps=4)
        bm_kv = bm if D <= 64 else min(bm, 32)  # keeps the (BLOCK_N, D) accumulators in registers
        wrap_triton(_attn_bwd_dkdv_kernel)[(triton.cdiv(N, bn), B * H)](
            q, k, v, grad, lse, delta, dk, dv, *_s3(q), *_s3(k), *_s3(v), *_s3(grad), *_s3(dk), H, N,
            qk_scale, sm_scale, D=D, BLOCK_M=bm_kv, BLOCK_N=bn, DOT_PRECISION=prec, IDX64=idx64, num_warps=warps,
            num_stages=2)
        wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(N, bm), B * H)](
            q, k, v, grad, lse, delta, dq, *_s3(q), *_s3(k), *_s3(v), *_s3(grad), *_s3(dq), H, N,
            qk_scale, sm_scale, D=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=prec, IDX64=idx64, num_warps=warps,
            num_stages=2)
        return dq, dk, dv

    def _setup(ctx, inputs, output):
        q, k, v = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)

    def _backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        if grad_o is None:
            return None, None, None
        return _attention_backward_op(grad_o, q, k, v, o, lse)

    _attention_op.register_autograd(_backward, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, non-causal.

    q, k, v: (B, heads, N, D), one dtype (float32/float16/bfloat16), D in {16, 32, 64, 128}; any
    strides with a unit-stride last dim (others are copied). Returns a contiguous (B, heads, N, D)
    tensor of the input dtype. Differentiable in q, k and v.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    return _attention_op(q, k, v)[0]
