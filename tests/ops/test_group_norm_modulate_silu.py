"""group_norm_modulate_silu: every backend available here against the float64 reference
(outputs and gradients, dtypes, odd shapes, layouts), gradcheck, opcheck, torch.compile, errors."""

from __future__ import annotations


import pytest
import torch

from dito_fast.ops import group_norm_modulate_silu, group_norm_modulate_silu_ref

from backend_cases import CPP_REASON, assert_close_to_ref

needs_cpp = pytest.mark.skipif(bool(CPP_REASON), reason=CPP_REASON)

SHAPES = [  # (B, C, H, W, groups)
    (3, 36, 23, 19, 6),
    (1, 32, 8, 8, 8),      # batch 1
    (2, 37, 5, 7, 37),     # 37 channels, one per group
    (2, 37, 5, 7, 1),      # one group of 37
    (4, 64, 1, 1, 32),     # 1x1 spatial
]
PARAMS = ["none", "affine", "modulate", "all"]


def _inputs(B, C, H, W, params, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(B, C, H, W) * 1.7 + 0.6
    w = r(C) * 0.5 + 1 if params in ("affine", "all") else None
    b = r(C) * 0.3 if params in ("affine", "all") else None
    s = r(B, C) * 0.4 if params in ("modulate", "all") else None
    sh = r(B, C) * 0.4 if params in ("modulate", "all") else None
    conv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [conv(t) for t in (x, w, b, s, sh)]


def _run(fn, x, groups, params, silu, grad_seed=1, **kw):
    """Output and gradients of every differentiable input under a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in [x, *params]]
    y = fn(leaves[0], groups, *leaves[1:], eps=1e-5, silu=silu, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(y.dtype)
    y.backward(gy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_matches_reference(shape, params, dtype):
    B, C, H, W, G = shape
    x, *p = _inputs(B, C, H, W, params, dtype)
    silu = params != "affine"  # also covers the plain GroupNorm path
    y, grads = _run(group_norm_modulate_silu, x, G, p, silu, backend="cpp")
    y64, grads64 = _run(group_norm_modulate_silu_ref, x.double(), G, [t.double() if t is not None else None for t in p], silu)
    yt, grads_t = _run(group_norm_modulate_silu_ref, x, G, p, silu, upcast=False)  # torch in the same dtype
    assert y.dtype == dtype
    assert_close_to_ref(y, y64, dtype, yt, "y")
    for name, gk, g64, gt in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64, grads_t):
        assert (gk is None) == (g64 is None), name
        if gk is not None:
            assert gk.dtype == dtype
            assert_close_to_ref(gk, g64, dtype, gt, f"grad {name}")


@needs_cpp
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "expanded_params"])
def test_cpp_layouts(layout):
    x, *p = _inputs(3, 24, 9, 11, "all", torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]  # strided view
        assert not x.is_contiguous()
    else:
        p[2] = p[2][:1].expand(3, 24)  # stride-0 scale
    y, grads = _run(group_norm_modulate_silu, x, 6, p, True, backend="cpp")
    y64, grads64 = _run(group_norm_modulate_silu_ref, x.double(), 6, [t.double() for t in p], True)
    assert_close_to_ref(y, y64, torch.float32)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(memory_format=torch.channels_last)
    for gk, g64 in zip(grads, grads64):
        assert_close_to_ref(gk, g64, torch.float32)


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 72, 16, 16, 8), (4, 72, 16, 16, 8), (2, 64, 96, 96, 16), (1, 220, 24, 24, 10),
                                   (2, 220, 12, 12, 10)],
                         ids=["rows_split_batch1", "task_per_sample", "rows_split_large_sample", "rows_split_wide",
                              "task_per_sample_wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cpp_task_layouts_two_threads(shape, dtype, layout):
    # The channels_last forward runs each sample of at most 1 MiB as one task when there are at
    # least as many samples as threads, and otherwise splits the rows over tasks (two passes);
    # 72 channels cover the 64-channel register blocks and a tail (the ids name these layouts); 220
    # channels the forward's block of 8 vectors, one of 4, a whole vector and a partial one with
    # AVX-512's 16 lanes, and blocks of 4 vectors, whole ones and a partial one with 8 lanes (AVX2,
    # default); one such sample of 576 rows splits into 7 chunks of 74 rows and one of 58.
    # NCHW runs a task per (sample, group), here split over both threads.
    B, C, H, W, G = shape
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, *p = _inputs(B, C, H, W, "all", dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y, grads = _run(group_norm_modulate_silu, x, G, p, True, backend="cpp")
    finally:
        torch.set_num_threads(previous)
    y64, grads64 = _run(group_norm_modulate_silu_ref, x.double(), G, [t.double() for t in p], True)
    yt, grads_t = _run(group_norm_modulate_silu_ref, x, G, p, True, upcast=False)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert_close_to_ref(y, y64, dtype, yt, "y")
    for name, gk, g64, gt in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64, grads_t):
        assert_close_to_ref(gk, g64, dtype, gt, f"grad {name}")


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_cpp_gradcheck(channels_last, silu):
    x, *p = _inputs(2, 6, 3, 5, "all", torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, *p)]
    fn = lambda x_, w, b, s, sh: group_norm_modulate_silu(x_, 3, w, b, s, sh, silu=silu, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@needs_cpp
def test_cpp_large_offset_stats():
    # |mean| >> std: the shifted sums must not cancel (a naive E[x^2]-E[x]^2 in fp32 fails this).
    x = torch.randn(2, 8, 64, 64, generator=torch.Generator().manual_seed(3)) * 1e-2 + 300.0
    y = group_norm_modulate_silu(x, 4, silu=False, backend="cpp")
    y64 = group_norm_modulate_silu_ref(x.double(), 4, silu=False)
    assert (y.double() - y64).abs().max().item() < 5e-2  # fp32 input quantisation at 300 is ~3e-5 / 1e-2 std


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["offset", "constant", "mixed"])
def test_cpp_groups_far_from_zero(case, channels_last):
    """Groups with |mean| >> std (x = 300 + 0.01 n) or none at all (a constant group: rstd =
    1/sqrt(eps)), with every parameter and SiLU, forward and backward, under the tolerance rule
    against PyTorch's own float32: folding x alpha + beta around zero had made two terms of size
    |mean| rstd cancel (up to 3x PyTorch's error, 8 of 80 seeded checks failing). "mixed": one
    such group in a sample of ordinary ones (the channels_last kernels shift whole samples)."""
    B, C, H, W, G = 2, 8, 6, 5, 4
    for seed in range(6):
        x, *p = _inputs(B, C, H, W, "all", torch.float64, seed=seed)
        noise = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        far = {"offset": 300 + 0.01 * noise, "constant": torch.full_like(x, -40.0), "mixed": x}[case]
        if case == "mixed":
            far[:, :2] = 7.3  # group 0 constant, the others ordinary
        x = far.float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        p = [t.float() for t in p]
        y, grads = _run(group_norm_modulate_silu, x, G, p, True, grad_seed=seed, backend="cpp")
        y64, grads64 = _run(group_norm_modulate_silu_ref, x.double(), G, [t.double() for t in p], True, grad_seed=seed)
        yt, grads_t = _run(group_norm_modulate_silu_ref, x.contiguous(), G, p, True, grad_seed=seed, upcast=False)
        assert_close_to_ref(y, y64, torch.float32, yt, f"y (seed {seed})")
        for name, gk, g64, gt in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64, grads_t):
            assert_close_to_ref(gk, g64, torch.float32, gt, f"grad {name} (seed {seed})")


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cpp_silu_accuracy_wide_range(channels_last):
    # weight = bias = scale = 0 make the pre-activation exactly a = shift, so y = silu(shift) and,
    # for dy = 1, grad_shift = H W silu'(shift): the kernels' SiLU and SiLU' (their exp and
    # reciprocal) against float64 over [-100, 100], where the exp's 2^n scaling and its clamps act.
    # float32 rounding of the result alone is 6e-8; exp and reciprocal add a few ulp at most.
    a = torch.linspace(-100, 100, 4001, dtype=torch.float32)
    a = torch.cat([a, torch.tensor([-87.5, -20.3, -5.01, 0.0, 1e-30, 5.01, 87.5, 88.5, 1e3, 1e4, 1e5, 1e6])])
    x = torch.randn(2, a.numel(), 4, 4, generator=torch.Generator().manual_seed(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    zeros = torch.zeros(a.numel())
    shift = torch.stack([a, a.flip(0)]).requires_grad_()
    y = group_norm_modulate_silu(x, a.numel(), zeros, zeros, torch.zeros(2, a.numel()), shift, backend="cpp")
    y.backward(torch.ones_like(y))
    a64 = shift.detach().double()
    sig = torch.sigmoid(a64)
    want_y, want_g = a64 * sig, 16 * sig * (1 + a64 * (1 - sig))
    tiny = 1e-30  # below this the vector exp's clamp to [-87, 87] departs from exact (a < -87)
    # exp(-a) is computed as 2^t with t = -a log2 e rounded to float (csrc/include/dito_fast/math.h):
    # a relative error of up to |t| 2^-24 in exp(-a), which reaches sigmoid scaled by 1 - s. So
    # 1e-6 relative where |a| < ~10, and up to ~1e-5 near the clamp (a = -87: |silu(a)| ~ 1e-36).
    rel = 1e-6 + 1e-7 * a64.abs() * (1 - sig)
    for got in (y.double().amax((2, 3)), y.double().amin((2, 3))):
        assert ((got - want_y).abs() <= rel * want_y.abs() + tiny).all()
    # silu'(a) = s (1 + a (1 - s)) crosses zero near a = -1.28, so its error is bounded by its
    # terms' sizes, plus a s times two ulps of s (1 - s cancels for large a: s rounds near 1; at
    # a = 1e6 that is 6%, math.h silu_grad).
    terms = 16 * (sig + a64.abs() * sig * (1 - sig))
    bound = (rel + 1e-6) * terms + 16 * a64.abs() * sig * 2**-22 + tiny
    assert ((shift.grad.double() - want_g).abs() <= bound).all()


@needs_cpp
def test_opcheck():
    x, w, b, s, sh = _inputs(2, 8, 5, 3, "all", torch.float32)
    for args in [(x, 4, w, b, s, sh, 1e-5, True), (x, 2, None, None, s, None, 1e-5, False),
                 (x.to(memory_format=torch.channels_last), 4, w, b, None, sh, 1e-5, True)]:
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.dito_fast.group_norm_modulate_silu, args)
    y, mean, rstd = torch.ops.dito_fast.group_norm_modulate_silu(x, 4, w, b, s, sh, 1e-5, True)
    torch.library.opcheck(torch.ops.dito_fast.group_norm_modulate_silu_backward,
                          (torch.randn_like(y), x, mean, rstd, 4, w, b, s, sh, True))


@needs_cpp
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, s, sh = _inputs(2, 8, 6, 6, "all", torch.float32)

    def f(x_, s_):
        return group_norm_modulate_silu(x_, 4, w, b, s_, sh, backend="cpp").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ss = [s.clone().requires_grad_() for _ in range(2)]
    out_c, out_e = compiled(xs[0], ss[0]), f(xs[1], ss[1])
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ss[0].grad, ss[1].grad)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_cpp)])
def test_errors_before_any_kernel(backend):
    x = torch.randn(2, 6, 4, 4)
    call = lambda *a, **k: group_norm_modulate_silu(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="6 channels are not divisible by 4 groups"):
        call(x, 4)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 6\)"):
        call(x, 3, scale=torch.zeros(6))
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        call(x, 3, weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        call(x[0], 3)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.int64"):
        call(x.long(), 3)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.float8_e4m3fn"):
        call(x.to(torch.float8_e4m3fn), 3)
    with pytest.raises(ValueError, match="empty"):
        call(x[:0], 3)
    for groups in (True, 3.0, "3"):  # bool is an int to Python, but not a group count
        with pytest.raises(TypeError, match="num_groups must be an int"):
            call(x, groups)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_cpp), None])
def test_parameter_errors_alike_on_every_backend(backend):
    """The parameters' dtype and shape checks run in the C++ op for cpp (check.h) and in Python for
    the others: the same exception types and messages either way. A parameter on another device
    (meta here, which would reach the fake kernel) is caught in Python before any backend runs."""
    x = torch.randn(2, 6, 4, 4)
    call = lambda **k: group_norm_modulate_silu(x, 3, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"group_norm_modulate_silu: bias must have shape \(6,\), got \(2, 6\)$"):
        call(bias=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 6\), got \(6,\)$"):
        call(shift=torch.zeros(6))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        call(weight=torch.ones(6, device="meta"))
    with pytest.raises(TypeError, match="scale must be a floating tensor or None, got float"):
        call(scale=1.5)
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16, got torch.int64"):
        call(weight=torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps must be finite and >= 0, got nan"):
        call(eps=float("nan"))


@needs_cpp
def test_cpp_op_raises_python_errors():
    """Called through torch.ops, the C++ checks raise ValueError/TypeError with shapes printed as
    Python tuples, as the Python wrappers do."""
    op = torch.ops.dito_fast.group_norm_modulate_silu
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\), got \(5,\)$"):
        op(x, 3, torch.ones(5), None, None, None, 1e-5, True)
    with pytest.raises(TypeError, match="scale must be a floating tensor, got Long"):
        op(x, 3, None, None, torch.ones(2, 6, dtype=torch.int64), None, 1e-5, True)


@needs_cpp
def test_unsupported_dtype_reason():
    x = torch.randn(1, 4, 2, 2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.complex64"):
        group_norm_modulate_silu(x, 2, backend="cpp")
