"""Tests for dito_fast/decode.py: ``fast_decode`` solves the same ODE from the same noise as
``model.decode`` (the step-invariant caching changes only float rounding), for every sampler,
chunking, precision, layout and tiling; the CUDA-graph path's CPU twin; bad input."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import dito_fast
from dito_fast import decode as D
from dito_fast.diffusion import samplers
from dito_fast.eval.metrics import psnr
from dito_fast.eval.report import to_uint8
from dito_fast.decode import ImageNorm, tile_plan
from dito_fast.models.dito import make_noise


def _close_uint8(a, b):
    """uint8 images equal up to float rounding: a pixel may cross a rounding boundary."""
    diff = (a.int() - b.int()).abs()
    return diff.max() <= 1 and (diff > 0).float().mean() < 1e-2


# --------------------------------------------------------------------------------------------
# same ODE, same noise


@pytest.mark.parametrize("sampler, schedule, steps", [
    ("euler", "uniform", 3), ("heun", "edm", 2), ("ab2", "shifted:0.5", 4), ("ab3", "uniform", 4),
    ("dpmpp_2m", "shifted:0.3", 4),
])
def test_fast_decode_matches_model_decode(micro_model, images, sampler, schedule, steps):
    z = micro_model.encode(images)
    ref = micro_model.decode(z, steps=steps, sampler=sampler, schedule=schedule, seed=11)
    out = dito_fast.fast_decode(micro_model, z, steps=steps, sampler=sampler, schedule=schedule, seed=11,
                                output="float")
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32) and out.device.type == "cpu"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    u8 = dito_fast.fast_decode(micro_model, z, steps=steps, sampler=sampler, schedule=schedule, seed=11)
    assert u8.dtype == torch.uint8 and _close_uint8(u8, to_uint8(ref))


def test_auto_is_the_table_setting(micro_model, images):
    z = micro_model.encode(images)
    a = D.AUTO_SETTING
    out = dito_fast.fast_decode(micro_model, z, seed=3, output="float")
    ref = micro_model.decode(z, steps=a["steps"], sampler=a["sampler"], schedule=a["schedule"], seed=3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    # explicit steps / schedule override auto's own
    assert D.resolve_settings("auto", 5) == D.DecodeSettings(a["sampler"], a["schedule"], 5)
    assert D.resolve_settings("auto", None, "edm").schedule == "edm"
    assert D.resolve_settings("euler") == D.DecodeSettings("euler", "uniform", 50)  # the paper's
    assert D.resolve_settings("heun", 3).nfe == 5


def test_chunking_and_seed(micro_model, images):
    z = micro_model.encode(images)
    out = dito_fast.fast_decode(micro_model, z, steps=3, sampler="euler", seed=11, output="float")
    noise = make_noise((3, 3, 32, 32), seed=11)
    for max_batch in (1, 2):
        chunked = dito_fast.fast_decode(micro_model, z, steps=3, sampler="euler", seed=11, max_batch=max_batch,
                                        output="float")
        torch.testing.assert_close(chunked, out, atol=2e-5, rtol=0)  # chunk i gets noise i
        part = micro_model.decode(z[1:2], steps=3, noise=noise[1:2])
        torch.testing.assert_close(chunked[1:2], part, atol=2e-5, rtol=0)
    # seeded: bit-identical; a generator with that seed is the same noise; another seed differs
    assert torch.equal(out, dito_fast.fast_decode(micro_model, z, steps=3, sampler="euler", seed=11, output="float"))
    g = torch.Generator().manual_seed(11)
    assert torch.equal(out, dito_fast.fast_decode(micro_model, z, steps=3, sampler="euler", generator=g,
                                                  output="float"))
    assert not torch.equal(out, dito_fast.fast_decode(micro_model, z, steps=3, sampler="euler", seed=12,
                                                      output="float"))


def test_noise_and_per_sample_seeds_as_model_decode(micro_model, images):
    z = micro_model.encode(images)
    kw = dict(steps=3, sampler="euler", output="float")
    noise = make_noise((3, 3, 32, 32), seed=3)
    _close(dito_fast.fast_decode(micro_model, z, noise=noise, **kw), micro_model.decode(z, steps=3, noise=noise))
    batch = dito_fast.fast_decode(micro_model, z, seed=[4, 5, 6], max_batch=2, **kw)
    for i, s in enumerate([4, 5, 6]):  # an image does not depend on its batch (but for float rounding)
        _close(batch[i:i + 1], dito_fast.fast_decode(micro_model, z[i:i + 1], seed=s, **kw))
    with pytest.raises(ValueError, match="pass noise, seed or generator, not several"):
        dito_fast.fast_decode(micro_model, z, noise=noise, seed=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        dito_fast.fast_decode(micro_model, z, noise=noise[:2])


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_restores_training_mode(micro_model, images):
    micro_model.train()
    dito_fast.fast_decode(micro_model, micro_model.encode(images), steps=1, seed=0)
    assert micro_model.training


def test_concurrent_calls_restore_training_mode_and_agree(micro_model, images):
    # Each call had saved and restored the mode itself: a call starting while another ran saw eval
    # mode and restored that, leaving the model in eval mode after every call had returned.
    import threading

    z = micro_model.encode(images).detach()
    ref = dito_fast.fast_decode(micro_model, z, steps=2, seed=0)
    micro_model.train()
    outs, errors = [], []

    def call():
        try:
            outs.append(dito_fast.fast_decode(micro_model, z, steps=2, seed=0))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(outs) == 4 and all(torch.equal(o, ref) for o in outs)
    assert micro_model.training and D._state(micro_model).calls == 0


def test_non_finite_output_is_reported_without_autocast(micro_model, images, caplog):
    # NaN in a float32 (or float16) model's output had become black pixels without a word
    z = micro_model.encode(images).detach()
    with torch.no_grad():
        micro_model.decoder.conv_out.weight.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="dito_fast.decode"):
        out = dito_fast.fast_decode(micro_model, z, steps=1, seed=0, max_batch=2)
    assert out.shape == (3, 3, 32, 32) and int(out.max()) == 0
    messages = [r.message for r in caplog.records if "non-finite values" in r.message]
    assert len(messages) == 2 and "latents 0..1" in messages[0] and "latents 2..2" in messages[1]


def test_non_square_and_latent_dtype(micro_model):
    z = torch.randn(2, 4, 2, 5, dtype=torch.float64)
    out = dito_fast.fast_decode(micro_model, z, steps=1, sampler="euler", seed=0, output="float")
    assert out.shape == (2, 3, 16, 40)
    # latents of another float dtype are decoded by the float32 model
    torch.testing.assert_close(out, micro_model.decode(z.float(), steps=1, seed=0), atol=2e-5, rtol=0)


def test_uint8_conversion():
    assert torch.equal(to_uint8(torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0])),
                       torch.tensor([0, 64, 128, 255, 255], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# step-invariant caching


def test_cached_velocity_equals_plain_velocity(micro_model):
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(2, 4, 3, 4, generator=g), torch.randn(2, 3, 24, 32, generator=g)
    times = samplers.evaluation_times("heun", samplers.make_timesteps(3))
    assert len(times) == samplers.nfe("heun", 3)
    with torch.no_grad():
        cached = D.CachedVelocity(micro_model, z, times)
        for t in times:
            tt = torch.full((2,), t)
            torch.testing.assert_close(cached(x, tt), micro_model.velocity(x, tt, z), atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="more than the 5 velocity evaluations"):
            cached(x, tt)
        # the cache is consumed in call order; a sampler asking for another time is caught
        with pytest.raises(RuntimeError, match="planned"):
            D.CachedVelocity(micro_model, z, times)(x, torch.full((2,), 0.5))


def test_forward_cached_equals_forward(micro_model):
    dec = micro_model.decoder
    g = torch.Generator().manual_seed(1)
    x, z, t = torch.randn(2, 3, 16, 24, generator=g), torch.randn(2, 4, 2, 3, generator=g), torch.tensor([0.9, 0.2])
    with torch.no_grad():
        cached = dec.forward_cached(x, dec.latent_features(z, 8), dec.time_modulations(t))
        torch.testing.assert_close(cached, dec(x, t, z), atol=1e-5, rtol=1e-5)


def test_channels_last(micro_model, images, monkeypatch):
    z = micro_model.encode(images)
    a = dito_fast.fast_decode(micro_model, z, steps=2, seed=0, output="float")
    b = dito_fast.fast_decode(micro_model, z, steps=2, seed=0, output="float", channels_last=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # "auto" (the default) is channels_last on the CPU
    seen = []
    original = D.CachedVelocity.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["channels_last"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(D.CachedVelocity, "__init__", spy)
    dito_fast.fast_decode(micro_model, z, steps=2, seed=0)
    dito_fast.fast_decode(micro_model, z, steps=2, seed=0, channels_last=False)
    assert seen == [True, False]
    with pytest.raises(ValueError, match="channels_last must be"):
        dito_fast.fast_decode(micro_model, z, steps=2, seed=0, channels_last="yes")


def test_compile_fullgraph(micro_model):
    # fullgraph=True inside fast_decode: a graph break in the UNet (our custom ops included) raises
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eager = dito_fast.fast_decode(micro_model, z, steps=2, sampler="euler", seed=0, output="float")
    compiled = dito_fast.fast_decode(micro_model, z, steps=2, sampler="euler", seed=0, output="float",
                                     compile={"backend": "aot_eager"})
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=0)


def test_progress_counts_network_evaluations(micro_model):
    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    c = Counter()
    dito_fast.fast_decode(micro_model, torch.randn(3, 4, 2, 2), steps=3, sampler="heun", seed=0, max_batch=2,
                          progress=c)
    assert c.n == 2 * samplers.nfe("heun", 3)  # two chunks
    c = Counter()
    dito_fast.fast_decode(micro_model, torch.randn(1, 4, 4, 8), steps=2, sampler="euler", seed=0, tile=32,
                          tile_overlap=8, progress=c)
    assert c.n == 2 * 3  # two steps, three tiles (0, 24, 32 along the width)
    with pytest.raises(TypeError, match="progress must be True, False, None or an object with update"):
        dito_fast.fast_decode(micro_model, torch.randn(1, 4, 2, 2), steps=1, progress="yes")


# --------------------------------------------------------------------------------------------
# half precision and the NaN guard (the CPU twin of the CUDA fp16 path)


def test_bfloat16_close_to_float32(micro_model, images):
    z = micro_model.encode(images)
    a = dito_fast.fast_decode(micro_model, z, steps=3, seed=0, output="float")
    b = dito_fast.fast_decode(micro_model, z, steps=3, seed=0, output="float", dtype=torch.bfloat16)
    assert not torch.equal(a, b)  # really ran in bf16
    assert float(psnr(b, a).min()) > 30


def test_float16_overflow_falls_back_to_float32(micro_model, images, caplog):
    z = micro_model.encode(images)
    with torch.no_grad():  # input conv outputs beyond fp16's 65504: inf, then NaN after GroupNorm
        micro_model.decoder.conv_in.weight.mul_(1e6)
    settings = D.resolve_settings("euler", 2)
    times = samplers.evaluation_times("euler", settings.timesteps())
    noise = make_noise((3, 3, 32, 32), seed=0)
    with torch.inference_mode():
        half = D._sample(micro_model, z, noise, settings, times, autocast_dtype=torch.float16, net=None,
                         channels_last=False, tiles=None)
    assert not torch.isfinite(half).all()  # the guard has something to catch
    fp32 = dito_fast.fast_decode(micro_model, z, steps=2, sampler="euler", seed=0, output="float", max_batch=2)
    assert torch.isfinite(fp32).all()
    with caplog.at_level(logging.WARNING, logger="dito_fast.decode"):
        guarded = dito_fast.fast_decode(micro_model, z, steps=2, sampler="euler", seed=0, output="float",
                                        dtype=torch.float16, max_batch=2)
    assert torch.equal(guarded, fp32)
    assert sum("decoding them again in float32" in r.message for r in caplog.records) == 2  # both chunks

    class Bar:  # tqdm's interface: a redone chunk is more work, so the total grows with the updates
        total, n = 4, 0

        def update(self, k):
            self.n += k

    bar = Bar()
    dito_fast.fast_decode(micro_model, z, steps=2, sampler="euler", seed=0, dtype=torch.float16, max_batch=2,
                          progress=bar)
    assert bar.n == bar.total == 8


# --------------------------------------------------------------------------------------------
# CUDA graphs: the cache and the capture contract, with the eager twin of the capture


def test_graph_cache_lru_with_eager_capture():
    calls = []

    def fn(a, b):
        calls.append(1)
        return a * 2 + b

    cache = D.GraphCache(capacity=2, capture=D.capture_eager)
    x, y = torch.ones(2), torch.arange(2.0)
    torch.testing.assert_close(cache.run("k1", fn, [x, y]), x * 2 + y)
    torch.testing.assert_close(cache.run("k1", fn, [x * 3, y]), x * 6 + y)  # new data, same entry
    assert cache.captures == 1
    cache.run("k2", fn, [x, y])
    cache.run("k1", fn, [x, y])  # k1 most recently used
    cache.run("k3", fn, [x, y])  # evicts k2
    assert list(cache.entries) == ["k1", "k3"] and cache.captures == 3
    out = cache.run("k3", fn, [x, y])
    out += 100  # the returned tensor is a copy, not the static output
    torch.testing.assert_close(cache.run("k3", fn, [x, y]), x * 2 + y)
    with pytest.raises(ValueError, match="capacity"):
        D.GraphCache(capacity=0)
    # graphs read their tensors at the captured addresses: new weights (moved, converted,
    # assigned) drop every entry
    cache.run("k1", fn, [x, y], weights=("w", 1))
    assert list(cache.entries) == ["k1"] and cache.captures == 4
    cache.run("k1", fn, [x, y], weights=("w", 1))
    assert cache.captures == 4


def test_graph_cache_serialises_concurrent_callers():
    # Callers of one entry share its static buffers: without the lock, thread B could copy its
    # inputs in before thread A's replay, and A got B's result. Here A's replay waits until B
    # replays (or for 0.5 s: with the lock B cannot get there before A is done).
    import threading

    a_waits, b_replays, results = threading.Event(), threading.Event(), {}

    def capture(fn, static_inputs):
        replay, out = D.capture_eager(fn, static_inputs)

        def gated():
            if threading.current_thread().name == "A":
                a_waits.set()
                b_replays.wait(0.5)
            elif threading.current_thread().name == "B":
                b_replays.set()
            replay()
        return gated, out

    cache = D.GraphCache(capture=capture)
    cache.run("k", lambda t: t * 2, [torch.zeros(3)])  # captured on this thread

    def call(name, value):
        results[name] = cache.run("k", lambda t: t * 2, [torch.full((3,), value)])
    a = threading.Thread(target=call, args=("A", 1.0), name="A")
    a.start()
    a_waits.wait(5)  # A is inside run(), about to replay
    b = threading.Thread(target=call, args=("B", 5.0), name="B")
    b.start()
    a.join()
    b.join()
    assert torch.equal(results["A"], torch.full((3,), 2.0)) and torch.equal(results["B"], torch.full((3,), 10.0))


def test_graph_cache_key_takes_nested_compile_options():
    assert D._frozen({"options": {"max_autotune": False, "x": [1, 2]}, "mode": None}) == \
        (("mode", None), ("options", (("max_autotune", False), ("x", (1, 2)))))
    hash(D._frozen({"options": {"a": {1, 2}}}))


def test_graph_path_cpu_twin(micro_model, images, monkeypatch):
    """fast_decode's CUDA-graph branch with the capture replaced by its eager twin: the static
    buffers, the cache key and the captured loop (_sample) give the plain path's result."""
    z = micro_model.encode(images)
    plain = dito_fast.fast_decode(micro_model, z, steps=3, seed=1, output="float", max_batch=2)
    monkeypatch.setattr(D, "_use_cuda_graph", lambda device, cuda_graph, tiled: True)
    state = D._state(micro_model)
    state.graphs = D.GraphCache(capture=D.capture_eager)
    graphed = dito_fast.fast_decode(micro_model, z, steps=3, seed=1, output="float", max_batch=2)
    assert torch.equal(graphed, plain)
    assert state.graphs.captures == 2  # chunk shapes (2, ...) and (1, ...)
    dito_fast.fast_decode(micro_model, z, steps=3, seed=1, output="float", max_batch=2)
    assert state.graphs.captures == 2  # replayed, not captured again
    dito_fast.fast_decode(micro_model, z, steps=4, seed=1, output="float", max_batch=2)
    assert state.graphs.captures == 4  # other settings: another key
    micro_model.load_state_dict({k: v.clone() for k, v in micro_model.state_dict().items()}, assign=True)
    again = dito_fast.fast_decode(micro_model, z, steps=3, seed=1, output="float", max_batch=2)
    assert torch.equal(again, plain) and state.graphs.captures == 6  # new weights' addresses: captured anew


# --------------------------------------------------------------------------------------------
# tiles


def test_tile_plan_partitions_and_weights():
    plan = D.tile_plan(200, 136, (96, 64), 32, grid=8)
    cover = torch.zeros(200, 136)
    owned = torch.zeros(200, 136)
    for (ys, xs), (y0, y1, x0, x1), w in zip(plan.slices, plan.owned, plan.weights):
        assert ys.stop - ys.start == 96 and xs.stop - xs.start == 64
        assert all(v % 8 == 0 for v in (ys.start, xs.start, y0, y1, x0, x1))
        cover[ys, xs] += w[0, 0]
        owned[ys.start + y0:ys.start + y1, xs.start + x0:xs.start + x1] += 1
    torch.testing.assert_close(cover * plan.norm[0, 0], torch.ones(200, 136))  # weights sum to one
    assert torch.equal(owned, torch.ones(200, 136))  # owned regions partition the image
    # a tile's weight is ~0 at an edge it shares with a neighbour, 1 at the image border
    w0 = plan.weights[0][0, 0]
    assert w0[0, 0] == 1 and w0[-1, 0] < 0.05 and w0[0, -1] < 0.05


def test_image_norm_with_one_tile_is_group_norm(micro_model):
    dec = micro_model.decoder
    g = torch.Generator().manual_seed(0)
    x, z, t = torch.randn(1, 3, 32, 48, generator=g), torch.randn(1, 4, 4, 6, generator=g), torch.tensor([0.4])
    with torch.no_grad():
        mods, zf = dec.time_modulations(t), dec.latent_features(z, 8)
        norm = D.ImageNorm()
        norm.recording = True
        norm.start_tile((0, 32, 0, 48), 32)
        dec.forward_cached(x, zf, mods, norm)
        norm.freeze()
        norm.recording = False
        norm.start_tile((0, 32, 0, 48), 32)
        torch.testing.assert_close(dec.forward_cached(x, zf, mods, norm), dec.forward_cached(x, zf, mods),
                                   atol=1e-5, rtol=1e-5)


@pytest.fixture
def tile_model(micro_model):
    with torch.no_grad():  # a velocity that matters: the image is not just the clamped noise
        micro_model.decoder.conv_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    return micro_model


def test_tiled_matches_untiled_without_seams(tile_model):
    """512x512 in 256-px tiles: >= 40 dB to the untiled decode and the largest error along tile
    borders no larger than elsewhere; tiles without overlap show their seams."""
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=4, sampler="euler", seed=0, output="float")
    full = dito_fast.fast_decode(tile_model, z, **kw)
    tiled = dito_fast.fast_decode(tile_model, z, tile=256, tile_overlap=96, **kw)
    hard = dito_fast.fast_decode(tile_model, z, tile=256, tile_overlap=0, **kw)  # tiles at 0, 256

    def border_vs_rest(out, edges):
        err = (out - full).abs()[0].amax(0)
        band = torch.zeros(512, 512, dtype=torch.bool)
        for e in edges:  # 4 pixels either side of every inner tile edge
            band[e - 4:e + 4, :] = True
            band[:, e - 4:e + 4] = True
        return float(err[band].max()), float(err[~band].max())

    assert float(psnr(tiled, full)) >= 40
    on_border, elsewhere = border_vs_rest(tiled, [160, 256])  # tiles start at 0, 160, 256
    assert on_border <= elsewhere
    assert float(psnr(hard, full)) < float(psnr(tiled, full)) - 5
    on_border, elsewhere = border_vs_rest(hard, [256])
    assert on_border > elsewhere  # a visible seam


def test_tiled_with_batches_and_two_passes(tile_model):
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    kw = dict(steps=2, sampler="euler", seed=0, output="float", tile=48, tile_overlap=16)
    a = dito_fast.fast_decode(tile_model, z, **kw)
    torch.testing.assert_close(dito_fast.fast_decode(tile_model, z, max_batch=2, **kw), a, atol=2e-5, rtol=0)
    b = dito_fast.fast_decode(tile_model, z, tile_passes=2, **kw)
    assert b.shape == a.shape and torch.isfinite(b).all() and not torch.equal(a, b)
    # a tile as large as the image is the untiled decode
    full = dito_fast.fast_decode(tile_model, z, steps=2, sampler="euler", seed=0, output="float")
    torch.testing.assert_close(dito_fast.fast_decode(tile_model, z, steps=2, sampler="euler", seed=0,
                                                     output="float", tile=96, tile_overlap=16), full)


def test_receptive_field_is_local_and_grows_with_depth(make_micro_config):
    from dito_fast.models.dito import DiTo

    radii = []
    for chans in ((8, 16), (8, 16, 16, 16)):
        torch.manual_seed(0)
        model = DiTo(make_micro_config(**{"decoder.level_channels": chans}))
        torch.nn.init.normal_(model.decoder.conv_out.weight, std=0.05)
        radii.append(D.receptive_field(model.decoder, 4, size=128, threshold=1e-2))
    assert 0 < radii[0] < radii[1] < 64


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("z, exc, msg", [
    (torch.zeros(1, 3, 4, 4), ValueError, r"shape \(B, 4, h, w\)"),
    (torch.zeros(4, 4, 4), ValueError, r"shape \(B, 4, h, w\)"),
    (torch.full((1, 4, 4, 4), float("nan")), ValueError, "NaN"),
    (torch.full((1, 4, 4, 4), float("inf")), ValueError, "inf"),
    (torch.zeros(0, 4, 4, 4), ValueError, "empty batch"),
    (torch.zeros(1, 4, 4, 4, dtype=torch.int64), TypeError, "floating point"),
])
def test_rejects_bad_latents(micro_model, z, exc, msg):
    with pytest.raises(exc, match=msg):
        dito_fast.fast_decode(micro_model, z, steps=1, seed=0)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(steps=2.5), ValueError, "steps must be an integer >= 1"),
    (dict(sampler="dpm++"), ValueError, "unknown sampler 'dpm\\+\\+'"),
    (dict(schedule="cosine"), ValueError, "unknown schedule 'cosine'"),
    (dict(schedule="shifted:abc"), ValueError, "bad schedule"),
    (dict(tile=36), ValueError, "tile must be a positive multiple of 8"),
    (dict(tile=(32, 20)), ValueError, "tile must be a positive multiple of 8"),
    (dict(tile=32, tile_overlap=12), ValueError, "tile_overlap must be a multiple of 8"),
    (dict(tile=16, tile_overlap=16), ValueError, "larger than tile_overlap 16 along the axes it splits"),
    (dict(tile_overlap=12), ValueError, "tile_overlap must be a multiple of 8"),  # checked without a tile too
    (dict(tile_passes=0), ValueError, "tile_passes must be 1 or 2"),
    (dict(max_batch=True), ValueError, "max_batch must be an int >= 1"),
    (dict(cuda_graph=1), ValueError, "cuda_graph must be"),
    (dict(channels_last=1), ValueError, "channels_last must be"),
    (dict(tile="big"), ValueError, "tile must be an int"),
    (dict(tile=32, tile_overlap=8, tile_passes=3), ValueError, "tile_passes must be 1 or 2"),
    (dict(dtype=torch.float64), ValueError, "cannot decode in torch.float64 with a torch.float32 model"),
    (dict(dtype=torch.int8), ValueError, "cannot decode in torch.int8"),
    (dict(dtype="float16"), TypeError, "dtype must be a torch.dtype"),
    (dict(output="png"), ValueError, "output must be one of"),
    (dict(max_batch=0), ValueError, "max_batch must be an int >= 1"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
    (dict(cuda_graph="always"), ValueError, "cuda_graph must be"),
    (dict(device="meta"), ValueError, "the model is on cpu but device=meta"),
    (dict(compile="max"), TypeError, "compile must be a bool or a dict"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
])
def test_rejects_bad_options(micro_model, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        dito_fast.fast_decode(micro_model, torch.zeros(1, 4, 4, 4), **kwargs)


def test_tiles_split_only_the_axes_they_must(micro_model):
    """The overlap only matters along axes a tile splits: a tile as large as the image is the
    untiled decode, and a tile as tall as a wide image splits its columns only (both had been
    refused for a tile smaller than the default 96-px overlap)."""
    z = torch.randn(1, 4, 4, 24, generator=torch.Generator().manual_seed(0))  # a 32x192 image
    kw = dict(steps=1, seed=0, output="float")
    assert torch.equal(dito_fast.fast_decode(micro_model, z[..., :4], tile=64, **kw),
                       dito_fast.fast_decode(micro_model, z[..., :4], **kw))
    torch.testing.assert_close(dito_fast.fast_decode(micro_model, z, tile=(32, 128), **kw),
                               dito_fast.fast_decode(micro_model, z, tile=(64, 128), **kw), rtol=0, atol=0)


def test_image_norm_gathers_image_wide_statistics():
    """tile_passes=2: the statistics ImageNorm gathers over the tiles' owned regions, at every
    layer's own resolution, are the whole image's per-(sample, group) mean and 1/std, and a
    frozen call applies them as GroupNorm -> modulation -> SiLU."""
    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 2, 8, 4, 16, 48
    layers = [torch.randn(B, C, H, W, generator=g) * 2 + 1, torch.randn(B, C, H // 2, W // 2, generator=g) - 3]
    plan = tile_plan(H, W, (16, 24), 8, grid=4)
    assert len(plan.slices) > 2
    norm = ImageNorm()
    norm.recording = True
    for (ys, xs), owned in zip(plan.slices, plan.owned):
        norm.start_tile(owned, ys.stop - ys.start)
        for k, x in enumerate(layers):
            d = 2 ** k
            norm(x[:, :, ys.start // d:ys.stop // d, xs.start // d:xs.stop // d], G)
    norm.freeze()
    for (mean, rstd), x in zip(norm.stats, layers):
        xg = x.double().reshape(B, G, -1)
        torch.testing.assert_close(mean, xg.mean(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rstd, (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-10, atol=0)
    w, b, sc, sh = (torch.randn(*shape, generator=g) for shape in ((C,), (C,), (B, C), (B, C)))
    norm.start_tile((0, H, 0, W), H)
    out = norm(layers[0], G, w, b, sc, sh)
    ref = F.silu(F.group_norm(layers[0], G, w, b, eps=1e-5) * (1 + sc[:, :, None, None]) + sh[:, :, None, None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a float64 input gets float64 arithmetic (it had been rounded to float32)
    norm.start_tile((0, H, 0, W), H)
    out64 = norm(layers[0].double(), G, w.double(), b.double(), sc.double(), sh.double())
    ref64 = F.silu(F.group_norm(layers[0].double(), G, w.double(), b.double(), eps=1e-5)
                   * (1 + sc.double()[:, :, None, None]) + sh.double()[:, :, None, None])
    assert out64.dtype == torch.float64 and (out64 - ref64).abs().max() < 1e-12


def test_decode_restores_each_modules_mode(micro_model):
    micro_model.train()
    micro_model.encoder.eval()
    dito_fast.fast_decode(micro_model, torch.zeros(1, 4, 2, 2), steps=1, seed=0)
    assert micro_model.training and micro_model.decoder.training and not micro_model.encoder.training


def test_receptive_field_leaves_parameter_gradients_alone(micro_model):
    from dito_fast.decode import receptive_field

    receptive_field(micro_model.decoder, 4, size=32)
    assert all(p.grad is None for p in micro_model.parameters())


def test_float64_model_dtype_error_does_not_suggest_half_precision(micro_model):
    with pytest.raises(ValueError, match=r"use dtype=None \(half precision runs a float32 model"):
        dito_fast.fast_decode(micro_model.double(), torch.zeros(1, 4, 2, 2), steps=1, dtype=torch.float16)
