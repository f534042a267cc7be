"""Model-level throughput on this machine (CPU unless CUDA is present), eager reference ops vs
dito_fast's fused ops.

- train step (forward + backward + fused AdamW) in images/s for dito-tiny and dito-S at 64x64;
- one decoder evaluation (one ODE step) in ms per batch, for the same presets;
- encode in images/s;
- ``test_profile_fused_share``: torch.profiler of the dito-S train step and decoder step with
  reference ops and with fused ops: the share of time the fused ops replace, the ideal speed-up
  that share allows (Amdahl: the norm ops taking no time, and the 3x3 convolutions' time shrunk
  by the Winograd transform's saving of multiplications, ``conv_flop_ratio``) and the achieved
  speed-up. The shares come from one profiled step of each (the profiler adds ~5%, more to the
  reference's many small ops), the fused ops there called through torch.ops (the profiler's
  ranges need the boxed route: ``_dispatch.PROFILE_RANGES``).

``ops="ref"`` runs the fused ops (fm_noise, fm_loss, latent_layernorm, group_norm_modulate_silu,
conv3x3) on their eager reference through DITO_FAST_BACKEND; ``ops="fused"`` uses the default
choice (the C++ kernels when built). Attention uses SDPA in both. The profile benchmark also runs
the fused ops with channels_last inputs, the layout training and fast_decode use on the CPU by
default. The parameters stay in the default layout throughout, as the trainer keeps them
(``test_optimizer_step_layout``: why).

Run: ``pytest benchmarks/bench_model.py --benchmark-json=bench_model.json`` and
``python benchmarks/report.py bench_model.json``; derived figures are in each result's extra_info.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import PEAK_MIB_SOURCE, interleaved_medians, run_child
from dito_fast import DiTo
from dito_fast.models.dito import decoder_gflops, encoder_gflops
from dito_fast.ops import _cpp, _dispatch
from dito_fast.ops.conv3x3 import MIN_WINOGRAD_CHANNELS, Conv3x3, winograd_tile

SIZE = 64
# Memory-bound fused ops (the replaced time could at best vanish) and the Winograd convolution
# (compute-bound: at best its fewer multiply-adds at the same rate; conv_flop_ratio).
NORM_OPS = ("fm_noise", "fm_loss", "latent_layernorm", "group_norm_modulate_silu")
FUSED_OPS = NORM_OPS + ("conv3x3",)
REF_ENV = ",".join(f"{op}=ref" for op in FUSED_OPS)
OPS = ["ref", "fused"]


def _median(benchmark):
    """Median seconds of a finished benchmark, or None when benchmarking is disabled."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def _use_ops(monkeypatch, ops):
    """Select the ops; returns the memory format to run in: NCHW for the eager reference,
    channels_last for the fused ops (what training and fast_decode use on the CPU by default)."""
    if ops == "ref":
        monkeypatch.setenv("DITO_FAST_BACKEND", REF_ENV)
        return torch.contiguous_format
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
    return torch.channels_last


def _model(preset):
    torch.manual_seed(0)
    return DiTo.from_preset(preset)


def _images(batch):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def train_step_fn(preset, batch, memory_format=torch.contiguous_format):
    """One train step (forward, backward, fused AdamW) of ``preset`` on a batch in
    ``memory_format``; the parameters keep the default layout, as the trainer keeps them."""
    model = _model(preset).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = _images(batch).contiguous(memory_format=memory_format)
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = model(x, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _decoder_step_fn(preset, batch, memory_format=torch.contiguous_format):
    model = _model(preset).eval()
    x_t = _images(batch).contiguous(memory_format=memory_format)
    t = torch.full((batch,), 0.5)
    z = torch.randn(batch, model.latent_channels, SIZE // 8, SIZE // 8).contiguous(memory_format=memory_format)

    def step():
        with torch.inference_mode():
            model.velocity(x_t, t, z)

    return step, model


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("preset,batch", [("dito-tiny", 16), ("dito-S", 8)])
def test_train_step(benchmark, monkeypatch, preset, batch, ops):
    step = train_step_fn(preset, batch, _use_ops(monkeypatch, ops))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    med = _median(benchmark)
    if med is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info.update({"ops": ops, "batch": batch, "image_size": SIZE, "images_per_s": batch / med})


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("preset,batch", [("dito-tiny", 1), ("dito-tiny", 8), ("dito-S", 1), ("dito-S", 8)])
def test_decoder_step(benchmark, monkeypatch, preset, batch, ops):
    step, model = _decoder_step_fn(preset, batch, _use_ops(monkeypatch, ops))
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    med = _median(benchmark)
    if med is None:
        return
    gflop = decoder_gflops(model.config, SIZE) * batch
    benchmark.extra_info.update({"ops": ops, "batch": batch, "image_size": SIZE, "ms_per_step": med * 1e3,
                                 "gflop_per_step": gflop, "gflops_per_s": gflop / med})


@pytest.mark.parametrize("kind", ["train_step", "decoder_step"])
def test_channels_last(benchmark, kind):
    """dito-S at 64x64, batch 8, fused ops: NCHW vs channels_last inputs, timed in alternation.
    extra_info: both medians and ``channels_last_speedup``."""
    rounds = 1 if benchmark.disabled else 7
    preset = "dito-tiny" if benchmark.disabled else "dito-S"
    fns = {}
    for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = _model(preset)
        x = _images(8).contiguous(memory_format=fmt)
        if kind == "train_step":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            gen = torch.Generator().manual_seed(0)

            def fn(model=model, x=x, opt=opt, gen=gen):
                loss = model(x, generator=gen).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            model.eval()
            z = torch.randn(8, model.latent_channels, SIZE // 8, SIZE // 8).contiguous(memory_format=fmt)
            t = torch.full((8,), 0.5)

            def fn(model=model, x=x, z=z, t=t):
                with torch.inference_mode():
                    model.velocity(x, t, z)
        fn()
        fns[name] = fn
    med = interleaved_medians(fns, rounds)
    benchmark.pedantic(fns["channels_last"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"model": preset, "batch": 8, "image_size": SIZE, "kind": kind,
                                 "nchw_ms": med["nchw"] * 1e3, "channels_last_ms": med["channels_last"] * 1e3,
                                 "channels_last_speedup": med["nchw"] / med["channels_last"]})


@pytest.mark.parametrize("preset", ["dito-tiny", "dito-S"])
def test_encode(benchmark, preset):
    model = _model(preset).eval()
    x = _images(8)

    def enc():
        with torch.inference_mode():
            model.encode(x)

    benchmark.pedantic(enc, rounds=10, warmup_rounds=2, iterations=1)
    med = _median(benchmark)
    if med is None:
        return
    benchmark.extra_info.update({"batch": 8, "image_size": SIZE, "images_per_s": 8 / med,
                                 "gflops_per_s": encoder_gflops(model.config, SIZE) * 8 / med})


def test_optimizer_step_layout(benchmark):
    """One fused AdamW step over dito-S's parameters (random gradients), the 4-d parameters
    contiguous (what the trainer keeps) vs channels_last (``model.to(memory_format=
    torch.channels_last)``: the fused kernel copies each such parameter, gradient and moment to a
    contiguous tensor and back), timed in alternation. extra_info: both medians and
    ``contiguous_speedup``."""
    rounds = 1 if benchmark.disabled else 15
    fns = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = _model("dito-S").to(memory_format=fmt)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        opt.step()  # creates the moments
        fns[name] = opt.step
    med = interleaved_medians(fns, rounds)
    benchmark.pedantic(fns["contiguous"], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"model": "dito-S", "contiguous_ms": med["contiguous"] * 1e3,
                                 "channels_last_ms": med["channels_last"] * 1e3,
                                 "contiguous_speedup": med["channels_last"] / med["contiguous"]})


# ---- profile: the share of time the fused ops replace ----------------------------------------

_NO_NODE = {"aten::to", "aten::contiguous", "aten::detach", "aten::alias", "aten::empty"}


def conv_flop_ratio(fn) -> float:
    """Multiply-adds of the direct 3x3 convolutions one call of ``fn`` runs over those of the
    algorithm the fused ops pick for each (F(4x4): 9 / 2.25, F(2x2): 9 / 4, and 1 for the layers
    with too few channels, which stay on ``F.conv2d``), from the forward calls of every
    :class:`Conv3x3` (the backward's convolutions have the same shapes, so the same ratio)."""
    direct = fast = 0.0

    def hook(module, args):
        nonlocal direct, fast
        if not isinstance(module, Conv3x3):
            return
        x = args[0]
        macs = x.shape[0] * x.shape[2] * x.shape[3] * module.in_channels * module.out_channels * 9
        direct += macs
        if min(module.in_channels, module.out_channels) < MIN_WINOGRAD_CHANNELS:
            fast += macs
        else:
            tile = winograd_tile(x)
            fast += macs * (tile + 2) ** 2 / (9 * tile * tile)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return direct / fast


def fused_op_time(prof) -> tuple[dict, float]:
    """({op: seconds inside its forward ranges + their backward nodes}, total seconds) of a
    profiled step. Backward nodes are matched to the forward ops of the ranges by autograd
    sequence number; ops that create no autograd node (aten::to, ...) are skipped because they
    carry a neighbour's number."""
    events = prof.events()
    per_op = {}
    for op in FUSED_OPS:
        ranges = [e for e in events if e.name == f"dito_fast::{op}"]
        seqs = {c.sequence_nr for r in ranges for c in r.cpu_children if c.sequence_nr >= 0 and c.name not in _NO_NODE}
        backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")
                    and e.sequence_nr in seqs]
        per_op[op] = (sum(e.cpu_time_total for e in ranges) + sum(e.cpu_time_total for e in backward)) * 1e-6
    top = [e for e in events if e.cpu_parent is None]
    return per_op, sum(e.cpu_time_total for e in top) * 1e-6


def _set_backend_env(value):
    if value is None:
        os.environ.pop("DITO_FAST_BACKEND", None)
    else:
        os.environ["DITO_FAST_BACKEND"] = value


@pytest.mark.parametrize("kind", ["train_step", "decoder_step"])
def test_profile_fused_share(benchmark, monkeypatch, kind):
    """dito-S at 64x64, batch 8: profile with reference ops (NCHW, eager PyTorch) and with fused
    ops, once with NCHW input ("fused_nchw": the models still run their activations
    channels_last inside on the CPU) and once with channels_last input, as training and
    fast_decode run on the CPU; then time all three in alternation.

    The ideal: the memory-bound fused ops' share s_norm taking no time and the 3x3 convolutions'
    share s_conv shrinking by the ratio r of multiply-adds the Winograd tiles chosen per layer
    save (``conv_flop_ratio``), so ideal = 1 / (1 - s_norm - s_conv (1 - 1/r));
    ``saving_vs_ideal`` is the time saved over the time that ideal saves.
    It is an estimate, not a strict bound: the reference convolutions may run below the GEMM
    rate, and the layout change also speeds up other ops, so the ratio can exceed 1."""
    if not _cpp.AVAILABLE:
        pytest.skip(f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")
    rounds = 1 if benchmark.disabled else 7
    preset = "dito-tiny" if benchmark.disabled else "dito-S"  # the smoke run only checks the plumbing
    monkeypatch.setenv("DITO_FAST_BACKEND", "")  # restored by monkeypatch after the test
    variants = {"ref": (REF_ENV, torch.contiguous_format), "fused_nchw": (None, torch.contiguous_format),
                "fused": (None, torch.channels_last)}
    fns, shares = {}, {}
    for name, (env, fmt) in variants.items():
        _set_backend_env(env)
        if kind == "train_step":
            fn = train_step_fn(preset, 8, fmt)
        else:
            fn = _decoder_step_fn(preset, 8, fmt)[0]
        fn()
        monkeypatch.setattr(_dispatch, "PROFILE_RANGES", True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        monkeypatch.setattr(_dispatch, "PROFILE_RANGES", False)
        per_op, total = fused_op_time(prof)
        fns[name], shares[name] = fn, {op: t / total for op, t in per_op.items()}
    step = interleaved_medians(fns, rounds, before=lambda name: _set_backend_env(variants[name][0]))
    _set_backend_env(None)
    flop_ratio = conv_flop_ratio(fns["fused"])
    benchmark.pedantic(fns["fused"], rounds=1, warmup_rounds=0, iterations=1)
    s_norm = sum(shares["ref"][op] for op in NORM_OPS)
    s_conv = shares["ref"]["conv3x3"]
    bound_saving = s_norm + s_conv * (1 - 1 / flop_ratio)  # fraction of the ref step
    info = {
        "model": preset, "batch": 8, "image_size": SIZE, "kind": kind,
        "ref_step_ms": step["ref"] * 1e3, "fused_nchw_step_ms": step["fused_nchw"] * 1e3,
        "fused_step_ms": step["fused"] * 1e3,
        "norm_ops_share": s_norm, "conv3x3_share": s_conv, "conv_flop_ratio": flop_ratio,
        "norm_ops_share_after": sum(shares["fused"][op] for op in NORM_OPS),
        "conv3x3_share_after": shares["fused"]["conv3x3"],
        "ideal_speedup": 1 / (1 - bound_saving),
        "achieved_speedup": step["ref"] / step["fused"],
        "achieved_speedup_nchw": step["ref"] / step["fused_nchw"],
        "saving_vs_ideal": (step["ref"] - step["fused"]) / (bound_saving * step["ref"]),
    }
    benchmark.extra_info.update(info)


_TRAIN_MEMORY_SCRIPT = PEAK_MIB_SOURCE + textwrap.dedent("""
    import json, sys, time, torch
    sys.path.insert(0, sys.argv[4])
    from bench_model import train_step_fn

    preset, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    step = train_step_fn(preset, batch, torch.channels_last)
    before = peak_mib()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak_mib": peak_mib(), "step_mib": peak_mib() - before, "step_s": times[-1]}))
""")


def test_train_peak_memory(benchmark):
    """Peak resident memory of training steps (fused ops, 64x64) with the 3x3 convolutions' transformed
    filters kept from forward to backward (``DITO_FAST_WINOGRAD_KEEP_FILTER=1``) and transformed again in
    the backward (the default), each in a fresh process. extra_info: both peaks, their increase over the
    model's set-up, and the second step's seconds."""
    smoke = benchmark.disabled
    preset, batch = ("dito-tiny", 2) if smoke else ("dito-S", 8)
    result = {}
    for name, keep in (("kept", "1"), ("recomputed", "0")):
        result[name] = run_child(_TRAIN_MEMORY_SCRIPT, preset, batch, torch.get_num_threads(),
                                 os.path.dirname(os.path.abspath(__file__)),
                                 env={"DITO_FAST_WINOGRAD_KEEP_FILTER": keep})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"preset": preset, "batch": batch, "image_size": SIZE,
                                 **{f"{k}_{field}": v[field] for k, v in result.items() for field in v}})
    if not smoke:
        assert result["recomputed"]["peak_mib"] < result["kept"]["peak_mib"]
