"""Model-level throughput on this machine (CPU unless CUDA is present).

- train step (forward + backward + AdamW) in images/s for dito-tiny and dito-S at 64x64;
- one decoder evaluation (one ODE step) in ms per batch, for the same presets;
- encode in images/s.

Run: ``pytest benchmarks/bench_model.py --benchmark-json=bench_model.json``; the derived figures
(images/s, GFLOP/s) are in each result's ``extra_info``.
"""

import pytest
import torch

from dito_fast import DiTo
from dito_fast.models.dito import decoder_gflops, encoder_gflops

SIZE = 64
PRESETS = ["dito-tiny", "dito-S"]


def _median(benchmark):
    """Median seconds of a finished benchmark, or None when benchmarking is disabled."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def _model(preset):
    torch.manual_seed(0)
    return DiTo.from_preset(preset)


def _images(batch):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("preset,batch", [("dito-tiny", 16), ("dito-S", 8)])
def test_train_step(benchmark, preset, batch):
    model = _model(preset).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = _images(batch)
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = model(x, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    med = _median(benchmark)
    if med is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info.update({"batch": batch, "image_size": SIZE, "images_per_s": batch / med})


@pytest.mark.parametrize("preset,batch", [("dito-tiny", 1), ("dito-tiny", 8), ("dito-S", 1), ("dito-S", 8)])
def test_decoder_step(benchmark, preset, batch):
    model = _model(preset).eval()
    x_t = _images(batch)
    t = torch.full((batch,), 0.5)
    z = torch.randn(batch, model.latent_channels, SIZE // 8, SIZE // 8)

    def step():
        with torch.inference_mode():
            model.velocity(x_t, t, z)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    med = _median(benchmark)
    if med is None:  # --benchmark-disable: the function ran once, untimed
        return
    gflop = decoder_gflops(model.config, SIZE) * batch
    benchmark.extra_info.update({"batch": batch, "image_size": SIZE, "ms_per_step": med * 1e3,
                                 "gflop_per_step": gflop, "gflops_per_s": gflop / med})


@pytest.mark.parametrize("preset", PRESETS)
def test_encode(benchmark, preset):
    model = _model(preset).eval()
    x = _images(8)

    def enc():
        with torch.inference_mode():
            model.encode(x)

    benchmark.pedantic(enc, rounds=10, warmup_rounds=2, iterations=1)
    med = _median(benchmark)
    if med is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info.update({"batch": 8, "image_size": SIZE, "images_per_s": 8 / med,
                                 "gflops_per_s": encoder_gflops(model.config, SIZE) * 8 / med})
