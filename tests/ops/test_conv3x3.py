"""conv3x3: the Winograd C++ backend against the float64 reference (F.conv2d), its transforms,
gradcheck, opcheck, torch.compile, layouts and errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from dito_fast.ops import Conv3x3, conv3x3, conv3x3_ref
from dito_fast.ops.conv3x3 import MIN_TILE4_TILES, winograd_filter, winograd_tile

from backend_cases import CPP_REASON, assert_close_to_ref

needs_cpp = pytest.mark.skipif(bool(CPP_REASON), reason=CPP_REASON)
# (B, C_in, C_out, H, W): odd sizes (partial tiles on both edges), batch 1, 1x1 and 1xN images,
# channel counts that are not multiples of the vector width, a model-sized level.
SHAPES = [(3, 33, 40, 23, 19), (1, 32, 48, 8, 8), (2, 32, 35, 1, 1), (2, 40, 32, 1, 7), (2, 64, 64, 16, 16)]
TILES = ["2", "4"]  # DITO_FAST_WINOGRAD_TILE: F(2x2, 3x3) and F(4x4, 3x3)


def _grads(fn, x, w, b, seed=4):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    inputs = (x, w) if b is None else (x, w, b)
    return (y.detach(), *torch.autograd.grad(y, inputs, g))


def _inputs(shape, dtype, layout, bias=True):
    B, C, Co, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(Co, C, 3, 3, generator=g, dtype=torch.float64) / (3 * C**0.5)).to(dtype)
    b = torch.randn(Co, generator=g, dtype=torch.float64).to(dtype) if bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[:, :, :, ::2]
    elif layout == "channel_slice":  # channels contiguous, pixels C + 3 apart: read in place
        x = torch.cat([x, x[:, :3]], dim=1).contiguous(memory_format=torch.channels_last)[:, :C]
    return x, w, b


# DITO_FAST_WINOGRAD_BLOCK for float32 (float64 always takes the chunked path): the automatic
# choice (the fused path at these channel counts), the chunked path, and fused blocks of 5 tiles
# (a short last block in most shapes)
DTYPE_BLOCKS = [(torch.float32, "auto"), (torch.float32, "0"), (torch.float32, "5"), (torch.float64, "auto")]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,block", DTYPE_BLOCKS, ids=["fp32", "fp32-chunked", "fp32-blocks5", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "channel_slice"])
@pytest.mark.parametrize("tile", TILES)
def test_cpp_matches_reference(shape, dtype, block, layout, tile, monkeypatch):
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
    if block == "auto":
        monkeypatch.delenv("DITO_FAST_WINOGRAD_BLOCK", raising=False)
    else:
        monkeypatch.setenv("DITO_FAST_WINOGRAD_BLOCK", block)
    x, w, b = _inputs(shape, dtype, layout)
    ours = _grads(lambda *a: conv3x3(*a, backend="cpp"), x, w, b)
    ref64 = _grads(conv3x3_ref, x.double(), w.double(), b.double())
    same = _grads(conv3x3_ref, x, w, b)  # oneDNN's own error in this dtype
    for o, r, s, what in zip(ours, ref64, same, ("y", "grad x", "grad weight", "grad bias")):
        assert o.dtype == dtype, what
        assert_close_to_ref(o, r, dtype, s, what)
    fmt = torch.channels_last if layout in ("channels_last", "channel_slice") else torch.contiguous_format
    assert ours[0].is_contiguous(memory_format=fmt), "the output keeps x's layout"


@needs_cpp
@pytest.mark.parametrize("tile", TILES)
def test_cpp_gradient_from_a_channel_slice(tile, monkeypatch):
    """The upstream gradient of a convolution whose output torch.cat joined with another tensor
    is a channel slice of a channels_last tensor: the input and filter gradients read it in place
    and match the reference's."""
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
    x, w, b = _inputs((2, 40, 36, 11, 13), torch.float64, "channels_last")
    other = torch.randn(2, 5, 11, 13, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grads, ops_run = [], set()
    for fn in (lambda *a: conv3x3(*a, backend="cpp"), conv3x3_ref):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        joined = torch.cat([fn(xi, wi, bi), other], dim=1)
        g = torch.randn(joined.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g = g.contiguous(memory_format=torch.channels_last)
        with torch.profiler.profile(record_shapes=True) as prof:
            grads.append(torch.autograd.grad(joined, (xi, wi, bi), g))
        # (name, first input's shape): the slice is (2, 36, 11, 13)
        ops_run = ops_run or {(e.name, tuple(e.input_shapes[0]) if e.input_shapes else ()) for e in prof.events()}
    # the cpp backward reads the slice in place and sums the bias gradient in its own pass
    assert "dito_fast::winograd_conv3x3_weight_grad" in {name for name, _ in ops_run}
    copies = {(name, shape) for name, shape in ops_run if name in ("aten::copy_", "aten::clone", "aten::sum")}
    assert not {c for c in copies if c[1] == (2, 36, 11, 13)}, copies
    for o, r, what in zip(*grads, ("grad x", "grad weight", "grad bias")):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9, msg=what)
    assert grads[0][0].is_contiguous(memory_format=torch.channels_last)


@needs_cpp
def test_without_bias_and_in_a_module():
    x, w, _ = _inputs((2, 32, 32, 9, 10), torch.float64, "contiguous", bias=False)
    torch.testing.assert_close(conv3x3(x, w, None, backend="cpp"), F.conv2d(x, w, None, padding=1))
    conv = Conv3x3(32, 48).double()
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.weight.shape == (48, 32, 3, 3)
    # a channels_last module (its weights channels_last too): same values, forward and gradients
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    got = _grads(lambda a, c, d: conv3x3(a, c, d, backend="cpp"), x, conv.weight, conv.bias)
    ref = _grads(conv3x3_ref, x, conv.weight.contiguous(), conv.bias)
    for o, r in zip(got, ref):
        torch.testing.assert_close(o, r)


G2 = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
G4 = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
      [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("co,ci", [(5, 3), (6, 37)])  # C_in under one vector; full vectors and a remainder
@pytest.mark.parametrize("tile,G", [(2, G2), (4, G4)], ids=["tile2", "tile4"])
def test_filter_transform(tile, G, co, ci, dtype):
    """winograd_filter (the C++ kernel for contiguous CPU weights, the Kronecker product for other
    layouts) against U = G g G^T in float64, and its backward against the adjoint G^T dU G."""
    g = torch.Generator().manual_seed(1)
    w64 = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
    w = w64.to(dtype)
    u = winograd_filter(w, tile)
    N = tile + 2
    assert u.shape == (N * N, co, ci) and u.dtype == dtype and u.is_contiguous()
    G = torch.tensor(G, dtype=torch.float64)
    torch.testing.assert_close(u.double(), torch.einsum("ia,ocab,jb->ijoc", G, w64, G).reshape(N * N, co, ci),
                               rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    # channels_last and other strided weights give the same transform, as does the forward GEMMs'
    # layout (C_out fastest; the C++ transform writes it, other routes give the default layout)
    for other in (w.contiguous(memory_format=torch.channels_last), w.transpose(0, 1).contiguous().transpose(0, 1)):
        torch.testing.assert_close(winograd_filter(other, tile), u)
        torch.testing.assert_close(winograd_filter(other, tile, out_channels_last=True), u)
    u_cl = winograd_filter(w, tile, out_channels_last=True)
    torch.testing.assert_close(u_cl, u, rtol=0, atol=0)
    if not CPP_REASON:
        assert u_cl.transpose(1, 2).is_contiguous()
    # its backward is the adjoint transform, for either layout, with the weight's layout
    du64 = torch.randn(u.shape, generator=g, dtype=torch.float64)
    expected = torch.einsum("ia,ijoc,jb->ocab", G, du64.reshape(N, N, co, ci), G)
    layouts = ((torch.contiguous_format, False), (torch.contiguous_format, True), (torch.channels_last, False))
    for fmt, out_cl in layouts:
        wg = w.clone(memory_format=fmt).requires_grad_()
        winograd_filter(wg, tile, out_channels_last=out_cl).backward(du64.to(dtype))
        torch.testing.assert_close(wg.grad.double(), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-13)
        assert wg.grad.is_contiguous(memory_format=fmt) and wg.grad.dtype == dtype
    if dtype == torch.float32 or ci > 3:  # (gradgradcheck of the wider filters: seconds)
        return
    for out_cl in (False, True):
        assert torch.autograd.gradcheck(lambda a: winograd_filter(a, tile, out_cl), (w.clone().requires_grad_(),))
        # a linear map differentiable any number of times, whichever route computes it
        assert torch.autograd.gradgradcheck(lambda a: winograd_filter(a, tile, out_cl).square(),
                                            (w.clone().requires_grad_(),))
    # and under torch.func: vmap over filter banks, forward-mode AD (a linear map: its own JVP)
    ws = torch.stack([w, 2 * w + 1])
    torch.testing.assert_close(torch.vmap(lambda a: winograd_filter(a, tile))(ws)[1], winograd_filter(ws[1], tile))
    _, jvp = torch.func.jvp(lambda a: winograd_filter(a, tile), (w,), (du_w := w.flip(0),))
    torch.testing.assert_close(jvp, winograd_filter(du_w, tile))


@needs_cpp
@pytest.mark.parametrize("tile", [2, 4])
def test_transposed_is_the_input_gradient(tile):
    """transposed=True convolves with the flipped filter, channels swapped (the C++ transforms read
    and write the image rotated by 180 degrees); odd sizes leave partial tiles on both edges."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64)
    out = torch.ops.dito_fast.winograd_conv3x3(dy, winograd_filter(w, tile), None, True)
    torch.testing.assert_close(out, F.conv2d(dy, w.flip(2, 3).transpose(0, 1), padding=1))


def test_tile_choice(monkeypatch):
    monkeypatch.delenv("DITO_FAST_WINOGRAD_TILE", raising=False)
    # auto: F(4x4) from MIN_TILE4_TILES 4x4 output tiles on (a 32x32 image has 64)
    assert MIN_TILE4_TILES == 64
    assert winograd_tile(torch.empty(1, 8, 32, 32)) == 4
    assert winograd_tile(torch.empty(1, 8, 29, 32)) == 4  # partial tiles count: 8 x 8
    assert winograd_tile(torch.empty(1, 8, 28, 32)) == 2  # 7 x 8 = 56
    assert winograd_tile(torch.empty(8, 8, 8, 8)) == 2  # 8 x 2 x 2 = 32
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", "4")
    assert winograd_tile(torch.empty(1, 8, 4, 4)) == 4
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", "2")
    assert winograd_tile(torch.empty(8, 8, 64, 64)) == 2
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", "6")
    with pytest.raises(ValueError, match="DITO_FAST_WINOGRAD_TILE must be auto, 2 or 4, got '6'"):
        winograd_tile(torch.empty(1, 8, 4, 4))


@needs_cpp
@pytest.mark.parametrize("tile", [2, 4])
def test_gradcheck_opcheck_compile(tile, monkeypatch):
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", str(tile))
    torch.manual_seed(tile)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: conv3x3(*a, backend="cpp"), (x, w, b))
    xf, wf = torch.randn(2, 8, 5, 6), torch.randn(6, 8, 3, 3)
    u = winograd_filter(wf, tile).requires_grad_()
    torch.library.opcheck(torch.ops.dito_fast.winograd_conv3x3, (xf.requires_grad_(), u, torch.randn(6), False))
    torch.library.opcheck(torch.ops.dito_fast.winograd_conv3x3, (torch.randn(2, 6, 5, 6), u.detach(), None, True))
    for bias in (True, False):
        torch.library.opcheck(torch.ops.dito_fast.winograd_conv3x3_weight_grad,
                              (xf.detach(), torch.randn(2, 6, 5, 6), tile, bias))
    for out_cl in (False, True):
        torch.library.opcheck(torch.ops.dito_fast.winograd_filter, (wf, tile, out_cl))
    torch.library.opcheck(torch.ops.dito_fast.winograd_filter_adjoint, (torch.randn((tile + 2) ** 2, 6, 8),))
    torch._dynamo.reset()
    f = lambda a, c: conv3x3(a, c, None, backend="cpp").square().sum()  # noqa: E731
    a1, c1 = xf.detach().clone().requires_grad_(), wf.clone().requires_grad_()
    a2, c2 = xf.detach().clone().requires_grad_(), wf.clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(a1, c1)
    out_e = f(a2, c2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    # float32 rounding apart: the compiled graph keeps the forward's filter (C_out fastest), whose
    # input-gradient GEMMs take another BLAS route than the eager backward's re-transformed one.
    # Each gradient value sums 54-60 products, so the two routes may differ by a few 1e-6 of the
    # largest (1e-6 failed in one of two runs of the -O1 sanitizer build, scripts/sanitize_check.sh,
    # on unseeded inputs: 2e-6 of the largest at a cancelling value)
    for got, want in ((a1.grad, a2.grad), (c1.grad, c2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_cpp
@pytest.mark.parametrize("tile", TILES)
def test_non_finite_values_propagate(tile, monkeypatch):
    """Every output the direct convolution makes non-finite is non-finite (an inf can come out as
    NaN: the transforms subtract it from itself). F(2x2) makes exactly those outputs non-finite;
    F(4x4)'s transforms mix a tile's rows and columns, so a NaN or inf can spread over the whole 4x4
    output tiles its 3x3 neighbourhood touches (never beyond them)."""
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
    x, w, b = _inputs((1, 32, 32, 10, 9), torch.float32, "contiguous")
    x[0, 3, 5, 2] = float("nan")
    x[0, 7, 0, 8] = float("inf")
    bad = ~conv3x3(x, w, b, backend="cpp").isfinite()
    ref = ~F.conv2d(x, w, b, padding=1).isfinite()
    assert ref.any()
    if tile == "2":
        assert torch.equal(bad, ref)
    else:
        assert not (ref & ~bad).any()
        hit = F.max_pool2d(ref.any(1, keepdim=True).float(), 4, ceil_mode=True)  # 4x4 tiles touched
        tiles = hit.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :10, :9].bool()
        assert not (bad & ~tiles).any()


@needs_cpp
def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
    # few channels: the direct convolution (bitwise F.conv2d); enough channels: Winograd (not bitwise)
    x, w, b = _inputs((2, 8, 8, 12, 12), torch.float32, "contiguous")
    assert torch.equal(conv3x3(x, w, b), F.conv2d(x, w, b, padding=1))
    x, w, b = _inputs((2, 64, 64, 12, 12), torch.float32, "contiguous")
    y = conv3x3(x, w, b)
    assert torch.equal(y, conv3x3(x, w, b, backend="cpp")) and not torch.equal(y, F.conv2d(x, w, b, padding=1))
    monkeypatch.setenv("DITO_FAST_BACKEND", "conv3x3=ref")
    assert torch.equal(conv3x3(x, w, b), F.conv2d(x, w, b, padding=1))


@needs_cpp
def test_cpp_declines_what_it_cannot_run():
    x, w, b = _inputs((1, 32, 32, 4, 4), torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        conv3x3(x.half(), w.half(), b.half(), backend="cpp")
    with pytest.raises(RuntimeError, match="autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv3x3(x, w, b, backend="cpp")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the automatic choice follows autocast's policy
        assert conv3x3(x, w, b).dtype == torch.bfloat16


def test_errors_name_the_problem():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, 4, 3, 3\), got \(6, 4, 5, 5\)"):
        conv3x3(x, torch.randn(6, 4, 5, 5))
    with pytest.raises(ValueError, match=r"weight must be \(C_out, 4, 3, 3\), got \(6, 3, 3, 3\)"):
        conv3x3(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        conv3x3(x, torch.randn(6, 4, 3, 3), torch.randn(5))
    with pytest.raises(TypeError, match="bias must be a tensor or None, got float"):
        conv3x3(x, torch.randn(6, 4, 3, 3), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        conv3x3(torch.randn(0, 4, 5, 5), torch.randn(6, 4, 3, 3))
    for backend in (None, "ref") + (("cpp",) if not CPP_REASON else ()):  # cpp had returned (2, 0, 5, 5)
        with pytest.raises(ValueError, match=r"weight has no output channels \(shape \(0, 40, 3, 3\)\)"):
            conv3x3(torch.randn(2, 40, 5, 5), torch.randn(0, 40, 3, 3), backend=backend)
    with pytest.raises(TypeError, match="bias is torch.float64 but weight is torch.float32"):
        conv3x3(x, torch.randn(6, 4, 3, 3), torch.randn(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.int64"):
        conv3x3(torch.ones(1, 4, 5, 5, dtype=torch.long), torch.randn(6, 4, 3, 3))
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16, got torch.float8_e4m3fn"):
        conv3x3(x, torch.randn(6, 4, 3, 3).to(torch.float8_e4m3fn))
    for c in (4, 32):  # the reference route (few channels) had failed inside F.conv2d, naming neither
        with pytest.raises(TypeError, match="conv3x3: x is torch.float32 but weight is torch.float64"):
            conv3x3(torch.randn(1, c, 5, 5), torch.randn(6, c, 3, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        conv3x3(x.bfloat16(), torch.randn(6, 4, 3, 3))
    if not CPP_REASON:
        for bad in ("many", "-1", "5000"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DITO_FAST_WINOGRAD_BLOCK", bad)
                with pytest.raises(RuntimeError, match=f"DITO_FAST_WINOGRAD_BLOCK must be a number of tiles from 0 "
                                                       f"\\(the chunked path\\) to 4096, got '{bad}'"):
                    conv3x3(torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3), backend="cpp")
        for tile_k in (16, 36):  # no output channels: an empty output, by either path
            for block in ("0", "5"):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("DITO_FAST_WINOGRAD_BLOCK", block)
                    empty = torch.ops.dito_fast.winograd_conv3x3(x, torch.empty(tile_k, 0, 4), None, False)
                    assert empty.shape == (x.shape[0], 0, *x.shape[2:])
        with pytest.raises(RuntimeError, match=r"u must be the transformed filter \(16 or 36, C_out, 4\)"):
            torch.ops.dito_fast.winograd_conv3x3(x, torch.randn(9, 6, 4), None, False)
        with pytest.raises(RuntimeError, match="tile must be 2 or 4, got 3"):
            torch.ops.dito_fast.winograd_conv3x3_weight_grad(x, x, 3, True)
        with pytest.raises(RuntimeError,
                           match=r"winograd_filter: weight must be \(C_out, C_in, 3, 3\), got shape \[6, 4, 5, 5\]"):
            torch.ops.dito_fast.winograd_filter(torch.randn(6, 4, 5, 5), 2, False)
        with pytest.raises(RuntimeError, match="winograd_filter: tile must be 2 or 4, got 3"):
            torch.ops.dito_fast.winograd_filter(torch.randn(6, 4, 3, 3), 3, False)
        with pytest.raises(RuntimeError, match=r"grad_u must be \(16 or 36, C_out, C_in\), got shape \[9, 6, 4\]"):
            torch.ops.dito_fast.winograd_filter_adjoint(torch.randn(9, 6, 4))


@needs_cpp
def test_inference_filter_cache_follows_weight_updates():
    conv = Conv3x3(32, 32)
    x = torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        y0 = conv(x)
        torch.testing.assert_close(y0, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
        assert torch.equal(conv(x), y0)  # cached filter, same result
    with torch.no_grad():
        conv.weight.mul_(-2)  # an in-place update (as an optimizer step) invalidates the cache
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    conv.load_state_dict({"weight": torch.randn(32, 32, 3, 3) * 0.1, "bias": torch.zeros(32)})
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    # training after inference: no cache; gradients flow to the weight
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # a fused optimizer step does not move the weight's version counter: the step hook drops the entry
    version = conv.weight._version
    torch.optim.AdamW(conv.parameters(), lr=0.5, fused=True).step()
    assert conv.weight._version == version  # why the version alone cannot tell
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)


@needs_cpp
def test_training_where_saved_tensor_hooks_are_disabled():
    # the training path installs saved-tensor hooks (the weight saved instead of its transformed
    # filter): where hooks are disabled it keeps the filter instead of raising the disabler's message
    conv = Conv3x3(32, 32)
    x = torch.randn(1, 32, 6, 6, requires_grad=True)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        y = conv(x)
    y.sum().backward()
    ref = F.conv2d(x.detach().requires_grad_(), conv.weight.detach().requires_grad_(), conv.bias.detach(), padding=1)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert x.grad is not None and conv.weight.grad is not None


@needs_cpp
def test_inference_filter_cache_lets_swap_tensors_replace_the_weight():
    # keyed by the weight's storage: a weak reference to the weight itself would make
    # torch.utils.swap_tensors (model.to/double/load_state_dict under
    # set_swap_module_params_on_conversion) refuse it
    conv = Conv3x3(32, 32)
    x = torch.randn(1, 32, 6, 6)
    with torch.inference_mode():
        conv(x)
    new = torch.nn.Parameter(torch.randn(32, 32, 3, 3) * 0.1)
    torch.utils.swap_tensors(conv.weight, new)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    # two weights viewing one storage keep an entry each
    flat = torch.randn(2 * 32 * 32 * 9) * 0.1
    w0, w1 = flat[:32 * 32 * 9].view(32, 32, 3, 3), flat[32 * 32 * 9:].view(32, 32, 3, 3)
    with torch.inference_mode():
        for w in (w0, w1, w0):
            torch.testing.assert_close(conv3x3(x, w), F.conv2d(x, w, padding=1), atol=1e-4, rtol=1e-4)


@needs_cpp
def test_inference_filter_cache_is_per_tile(monkeypatch):
    conv = Conv3x3(32, 32)
    x = torch.randn(2, 32, 6, 6)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    for tile in ("4", "2", "4"):
        monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
        with torch.inference_mode():
            torch.testing.assert_close(conv(x), ref, atol=1e-4, rtol=1e-4)
    from dito_fast.ops.conv3x3 import _FILTER_CACHE

    (cached,) = (entry[1] for entry in _FILTER_CACHE[conv.weight.untyped_storage()].values())
    assert {t: u.shape[0] for t, u in cached.items()} == {2: 16, 4: 36}  # both kept, each transformed once
    monkeypatch.setenv("DITO_FAST_WINOGRAD_CACHE", "0")  # no cache: same results, nothing kept
    fresh = Conv3x3(32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), F.conv2d(x, fresh.weight, fresh.bias, padding=1), atol=1e-4, rtol=1e-4)
    assert fresh.weight.untyped_storage() not in _FILTER_CACHE


@needs_cpp
def test_inference_filter_cache_is_not_saved_with_the_module(tmp_path):
    """torch.save(module) after inference writes the weights only, not the transformed filters
    (4x the weights for F(4x4)); the cache entry goes with its weight."""
    import gc

    from dito_fast.ops.conv3x3 import _FILTER_CACHE

    conv = Conv3x3(64, 64)
    torch.save(conv, tmp_path / "before.pt")
    with torch.inference_mode():
        conv(torch.randn(1, 64, 16, 16))
    assert conv.weight.untyped_storage() in _FILTER_CACHE
    torch.save(conv, tmp_path / "after.pt")
    # the same up to the archive's name (the filters would add 4x the weights' 147 KiB)
    assert abs((tmp_path / "after.pt").stat().st_size - (tmp_path / "before.pt").stat().st_size) < 1024
    n = len(_FILTER_CACHE)
    del conv
    gc.collect()
    assert len(_FILTER_CACHE) == n - 1


@needs_cpp
def test_backend_variable_naming_another_op_backend_keeps_the_small_channel_rule(monkeypatch):
    """DITO_FAST_BACKEND=triton (a backend conv3x3 lacks) leaves conv3x3 to its own choice: few
    channels still go to F.conv2d, and the activation format follows that choice."""
    from dito_fast.ops import conv_activation_format

    x, w = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(4, 4, 3, 3)
    expected = conv3x3(x, w).grad_fn.name()
    big = torch.randn(1, 32, 6, 6)
    fmt = conv_activation_format(big)
    monkeypatch.setenv("DITO_FAST_BACKEND", "triton")
    assert conv3x3(x, w).grad_fn.name() == expected == "ConvolutionBackward0"
    assert conv_activation_format(big) == fmt == torch.channels_last


@needs_cpp
def test_inference_first_then_gradients():
    """Filters first transformed under inference_mode must not leak inference tensors into later
    autograd graphs: a frozen model's input gradient, and a fresh float32 weight's gradient."""
    conv = Conv3x3(32, 32).requires_grad_(False)
    x = torch.randn(1, 32, 5, 5)
    with torch.inference_mode():
        conv(x)
    xg = x.clone().requires_grad_()
    conv(xg).square().sum().backward()  # frozen weights, gradient for the input (e.g. latent optimisation)
    ref = x.clone().requires_grad_()
    F.conv2d(ref, conv.weight, conv.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad, atol=1e-4, rtol=1e-4)
    importlib.import_module("dito_fast.ops.conv3x3")._kron_cache.clear()
    with torch.inference_mode():
        Conv3x3(32, 32)(x)  # the shared transform matrix is first created in inference mode
    w = torch.randn(32, 32, 3, 3, requires_grad=True)
    conv3x3(x, w, None, backend="cpp").sum().backward()
    assert w.grad is not None


_AVX2_ONEDNN_SCRIPT = """
import os, torch, torch.nn.functional as F
from dito_fast.ops import conv3x3
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 64, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
w = torch.randn(64, 64, 3, 3, generator=g) / 24
for block in ("0", "23"):  # the chunked path (oneDNN matmul or MKL) and the fused one (brgemm)
    os.environ["DITO_FAST_WINOGRAD_BLOCK"] = block
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = conv3x3(xg, wg, None, backend="cpp")
    y.square().sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, padding=1)
    y64.square().sum().backward()
    for got, want in ((y, y64), (xg.grad, x64.grad), (wg.grad, w64.grad)):
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-4, (block, err)
print("ok")
"""


@needs_cpp
def test_float32_where_onednn_matmul_refuses_it():
    """On x86 CPUs without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT torch's oneDNN matmul raises
    for float32: the chunked path then takes MKL's GEMMs (decided once per process), the fused
    path's brgemm its own fallback. ONEDNN_MAX_CPU_ISA=AVX2 makes this CPU such a one for oneDNN."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    done = subprocess.run([sys.executable, "-c", _AVX2_ONEDNN_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", TILES)
def test_several_chunks(dtype, tile, monkeypatch):
    """Enough tiles for several GEMM chunks: the chunked forward, input and filter gradients agree
    with one-pass references."""
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
    # float32: chunks of at most 256 2x2 or 113 4x4 tiles here, evened out: 3 x 19 x 15 = 855 2x2
    # tiles in 4 chunks (214, 214, 214, 213); 3 x 10 x 8 = 240 4x4 tiles in 3 chunks of 80
    # (float64 halves the caps: 7 chunks of up to 123, 4 chunks of 60)
    x, w, b = _inputs((3, 256, 256, 37, 29), dtype, "channels_last")
    ours = _grads(lambda *a: conv3x3(*a, backend="cpp"), x, w, b)
    ref64 = _grads(conv3x3_ref, x.double(), w.double(), b.double())
    same = _grads(conv3x3_ref, x, w, b)
    for o, r, s, what in zip(ours, ref64, same, ("y", "grad x", "grad weight", "grad bias")):
        assert_close_to_ref(o, r, dtype, s, what)


@needs_cpp
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight_grad", "frozen_weight"])
def test_training_keeps_the_weight_not_the_transformed_filter(tile, weight_grad, monkeypatch):
    # Between forward and backward autograd holds the weight, not its transformed filter (1.8x or
    # 4x larger), and the backward transforms it again: the filter the forward made is freed, and
    # the gradients still match the reference.
    import gc
    import weakref
    monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
    module = importlib.import_module("dito_fast.ops.conv3x3")
    made = []

    def recording_filter(weight, t, out_channels_last=False):
        u = winograd_filter(weight, t, out_channels_last)
        made.append((weakref.ref(u), out_channels_last))
        return u
    monkeypatch.setattr(module, "winograd_filter", recording_filter)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 12, 10, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 32, 3, 3, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    y = conv3x3(x, w, None, backend="cpp")
    gc.collect()
    assert len(made) == 1 and made[0][0]() is None
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    # transformed again for the input gradient, in that GEMM's layout (the forward's: C_out fastest)
    assert [layout for _, layout in made] == [True, False]
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(weight_grad)
    F.conv2d(x2, w2, padding=1).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    if weight_grad:
        torch.testing.assert_close(w.grad, w2.grad)


@needs_cpp
@pytest.mark.parametrize("changed", ["weight", "input"])
def test_tensor_changed_between_forward_and_backward_raises(changed):
    # Tensors saved under hooks escape autograd's own in-place check; the hooks check them.
    x0 = torch.randn(2, 32, 8, 8, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, requires_grad=True)
    x = x0 * 1.0  # a non-leaf, so it may be changed in place
    y = conv3x3(x, w, None, backend="cpp")
    with torch.no_grad():
        (w if changed == "weight" else x).add_(1.0)
    with pytest.raises(RuntimeError, match=f"{changed} was modified in place"):
        y.sum().backward()


@needs_cpp
def test_outer_saved_tensor_hooks_keep_their_say():
    # Under activation checkpointing (its own saved-tensor hooks) conv3x3 leaves the saving to
    # them: the innermost hooks are the only ones that act. Gradients match the reference.
    from torch.utils.checkpoint import checkpoint
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 32, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out = checkpoint(lambda a, b: conv3x3(a, b, None, backend="cpp").square().sum(), x, w, use_reentrant=False)
    out.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(x2, w2, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        conv3x3(x, w, None, backend="cpp").sum().backward()
    assert any(len(shape) == 3 for shape in packed)  # the outer hooks saw the transformed filter


@needs_cpp
def test_filter_cache_can_be_cleared_and_skips_shared_weights():
    """Writes the version counter does not see (through .data) leave the cached filter stale until
    clear_filter_cache; weights in shared memory (Hogwild) are never cached."""
    from dito_fast.ops import clear_filter_cache
    from dito_fast.ops.conv3x3 import _FILTER_CACHE

    conv = Conv3x3(32, 32)
    x = torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        conv(x)
    assert conv.weight.untyped_storage() in _FILTER_CACHE
    conv.weight.data.mul_(-1)  # not recorded by the version counter
    clear_filter_cache(conv)
    assert conv.weight.untyped_storage() not in _FILTER_CACHE
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    clear_filter_cache()
    assert len(_FILTER_CACHE) == 0
    conv.share_memory()
    with torch.inference_mode():
        conv(x)
    assert conv.weight.untyped_storage() not in _FILTER_CACHE


@needs_cpp
def test_weight_gradient_is_contiguous():
    """As F.conv2d's: functional training loops .view the gradients autograd.grad returns."""
    conv = Conv3x3(32, 40)
    (gw,) = torch.autograd.grad(conv(torch.randn(2, 32, 8, 8)).sum(), conv.weight)
    assert gw.is_contiguous() and gw.shape == conv.weight.shape
    gw.view(-1)


def test_module_with_changed_conv_attributes_follows_nn_conv2d():
    """Conv3x3 is an nn.Conv2d: tools that change stride, dilation or padding_mode afterwards get
    nn.Conv2d's result, not a silent stride-1 zero-padded convolution."""
    x = torch.randn(2, 32, 9, 9)
    for attr, value in [("stride", (2, 2)), ("dilation", (2, 2)), ("padding_mode", "reflect")]:
        conv = Conv3x3(32, 40)
        plain = torch.nn.Conv2d(32, 40, 3, padding=1)
        plain.load_state_dict(conv.state_dict())
        setattr(conv, attr, value)
        setattr(plain, attr, value)
        torch.testing.assert_close(conv(x), plain(x))


@needs_cpp
def test_weight_made_in_inference_mode_trains_the_input():
    """A weight created under inference_mode has no version counter: the cpp backend keeps the
    transformed filter for the backward instead of failing on the counter."""
    with torch.inference_mode():
        w = torch.randn(40, 32, 3, 3) * 0.1
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    conv3x3(x, w, backend="cpp").square().sum().backward()
    x2 = x.detach().requires_grad_()
    F.conv2d(x2, w.clone(), padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-3)


@needs_cpp
def test_flop_counter_counts_the_nominal_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    conv = Conv3x3(32, 40)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    nominal = 2 * 2 * 16 * 16 * 32 * 40 * 9
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.dito_fast.winograd_conv3x3] == 2 * nominal  # forward and input gradient
    assert counts[torch.ops.dito_fast.winograd_conv3x3_weight_grad] == nominal
