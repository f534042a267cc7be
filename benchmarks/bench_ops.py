"""Fused ops against their eager reference and torch.compile of the reference (DESIGN.md §5).

Providers: ``ref`` (eager PyTorch, the specification), ``cpp`` (dito_fast._C), ``compile``
(torch.compile of the reference; skipped in --benchmark-disable smoke runs because compiling
takes minutes on CPU); in the interleaved rows of the fused ops also ``eager`` (the op as plain
PyTorch a user would write: the reference without its input checks, casts and workarounds). Modes: ``fwd`` (inference, no autograd) and ``full`` (forward + backward).
Shapes are the real ones: the UNet decoder's largest and smallest levels for dito-S at 64x64
(batch 8) and dito-B at 256x256 (batch 1), the latent for the encoder, the image for the
flow-matching step. The interleaved rows of ``group_norm_modulate_silu`` come in NCHW and in
channels_last (suffix " CL"), the layout the models run in on the CPU.

Each result's extra_info holds the bytes a single fused pass must move and the achieved GB/s;
``test_memory_bandwidth`` measures the machine's copy bandwidth once in the same run, and
``python benchmarks/report.py BENCH.json`` prints the ratios (cpp vs ref, cpp vs compile) and
bandwidth fractions as a table.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import interleaved_medians

from dito_fast.ops import (
    _cpp, _dispatch, conv3x3, conv3x3_ref, fm_loss, fm_loss_ref, fm_noise, fm_noise_ref, group_norm_modulate_silu,
    group_norm_modulate_silu_ref, latent_layernorm, latent_layernorm_ref,
)
from dito_fast.ops.conv3x3 import winograd_tile

PROVIDERS = ["ref", "cpp", "compile"]
MODES = ["fwd", "full"]

# (label, B, C, H, W, groups): decoder level 0 and level 3 of each preset.
GNMS_SHAPES = [
    ("S@64 L0", 8, 64, 64, 64, 32), ("S@64 L3", 8, 256, 8, 8, 32),
    ("B@256 L0", 1, 128, 256, 256, 32), ("B@256 L3", 1, 512, 32, 32, 32),
]
# (label, B, C_in, C_out, H, W): the decoder's 3x3 convolutions at level 0 and level 3.
CONV_SHAPES = [
    ("S@64 L0", 8, 64, 64, 64, 64), ("S@64 L3", 8, 256, 256, 8, 8),
    ("B@256 L0", 1, 128, 128, 256, 256), ("B@256 L3", 1, 512, 512, 32, 32),
]
LATENT_SHAPES = [("S@64 latent", 8, 4, 8, 8), ("B@256 latent", 1, 4, 32, 32)]
IMAGE_SHAPES = [("S@64 image", 8, 3, 64, 64), ("B@256 image", 1, 3, 256, 256)]


@torch.library.custom_op("dito_bench::decoder_standin", mutates_args=())
def decoder_standin(x_t: torch.Tensor) -> torch.Tensor:
    """A copy of x_t: stands in for the decoder between ``fm_noise`` and ``fm_loss`` in the
    flow-matching rows, whose prediction is ``pred + decoder_standin(x_t)`` (``pred`` the leaf the
    gradient is taken for). A custom op is opaque to torch.compile, as the UNet's convolutions are,
    so the compiled reference cannot fuse the noising into the loss across it (no real training
    step allows that); it can still fuse the velocity target into the loss. x_t needs no gradient
    (neither x nor the noise has one), so the stand-in has no backward: the gradient reaches
    ``pred`` through ATen's add, as it reaches a real decoder's output through C++ autograd nodes.
    (An earlier stand-in, ``pred + x_t`` inside the custom op with a pass-through backward in a
    Python autograd node, put ~80 us of Python per step into every provider on the AMD EPYC
    machine: more than the fused ops' own kernels, 58 us at dito-S's image.)"""
    return x_t.clone()


decoder_standin.register_fake(lambda x_t: torch.empty_like(x_t))


def _median(benchmark):
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def _provider_fn(provider, fused, ref, benchmark):
    if provider == "cpp":
        if not _cpp.AVAILABLE:
            pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
        return lambda *a, **k: fused(*a, backend="cpp", **k)
    if provider == "compile":
        if benchmark.disabled:
            pytest.skip("torch.compile provider is skipped in smoke runs (--benchmark-disable)")
        torch._dynamo.reset()
        return torch.compile(ref, fullgraph=True)
    return ref


def _run(benchmark, fn, inputs, grad_inputs, mode, bytes_fwd, bytes_full, label, rounds):
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def full():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs])

    call = fwd if mode == "fwd" else full
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=5, iterations=1)
    med = _median(benchmark)
    if med is None:
        return
    nbytes = bytes_fwd if mode == "fwd" else bytes_full
    benchmark.extra_info.update({"shape": label, "mode": mode, "ms": med * 1e3, "min_bytes": nbytes,
                                 "gb_per_s": nbytes / med / 1e9})


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", GNMS_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_group_norm_modulate_silu(benchmark, shape, mode, provider):
    label, B, C, H, W, G = shape
    g = torch.Generator().manual_seed(0)
    grad = mode == "full"
    x = torch.randn(B, C, H, W, generator=g).requires_grad_(grad)
    w, b = torch.randn(C, generator=g).requires_grad_(grad), torch.randn(C, generator=g).requires_grad_(grad)
    s, sh = torch.randn(B, C, generator=g).requires_grad_(grad), torch.randn(B, C, generator=g).requires_grad_(grad)
    fn = _provider_fn(provider, group_norm_modulate_silu, group_norm_modulate_silu_ref, benchmark)
    n = x.numel() * 4
    # Minimum traffic of one fused pass: fwd reads x, writes y; full adds reading x and dy, writing dx.
    _run(benchmark, lambda *a: fn(a[0], G, *a[1:]), (x, w, b, s, sh), (x, w, b, s, sh), mode,
         2 * n, 5 * n, label, rounds=15 if x.numel() > 1_000_000 else 30)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_latent_layernorm(benchmark, shape, mode, provider):
    label, B, C, H, W = shape
    z = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0)).requires_grad_(mode == "full")
    fn = _provider_fn(provider, latent_layernorm, latent_layernorm_ref, benchmark)
    n = z.numel() * 4
    _run(benchmark, fn, (z,), (z,), mode, 2 * n, 5 * n, label, rounds=50)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_fm_step(benchmark, shape, mode, provider):
    """The training step's flow-matching part: noising + velocity target, then the per-sample loss
    against a prediction (the decoder's output). The compile provider here compiles the two
    reference ops separately, the stand-in and its add staying eager (the interleaved rows compile
    the whole step, which lets Inductor fuse more: a stronger baseline)."""
    label, B, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x, e, pred = (torch.randn(B, C, H, W, generator=g) for _ in range(3))
    t = torch.rand(B, generator=g)
    pred.requires_grad_(mode == "full")
    noise_fn = _provider_fn(provider, fm_noise, fm_noise_ref, benchmark)
    loss_fn = _provider_fn(provider, fm_loss, fm_loss_ref, benchmark)

    def step(pred_):
        x_t, v = noise_fn(x, e, t)
        return loss_fn(pred_ + decoder_standin(x_t), v)

    # the least traffic of what is timed, in image tensors n: fm_noise reads x, e and writes x_t, v
    # (4n), the stand-in copies x_t (2n), the add reads pred and the copy and writes (3n), fm_loss
    # reads the prediction and v (2n): 11n; the backward reads them again and writes pred's
    # gradient (3n): 14n
    n = x.numel() * 4
    _run(benchmark, step, (pred,), (pred,), mode, 11 * n, 14 * n, label, rounds=30)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_conv3x3(benchmark, shape, mode, provider):
    """3x3 convolution (channels_last, the layout the UNet runs in on the CPU): Winograd (cpp) vs
    oneDNN's direct convolution (ref). extra_info["gflops"]: nominal direct-convolution GFLOP/s
    (2 x multiply-adds of the direct algorithm, so Winograd can exceed the machine's GEMM rate)."""
    label, B, C, Co, H, W = shape
    g = torch.Generator().manual_seed(0)
    grad = mode == "full"
    x = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    w = (torch.randn(Co, C, 3, 3, generator=g) / (3 * C**0.5)).requires_grad_(grad)
    b = torch.randn(Co, generator=g).requires_grad_(grad)
    fn = _provider_fn(provider, conv3x3, conv3x3_ref, benchmark)
    _run(benchmark, fn, (x, w, b), (x, w, b), mode, 4 * B * H * W * (C + Co), 4 * B * H * W * (2 * C + 3 * Co),
         label, rounds=10 if B * H * W * C > 1_000_000 else 30)
    if benchmark.stats is not None:
        flop = 2 * B * H * W * C * Co * 9 * (1 if mode == "fwd" else 3)
        benchmark.extra_info["gflops"] = flop / _median(benchmark) / 1e9


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_winograd_tiles(benchmark, monkeypatch, shape, mode):
    """conv3x3's cpp backend with F(2x2, 3x3) and F(4x4, 3x3) tiles (DITO_FAST_WINOGRAD_TILE),
    timed in alternation: the evidence for the automatic choice (``auto_tile``, by
    ``MIN_TILE4_TILES``). extra_info: the medians and ``tile4_speedup`` (F(2x2) time over F(4x4))."""
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    label, B, C, Co, H, W = shape
    g, grad = torch.Generator().manual_seed(0), mode == "full"
    x = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    w = (torch.randn(Co, C, 3, 3, generator=g) / (3 * C**0.5)).requires_grad_(grad)
    b = torch.randn(Co, generator=g).requires_grad_(grad)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                conv3x3(x, w, b, backend="cpp")
        else:
            y = conv3x3(x, w, b, backend="cpp")
            torch.autograd.grad(y, (x, w, b), torch.ones_like(y))

    monkeypatch.delenv("DITO_FAST_WINOGRAD_TILE", raising=False)
    auto = winograd_tile(x)
    fns = {"2": call, "4": call}
    for tile in fns:
        monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile)
        call()
    rounds = 1 if benchmark.disabled else 11
    med = interleaved_medians(fns, rounds, before=lambda tile: monkeypatch.setenv("DITO_FAST_WINOGRAD_TILE", tile))
    benchmark.pedantic(call, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"shape": label, "mode": mode, "tile2_ms": med["2"] * 1e3, "tile4_ms": med["4"] * 1e3,
                                 "tile4_speedup": med["2"] / med["4"], "auto_tile": auto})


# The "eager" provider: each op as a user would write it in plain PyTorch, for float32 inputs that
# need none of the references' input checks, dtype casts and torch-bug workarounds (those cost
# 17-31 us per call, which weighs on the small rows: the 2026-12-04 benchmark review). The
# references (dito_fast.ops.*_ref) stay the specification; the rows check that these compute the
# same (_provider_calls) and report cpp against both.
def _eager_gnms(x, G, w, b, s, sh):
    return F.silu(torch.group_norm(x, G, w, b, 1e-5) * (1 + s[:, :, None, None]) + sh[:, :, None, None])


def _eager_latent(z):
    return F.layer_norm(z, z.shape[1:])


def _eager_fm_noise(x, e, t, sigma_min=1e-5):
    tb = t[:, None, None, None]
    return (1 - tb) * x + (sigma_min + tb * (1 - sigma_min)) * e, (1 - sigma_min) * e - x


def _eager_fm_loss(pred, target):
    return (pred - target).square().flatten(1).mean(1)


def _cases():
    """(op, shape label, mode, builder) for every op row above; builder(provider) -> a callable."""
    cases = []
    for (label, B, C, H, W, G), fmt in itertools.product(GNMS_SHAPES, (torch.contiguous_format, torch.channels_last)):
        # NCHW, and channels_last: the layout the models run in on the CPU (conv_activation_format)
        def build(provider, mode, B=B, C=C, H=H, W=W, G=G, fmt=fmt):
            g, grad = torch.Generator().manual_seed(0), mode == "full"
            args = [torch.randn(B, C, H, W, generator=g).contiguous(memory_format=fmt), torch.randn(C, generator=g),
                    torch.randn(C, generator=g), torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)]
            args = [a.requires_grad_(grad) for a in args]
            fn = {"cpp": lambda *a: group_norm_modulate_silu(a[0], G, *a[1:], backend="cpp"),
                  "eager": lambda *a: _eager_gnms(a[0], G, *a[1:])}.get(
                provider, lambda *a: group_norm_modulate_silu_ref(a[0], G, *a[1:]))
            return fn, args
        cases.append(("group_norm_modulate_silu", label + (" CL" if fmt == torch.channels_last else ""), build))
    for label, B, C, H, W in LATENT_SHAPES:
        def build(provider, mode, shape=(B, C, H, W)):
            z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(mode == "full")
            fn = {"cpp": lambda a: latent_layernorm(a, backend="cpp"), "eager": _eager_latent}.get(
                provider, latent_layernorm_ref)
            return fn, [z]
        cases.append(("latent_layernorm", label, build))
    for label, B, C, H, W in IMAGE_SHAPES:
        def build(provider, mode, shape=(B, C, H, W)):
            g = torch.Generator().manual_seed(0)
            x, e, pred = (torch.randn(shape, generator=g) for _ in range(3))
            t = torch.rand(shape[0], generator=g)
            noise, loss = {"cpp": ((lambda *a: fm_noise(*a, backend="cpp")), (lambda *a: fm_loss(*a, backend="cpp"))),
                           "eager": (_eager_fm_noise, _eager_fm_loss)}.get(provider, (fm_noise_ref, fm_loss_ref))

            if provider == "standin":
                # The stand-in's prediction alone: the copy and the add that joins pred to it
                # (recording the add's graph node when mode is "full"). The add's backward (a
                # pass-through in C++) stays in every provider's net time: timing it alone would
                # need an autograd.grad call of its own, whose fixed cost each step pays once.
                x_t = fm_noise_ref(x, e, t)[0]
                return (lambda pred_: pred_ + decoder_standin(x_t)), [pred.requires_grad_(mode == "full")]

            def step(pred_):
                x_t, v = noise(x, e, t)
                return loss(pred_ + decoder_standin(x_t), v)
            return step, [pred.requires_grad_(mode == "full")]
        cases.append(("fm_step", label, build))
    for label, B, C, Co, H, W in CONV_SHAPES:
        def build(provider, mode, B=B, C=C, Co=Co, H=H, W=W):
            g, grad = torch.Generator().manual_seed(0), mode == "full"
            args = [torch.randn(B, C, H, W, generator=g).contiguous(memory_format=torch.channels_last),
                    torch.randn(Co, C, 3, 3, generator=g) / (3 * C**0.5), torch.randn(Co, generator=g)]
            args = [a.requires_grad_(grad) for a in args]
            return ((lambda *a: conv3x3(*a, backend="cpp")) if provider == "cpp" else conv3x3_ref), args
        cases.append(("conv3x3", label, build))
    return [(op, label, mode, build) for op, label, build in cases for mode in MODES]


def _provider_calls(op, mode, build, providers) -> dict:
    """name -> a warmed-up callable running one provider of an op row once (forward, or forward
    and the gradients of every input). Providers: ref, compile, cpp, and for the norm ops
    ``floor``, for the flow-matching step ``standin`` (see below)."""
    fns = {}
    for provider in providers:
        if provider == "standin":  # timed on its own, in the same rounds
            standin, args = build(provider, mode)
            fns[provider] = lambda standin=standin, args=args: _no_grad_if(mode == "fwd", standin, *args)
            continue
        if provider == "floor":
            # One differentiable ATen op (x * 1) on the op's main input, called alike: what any
            # single-op implementation pays per call (Python, dispatcher, autograd) plus one read
            # and one write of x per pass, so ref / floor roughly bounds the ratio a fused op can
            # reach in this call pattern (roughly: the floor differentiates x alone).
            x = build("ref", mode)[1][0]

            def floor(x=x):
                if mode == "fwd":
                    with torch.no_grad():
                        x * 1.0
                else:
                    y = x * 1.0
                    torch.autograd.grad((y,), (x,), (torch.ones_like(y),))
            for _ in range(3):
                floor()
            fns[provider] = floor
            continue
        fn, args = build("ref" if provider == "compile" else provider, mode)
        if provider == "eager":  # the same result as the reference (float32: rounding apart)
            ref_fn, ref_args = build("ref", mode)
            with torch.no_grad():
                got, want = fn(*args), ref_fn(*ref_args)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if provider == "compile":
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True)

        def call(fn=fn, args=args):
            if mode == "fwd":
                with torch.no_grad():
                    fn(*args)
            else:
                outs = fn(*args)
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.grad(outs, args, [torch.ones_like(o) for o in outs])
        for _ in range(3):
            call()
        fns[provider] = call
    return fns


# Rows (dito-S's, where a call's fixed costs weigh most) that also time the cpp provider with the
# dispatcher's direct route switched off ("boxed": the backend selection in Python, then the boxed
# torch.ops call; dito_fast/ops/_dispatch.py), in the same rounds: what that route saves.
ROUTE_ROWS = ("S@64 L3", "S@64 L3 CL", "S@64 latent", "S@64 image")


def _set_route(provider: str) -> None:
    _dispatch.DIRECT_ROUTES = provider != "boxed"


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-{c[1].replace(' ', '-').replace('@', '')}-{c[2]}")
def test_interleaved_ratio(benchmark, case):
    """cpp vs the eager reference and torch.compile of the reference, timed in alternation (each
    round in a shuffled order; conftest.interleaved_medians), so that the machine's drifts (on
    this VM isolated timings of large shapes vary by up to 4x between runs) hit all alike.
    extra_info: the medians, ``speedup`` (cpp vs ref) and ``speedup_vs_compile``; for ROUTE_ROWS
    also ``boxed_ms``, ``speedup_boxed`` and ``saving_us`` (boxed less cpp, per call of the row).
    The compile provider is left out of smoke runs."""
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    op, label, mode, build = case
    providers = ("ref", "cpp") if benchmark.disabled else ("ref", "compile", "cpp")
    if op != "conv3x3":  # (conv3x3's reference is one ATen call already)
        providers += ("eager",)
    extra = ("standin",) if op == "fm_step" else ("floor",) if op in ("latent_layernorm", "group_norm_modulate_silu") else ()
    fns = _provider_calls(op, mode, build, providers + extra)
    if label in ROUTE_ROWS and op != "conv3x3":
        # the same calls on inputs of their own (not warm from the cpp call), with the direct
        # route off (_set_route)
        fns["boxed"] = _provider_calls(op, mode, build, ("cpp",))["cpp"]
    rounds = 1 if benchmark.disabled else 21
    try:
        med = interleaved_medians(fns, rounds, before=_set_route)
    finally:
        _dispatch.DIRECT_ROUTES = True
    benchmark.pedantic(fns["cpp"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"op": op, "shape": label, "mode": mode, "ref_ms": med["ref"] * 1e3,
                                 "cpp_ms": med["cpp"] * 1e3, "speedup": med["ref"] / med["cpp"]})
    if "compile" in med:
        benchmark.extra_info.update({"compile_ms": med["compile"] * 1e3,
                                     "speedup_vs_compile": med["compile"] / med["cpp"]})
    if "eager" in med:
        benchmark.extra_info.update({"eager_ms": med["eager"] * 1e3, "speedup_vs_eager": med["eager"] / med["cpp"]})
    if "floor" in med:
        benchmark.extra_info.update({"floor_ms": med["floor"] * 1e3, "ref_vs_floor": med["ref"] / med["floor"]})
    if "boxed" in med:
        benchmark.extra_info.update({"boxed_ms": med["boxed"] * 1e3, "speedup_boxed": med["ref"] / med["boxed"],
                                     "saving_us": (med["boxed"] - med["cpp"]) * 1e6})
    if "standin" in med:
        # The flow-matching ops' own time: each provider's step less the stand-in's forward,
        # which every provider runs alike (medians of the same rounds).
        net = {k: v - med["standin"] for k, v in med.items() if k != "standin"}
        benchmark.extra_info.update({"standin_ms": med["standin"] * 1e3, "speedup_net": net["ref"] / net["cpp"]})
        if "eager" in net:
            benchmark.extra_info["speedup_vs_eager_net"] = net["eager"] / net["cpp"]
        if "compile" in net:
            benchmark.extra_info["speedup_vs_compile_net"] = net["compile"] / net["cpp"]


CHAIN = 8
CHAIN_ROWS = [("group_norm_modulate_silu", "S@64 L3"), ("group_norm_modulate_silu", "S@64 L3 CL"),
              ("group_norm_modulate_silu", "B@256 L3"), ("group_norm_modulate_silu", "B@256 L3 CL"),
              ("latent_layernorm", "S@64 latent"), ("latent_layernorm", "B@256 latent")]


@pytest.mark.parametrize("row", CHAIN_ROWS, ids=lambda r: f"{r[0]}-{r[1].replace(' ', '-').replace('@', '')}")
def test_chained_ratio(benchmark, row):
    """Forward+backward of CHAIN successive calls (each on the previous call's output, the same
    parameters), with one ``autograd.grad`` for the first input and every parameter at the end:
    how a model pays for the op, where what each backward pass costs once (``autograd.grad``'s
    argument handling, the engine's start, the output gradient's ``ones_like``: about 90 us with
    cold caches, alike for every provider) is shared by many calls. ``test_interleaved_ratio``'s
    rows pay it on every call, which pulls the small rows' ratios toward 1. cpp and the eager
    reference alternated as there (no torch.compile provider, to keep the run short).
    extra_info: per-call milliseconds (chain median / CHAIN) and ``speedup``."""
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    op, label = row
    build = next(b for o, lab, m, b in _cases() if o == op and lab == label and m == "full")
    fns = {}
    for provider in ("ref", "cpp"):
        fn, args = build(provider, "full")

        def chain(fn=fn, args=args):
            y = args[0]
            for _ in range(CHAIN):
                y = fn(y, *args[1:])
            torch.autograd.grad((y,), args, (torch.ones_like(y),))
        for _ in range(2):
            chain()
        fns[provider] = chain
    med = interleaved_medians(fns, 1 if benchmark.disabled else 21)
    benchmark.pedantic(fns["cpp"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"op": op, "shape": label, "mode": "full", "chain": CHAIN,
                                 "ref_ms_per_call": med["ref"] / CHAIN * 1e3,
                                 "cpp_ms_per_call": med["cpp"] / CHAIN * 1e3, "speedup": med["ref"] / med["cpp"]})


@pytest.mark.parametrize("mode", MODES)
def test_interleaving_order_bias(benchmark, mode):
    """Why conftest.interleaved_medians shuffles each round: the one cpp call of a small row
    (group_norm_modulate_silu at dito-S's 8x8 level, NCHW) timed twice per round in one fixed
    order, once right after the torch.compile'd reference and once right after the one-op
    floor (after the reference in smoke runs, which leave compile out). extra_info: both
    medians and ``position_ratio``, the first over the second (1.0 if the position did not
    matter)."""
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    op, label, _, build = next(c for c in _cases() if c[0] == "group_norm_modulate_silu" and c[1] == "S@64 L3")
    providers = ("ref", "cpp", "floor") if benchmark.disabled else ("ref", "compile", "cpp", "floor")
    fns = _provider_calls(op, mode, build, providers)
    sequence = [(name, name) for name in providers] + [("cpp", "cpp_after_floor")]
    times = {key: [] for _, key in sequence}
    for _ in range(1 if benchmark.disabled else 41):
        for name, key in sequence:
            t0 = time.perf_counter()
            fns[name]()
            times[key].append(time.perf_counter() - t0)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    benchmark.pedantic(fns["cpp"], rounds=1, warmup_rounds=0, iterations=1)
    after = "compile" if "compile" in med else "ref"
    benchmark.extra_info.update({"op": op, "shape": label, "mode": mode, "cpp_after": after,
                                 "cpp_ms_after_it": med["cpp"] * 1e3,
                                 "cpp_ms_after_floor": med["cpp_after_floor"] * 1e3,
                                 "position_ratio": med["cpp"] / med["cpp_after_floor"]})


def _no_grad_if(flag: bool, fn, *args):
    with torch.set_grad_enabled(not flag):
        return fn(*args)


def test_memory_bandwidth(benchmark):
    """Copy bandwidth of this machine at the benchmark thread count: c = a + b on 64 MiB arrays."""
    a, b = torch.randn(16 * 2**20), torch.randn(16 * 2**20)
    c = torch.empty_like(a)
    benchmark.pedantic(lambda: torch.add(a, b, out=c), rounds=10, warmup_rounds=2, iterations=1)
    med = _median(benchmark)
    if med is not None:
        benchmark.extra_info.update({"gb_per_s": 3 * a.numel() * 4 / med / 1e9})
