"""GPU throughput (every test skips without CUDA): the fused ops' CUDA kernels (``backend="cpp"``)
and Triton kernels against the eager reference (and torch.compile of it, on the rows named in
COMPILE_ROWS) on the GPU; the dito-S and dito-B decoder step and train step with reference vs
fused ops; ``fast_decode`` eager vs CUDA graph.

Every row times its variants in alternation (each round in a shuffled order, as
``conftest.interleaved_medians``) with CUDA events around ``inner`` back-to-back calls, the
first event recorded on an idle GPU, so a variant's time includes its host-side launch cost
where that exceeds the GPU's work, as it does in an eager model (the run of 2026-12-04 predates
that synchronisation: there a variant's launches could start behind the previous variant's
queued work). extra_info holds each variant's median ms per call and the ratios; the
benchmark's own timing is one call of the fused variant, not used in the tables.

Run on a GPU machine: ``pytest benchmarks/bench_gpu.py --benchmark-json=F`` then
``python benchmarks/report.py F`` (``scripts/gpu_check.sh gpu bench`` does both).
DITO_BENCH_GPU_COMPILE=0 leaves the torch.compile variants out (each costs a compile).
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

import dito_fast
from dito_fast import DiTo
from dito_fast.ops import (_cpp, fm_loss, fm_loss_ref, fm_noise, fm_noise_ref, group_norm_modulate_silu,
                           group_norm_modulate_silu_ref, latent_layernorm, latent_layernorm_ref)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_OPS = ("fm_noise", "fm_loss", "latent_layernorm", "group_norm_modulate_silu", "conv3x3")
REF_ENV = ",".join(f"{op}=ref" for op in FUSED_OPS)
COMPILE = os.environ.get("DITO_BENCH_GPU_COMPILE", "1") != "0"

# (label, B, C, H, W, groups): decoder levels 0 and 3 of dito-S at 64x64 (batch 8) and dito-B at
# 256x256 (batch 1), as in bench_ops.py, and dito-B at 256x256 in a training batch of 16.
GNMS_SHAPES = [
    ("S@64 L0", 8, 64, 64, 64, 32), ("S@64 L3", 8, 256, 8, 8, 32),
    ("B@256 L0", 1, 128, 256, 256, 32), ("B@256 L3", 1, 512, 32, 32, 32),
    ("B@256x16 L0", 16, 128, 256, 256, 32),
]
LATENT_SHAPES = [("S@64 latent", 8, 4, 8, 8), ("B@256x16 latent", 16, 4, 32, 32)]
IMAGE_SHAPES = [("S@64 image", 8, 3, 64, 64), ("B@256x16 image", 16, 3, 256, 256)]
COMPILE_ROWS = {("S@64 L0", torch.float32, False), ("B@256x16 L0", torch.float32, False),
                ("B@256x16 L0", torch.bfloat16, True)}


def cuda_medians(fns: dict, rounds: int, inner: int) -> dict:
    """Median ms per call of each function of ``fns``: ``rounds`` rounds, each running every
    function ``inner`` times between two CUDA events recorded on an idle GPU, in a shuffled order
    per round."""
    names, rng = list(fns), random.Random(0)
    events = {name: [] for name in names}
    for fn in fns.values():  # warm-up: compiles, autotuning, allocator
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()  # an empty queue: the host's launch cost is not hidden behind
            start.record()            # the previous variant's queued work
            for _ in range(inner):
                fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    out = {}
    for name, pairs in events.items():
        times = sorted(s.elapsed_time(e) / inner for s, e in pairs)
        out[name] = times[len(times) // 2]
    return out


def _randn(*shape, seed, dtype=torch.float32, grad=False):
    g = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=dtype).requires_grad_(grad)


def _providers(fused, ref, compile_ok: bool) -> dict:
    """name -> callable(*args) over the op's backends on CUDA (those that can run here)."""
    out = {"ref": ref}
    if _cpp.AVAILABLE and _cpp._C.has_cuda():
        out["cuda"] = lambda *a: fused(*a, backend="cpp")
    if importlib.util.find_spec("triton") is not None:
        out["triton"] = lambda *a: fused(*a, backend="triton")
    if compile_ok and COMPILE:
        # static shapes, compiled afresh: the code cache is shared by every wrapper of ``ref``, and
        # a second shape would otherwise get a dynamic-shape graph
        torch._dynamo.reset()
        out["compile"] = torch.compile(ref, fullgraph=True, dynamic=False)
    return out


def _timed(fn, mode, grad_inputs):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn()
        return call

    def call():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs])
    return call


def _record(benchmark, fns, med, info, nbytes):
    benchmark.pedantic(fns[next(k for k in ("cuda", "triton", "ref") if k in fns)], rounds=1, warmup_rounds=0,
                       iterations=1)
    info = dict(info, min_bytes=nbytes, gpu=torch.cuda.get_device_name())
    for name, ms in med.items():
        info[f"{name}_ms"] = ms
        info[f"{name}_gb_per_s"] = nbytes / ms / 1e6
        if name != "ref":
            info[f"{name}_speedup"] = med["ref"] / ms
    benchmark.extra_info.update(info)


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def test_gpu_memory_bandwidth(benchmark):
    """The GPU's device-to-device copy rate (1 GiB read + 1 GiB written per copy, several times its
    L2): the ceiling the memory-bound ops' GB/s are read against."""
    src = torch.empty(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    med = cuda_medians({"copy": lambda: dst.copy_(src)}, rounds=10, inner=5)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"gb_per_s": 2 * src.numel() * 4 / med["copy"] / 1e6, "copy_ms": med["copy"],
                                 "gpu": torch.cuda.get_device_name()})


GNMS_CASES = [(s, d, cl) for s in GNMS_SHAPES for d in (torch.float32, torch.bfloat16) for cl in (False, True)]


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("case", GNMS_CASES,
                         ids=lambda c: f"{c[0][0].replace(' ', '-').replace('@', '')}-{_dtype_id(c[1])}{'-CL' if c[2] else ''}")
def test_gpu_group_norm_modulate_silu(benchmark, case, mode):
    (label, B, C, H, W, G), dtype, cl = case
    grad = mode == "full"
    x = _randn(B, C, H, W, seed=0, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(grad)
    w, b = _randn(C, seed=1, grad=grad), _randn(C, seed=2, grad=grad)
    s, sh = _randn(B, C, seed=3, dtype=dtype, grad=grad), _randn(B, C, seed=4, dtype=dtype, grad=grad)
    inputs = (x, w, b, s, sh)
    provs = _providers(group_norm_modulate_silu, group_norm_modulate_silu_ref, (label, dtype, cl) in COMPILE_ROWS)
    fns = {k: _timed(lambda f=f: f(x, G, w, b, s, sh), mode, inputs) for k, f in provs.items()}
    med = cuda_medians(fns, rounds=15, inner=10)
    n = x.numel() * x.element_size()
    _record(benchmark, fns, med, {"op": "group_norm_modulate_silu", "shape": label + (" CL" if cl else ""),
                                  "mode": mode, "dtype": _dtype_id(dtype)}, 2 * n if mode == "fwd" else 5 * n)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_gpu_latent_layernorm(benchmark, shape, mode):
    label, B, C, H, W = shape
    z = _randn(B, C, H, W, seed=0, grad=mode == "full")
    fns = {k: _timed(lambda f=f: f(z), mode, (z,)) for k, f in _providers(latent_layernorm, latent_layernorm_ref,
                                                                        False).items()}
    med = cuda_medians(fns, rounds=15, inner=20)
    n = z.numel() * 4
    _record(benchmark, fns, med, {"op": "latent_layernorm", "shape": label, "mode": mode, "dtype": "float32"},
            2 * n if mode == "fwd" else 5 * n)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: s[0].replace(" ", "-").replace("@", ""))
def test_gpu_fm_step(benchmark, shape, mode):
    """Noising + velocity target, then the per-sample loss of ``pred + x_t`` (x_t standing in for
    the decoder's input dependence) against the target; the gradient is taken for ``pred``."""
    label, B, C, H, W = shape
    x, e = _randn(B, C, H, W, seed=0), _randn(B, C, H, W, seed=1)
    pred = _randn(B, C, H, W, seed=2, grad=mode == "full")
    t = torch.rand(B, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    noise_p, loss_p = _providers(fm_noise, fm_noise_ref, False), _providers(fm_loss, fm_loss_ref, False)

    def step_of(name):
        def step():
            x_t, v = noise_p[name](x, e, t)
            return loss_p[name](pred + x_t, v)
        return step

    fns = {k: _timed(step_of(k), mode, (pred,)) for k in noise_p}
    med = cuda_medians(fns, rounds=15, inner=20)
    n = x.numel() * 4  # fm_noise 4n, the add 3n, fm_loss 2n; the backward 3n more
    _record(benchmark, fns, med, {"op": "fm_step", "shape": label, "mode": mode, "dtype": "float32"},
            9 * n if mode == "fwd" else 12 * n)


# ---- model level ---------------------------------------------------------------------------------
MODEL_CASES = [("dito-S", 64, 64, "fp32"), ("dito-S", 64, 64, "bf16"), ("dito-B", 256, 16, "bf16")]


def _model(preset):
    torch.manual_seed(0)
    return DiTo.from_preset(preset).cuda()


def _set_ops(monkeypatch, ops):
    if ops == "ref":
        monkeypatch.setenv("DITO_FAST_BACKEND", REF_ENV)
    else:
        monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)


@pytest.mark.parametrize("kind", ["decoder_step", "train_step"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: f"{c[0]}@{c[1]}x{c[2]}-{c[3]}")
def test_gpu_model(benchmark, monkeypatch, case, kind):
    """One decoder evaluation (inference) or one train step (forward, backward, fused AdamW) with
    the reference ops and with the fused ops (the default choice), alternated. bf16: autocast."""
    preset, size, batch, precision = case
    model = _model(preset).train(kind == "train_step")
    x = torch.rand(batch, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    if kind == "train_step":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator("cuda").manual_seed(0)

        def step():
            with amp:
                loss = model(x, generator=gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        z = torch.randn(batch, model.latent_channels, size // 8, size // 8, device="cuda")
        t = torch.full((batch,), 0.5, device="cuda")

        def step():
            with torch.inference_mode(), amp:
                model.velocity(x, t, z)

    def with_ops(ops):
        def call():
            _set_ops(monkeypatch, ops)
            step()
        return call

    fns = {"ref": with_ops("ref"), "fused": with_ops("fused")}
    med = cuda_medians(fns, rounds=7 if preset == "dito-B" else 11, inner=1)
    benchmark.pedantic(fns["fused"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"model": preset, "image_size": size, "batch": batch, "precision": precision,
                                 "kind": kind, "ref_ms": med["ref"], "fused_ms": med["fused"],
                                 "speedup": med["ref"] / med["fused"], "images_per_s": batch / med["fused"] * 1e3,
                                 "gpu": torch.cuda.get_device_name()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_gpu_fast_decode(benchmark, dtype):
    """fast_decode of dito-S latents at 64x64 (batch 32, 10 Euler steps) eager vs CUDA graph, to
    float images on the GPU's host side (the transfer included)."""
    model = _model("dito-S").eval()
    z = torch.randn(32, model.latent_channels, 8, 8, device="cuda")
    kw = dict(steps=10, sampler="euler", seed=0, output="float", dtype=dtype)
    fns = {"eager": lambda: dito_fast.fast_decode(model, z, cuda_graph=False, **kw),
           "graph": lambda: dito_fast.fast_decode(model, z, cuda_graph=True, **kw)}
    med = cuda_medians(fns, rounds=7, inner=1)
    benchmark.pedantic(fns["graph"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"model": "dito-S", "batch": 32, "steps": 10, "dtype": _dtype_id(dtype),
                                 "eager_ms": med["eager"], "graph_ms": med["graph"],
                                 "graph_speedup": med["eager"] / med["graph"],
                                 "images_per_s": 32 / med["graph"] * 1e3, "gpu": torch.cuda.get_device_name()})
