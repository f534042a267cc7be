"""Tests for dito_fast/models: sizes of the paper presets, shapes, the latent normalisation,
save/load, seeded decoding and input validation."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

import dito_fast
from dito_fast.eval.report import to_uint8
from dito_fast.config import PRESETS, apply_overrides, get_preset, resolve_run_config
from dito_fast.models.dito import (CONFIG_NAME, WEIGHTS_NAME, DiTo, count_parameters, decoder_gflops,
                                   make_noise)
from dito_fast.models.unet import UNetDecoder


# --------------------------------------------------------------------------------------------
# parameter counts and FLOPs of the real presets (built on the meta device: no memory)


def _meta_model(name: str) -> DiTo:
    with torch.device("meta"):
        return DiTo(get_preset(name))


@pytest.mark.parametrize("name, decoder_m", [("dito-B", 162.78), ("dito-L", 338.52), ("dito-XL", 620.94)])
def test_paper_parameter_counts(name, decoder_m):
    m = _meta_model(name)
    assert count_parameters(m.encoder) / 1e6 == pytest.approx(34.15, rel=1e-3)
    assert count_parameters(m.decoder) / 1e6 == pytest.approx(decoder_m, rel=1e-3)


def test_f16c8_latent_shape():
    cfg = get_preset("dito-B-f16c8")
    m = _meta_model("dito-B-f16c8")
    assert m.latent_channels == 8 and m.latent_factor == 16 and m.downsample_factor == 16
    with torch.device("meta"):
        z = m._encode(torch.empty(2, 3, 256, 192))
    assert tuple(z.shape) == (2, 8, 16, 12)
    # the decoder (4 levels, factor 8) accepts the 16x-upsampled latent at full resolution
    with torch.device("meta"):
        out = m.decoder(torch.empty(2, 3, 256, 192), torch.empty(2), z)
    assert tuple(out.shape) == (2, 3, 256, 192)
    assert cfg.encoder.downsample_factor == 16


def test_f16c8_micro_encode_decode_shapes(make_micro_config):
    # a narrow model with the f16c8 layout runs for real
    cfg = make_micro_config(**{"encoder.channel_mult": (1, 2, 2, 4, 4), "encoder.latent_channels": 8})
    torch.manual_seed(0)
    m = DiTo(cfg).eval()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = m.encode(x)
    assert z.shape == (2, 8, 2, 3)
    assert m.decode(z, steps=1, seed=0).shape == (2, 3, 32, 48)


def test_decoder_gflops_dito_b():
    assert decoder_gflops(get_preset("dito-B"), 256) == pytest.approx(1590, rel=0.01)


def test_decoder_gflops_scales_with_pixels():
    # a fully convolutional decoder: FLOPs proportional to the number of pixels
    cfg = get_preset("dito-B")
    assert decoder_gflops(cfg, 512) == pytest.approx(4 * decoder_gflops(cfg, 256), rel=1e-3)


def test_presets_build_on_meta():
    for name in PRESETS:
        m = _meta_model(name)
        assert count_parameters(m) > 0


# --------------------------------------------------------------------------------------------
# shapes, latent normalisation, decode range


def test_encode_shape_and_latent_normalisation(micro_model, images):
    z = micro_model.encode(images)
    assert z.shape == (3, 4, 4, 4) and z.dtype == images.dtype
    zd = z.double().flatten(1)
    # affine-free LayerNorm over (C, H, W) per sample: zero mean, unit (biased) variance
    assert torch.allclose(zd.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(zd.var(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-3)
    # non-square input
    assert micro_model.encode(torch.zeros(1, 3, 16, 40)).shape == (1, 4, 2, 5)


def test_latent_norm_has_no_parameters(micro_model):
    # only the encoder and the decoder hold parameters (the latent LayerNorm has no affine)
    names = {n.split(".")[0] for n, _ in micro_model.named_parameters()}
    assert names == {"encoder", "decoder"}


def test_encode_matches_module_api(micro_model, images):
    with torch.inference_mode():
        z_api = dito_fast.encode(micro_model, images)
    assert torch.equal(z_api, micro_model.encode(images))
    # an ordinary tensor (it had been an inference tensor): a latent model can train on it
    z = dito_fast.encode(micro_model, images)
    assert not z.is_inference() and not z.requires_grad and torch.equal(z, z_api)
    w = torch.ones((), requires_grad=True)
    (z * w).sum().backward()
    z.mul_(2)


def test_decode_shape_and_range(micro_model, images):
    z = micro_model.encode(images)
    for sampler in ("euler", "heun"):
        x = micro_model.decode(z, steps=3, sampler=sampler, seed=0)
        assert x.shape == images.shape and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
    # a model whose velocity is huge still returns images clamped to [-1, 1]
    with torch.no_grad():
        micro_model.decoder.conv_out.bias.fill_(50.0)
    x = micro_model.decode(z, steps=2, seed=0)
    assert x.min() >= -1 and x.max() <= 1 and (x == -1).all()  # dt < 0: x_0 = noise - 50 * 1


def test_decode_with_zero_velocity_returns_noise(micro_config):
    # the default init zeroes the output conv: the velocity is 0 and decoding returns the noise
    model = DiTo(micro_config).eval()
    z = torch.randn(2, 4, 4, 4)
    noise = 0.5 * torch.randn(2, 3, 32, 32).clamp(-1.9, 1.9)
    assert torch.equal(model.decode(z, steps=4, noise=noise), noise)


def test_reconstruct_equals_encode_then_decode(micro_model, images):
    a = micro_model.reconstruct(images, steps=2, seed=3)
    b = micro_model.decode(micro_model.encode(images), steps=2, seed=3)
    assert torch.equal(a, b)


def test_forward_returns_per_sample_loss(micro_model, images):
    micro_model.train()
    loss = micro_model(images, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    # encoder and decoder are trained jointly: both receive gradients through the FM loss
    assert micro_model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert micro_model.decoder.conv_in.weight.grad.abs().sum() > 0


def test_unet_time_conditioning_matters(micro_model):
    dec = micro_model.decoder
    x = torch.randn(2, 3, 32, 32)
    z = torch.randn(2, 4, 4, 4)
    a = dec(x, torch.tensor([0.1, 0.1]), z)
    b = dec(x, torch.tensor([0.9, 0.9]), z)
    c = dec(x, torch.tensor([0.1, 0.1]), torch.randn(2, 4, 4, 4))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert isinstance(dec, UNetDecoder) and dec.downsample_factor == 8


# --------------------------------------------------------------------------------------------
# seeded decoding and fast_decode


def test_same_seed_bit_identical_different_seeds_differ(micro_model, images):
    z = micro_model.encode(images)
    a = micro_model.decode(z, steps=3, seed=7)
    b = micro_model.decode(z, steps=3, seed=7)
    c = micro_model.decode(z, steps=3, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    # a generator seeded the same way is the same noise source
    d = micro_model.decode(z, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, d)


def test_make_noise_seed_and_generator_exclusive():
    with pytest.raises(ValueError, match="either seed or generator"):
        make_noise((1, 3, 8, 8), seed=0, generator=torch.Generator())
    assert torch.equal(make_noise((2, 3), seed=5), make_noise((2, 3), seed=5))


def test_one_seed_per_sample_makes_an_image_independent_of_its_batch(micro_model, images):
    noise = make_noise((3, 3, 32, 32), seed=[5, 6, 7])
    for i, s in enumerate([5, 6, 7]):  # bit for bit, and seed=[s] for a batch of one is seed=s
        assert torch.equal(noise[i:i + 1], make_noise((1, 3, 32, 32), seed=s))
        assert torch.equal(noise[i:i + 1], make_noise((1, 3, 32, 32), seed=[s]))
    z = micro_model.encode(images)
    batch = micro_model.decode(z, steps=3, seed=[5, 6, 7])
    for i, s in enumerate([5, 6, 7]):  # the same image up to the convolutions' rounding at another batch size
        torch.testing.assert_close(batch[i:i + 1], micro_model.decode(z[i:i + 1], steps=3, seed=s), atol=2e-5, rtol=0)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    assert torch.equal(micro_model.decode(z, steps=3, generator=gens), batch)
    assert not torch.equal(batch, micro_model.decode(z, steps=3, seed=5))  # one seed: one draw for the batch


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"seed": "7"}, TypeError, "seed must be an int"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"seed": 2**64}, TypeError, "seed must be an int"),
    ({"seed": [1, 2]}, ValueError, "needs 3 seeds, got 2"),
    ({"seed": [1, 2.5, 3]}, TypeError, r"seed\[1\] must be an int"),
    ({"generator": 0}, TypeError, "for an int, pass seed="),
    ({"generator": [torch.Generator()]}, ValueError, "needs 3 generators, got 1"),
    ({"generator": [torch.Generator(), 1, torch.Generator()]}, TypeError, r"generator\[1\] must be"),
])
def test_make_noise_names_bad_seeds_and_generators(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        make_noise((3, 3, 8, 8), **kwargs)


def test_model_keeps_its_own_config_and_presets_are_read_only(micro_config):
    model = DiTo(micro_config)
    micro_config.flow.objective = "x0"  # the caller's object, edited after construction
    assert model.config.flow.objective == "velocity"
    preset = dito_fast.presets["dito-tiny"]
    preset.decoder.num_res_blocks = 5
    assert dito_fast.presets["dito-tiny"].decoder.num_res_blocks == 1
    assert get_preset("dito-tiny").decoder.num_res_blocks == 1
    assert "dito-B" in PRESETS and list(PRESETS) == list(dito_fast.presets) and len(PRESETS) >= 5
    with pytest.raises(TypeError):
        PRESETS["mine"] = preset  # noqa  (a read-only mapping)


# --------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


def test_save_load_round_trip(micro_model, images, tmp_path):
    micro_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_NAME).is_file() and (tmp_path / "m" / WEIGHTS_NAME).is_file()
    loaded = dito_fast.load(tmp_path / "m").eval()
    assert loaded.config == micro_model.config
    z = micro_model.encode(images)
    assert torch.equal(loaded.encode(images), z)
    assert torch.equal(loaded.decode(z, steps=3, seed=4), micro_model.decode(z, steps=3, seed=4))
    for (n1, p1), (n2, p2) in zip(micro_model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_from_pretrained_leaves_the_global_rng_alone(micro_model, tmp_path):
    """Loading builds the model without a random init (meta device, then the saved tensors): it
    draws nothing from torch's global RNG, so a caller's seeded noise is the same with or without
    a load in between, and the parameters are trainable tensors of their own."""
    micro_model.save_pretrained(tmp_path)
    before = torch.get_rng_state()
    loaded = DiTo.from_pretrained(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.requires_grad and p.is_contiguous() and p.device.type == "cpu" for p in loaded.parameters())
    loaded.train()(torch.zeros(1, 3, 32, 32), torch.Generator().manual_seed(0)).sum().backward()
    assert all(p.grad is not None for p in loaded.encoder.parameters())


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        DiTo.from_pretrained(tmp_path / "nope")


def test_from_pretrained_device_dtype_and_mode(micro_model, images, tmp_path):
    micro_model.train().save_pretrained(tmp_path / "f32")
    loaded = DiTo.from_pretrained(tmp_path / "f32", map_location=torch.device("cpu"))
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32  # eval, like diffusers
    assert next(DiTo.from_pretrained(tmp_path / "f32", dtype=torch.float64).parameters()).dtype == torch.float64
    DiTo(micro_model.config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = dito_fast.load(tmp_path / "bf16")  # the saved dtype by default
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.encode(images.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="map_location: 'gpu0' is not a device"):
        DiTo.from_pretrained(tmp_path / "f32", map_location="gpu0")
    with pytest.raises(ValueError, match="without its weights"):
        DiTo.from_pretrained(tmp_path / "f32", map_location="meta")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        DiTo.from_pretrained(tmp_path / "f32", dtype=torch.int32)


def test_from_pretrained_names_what_it_was_given_instead(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path / "run" / "model")
    with pytest.raises(NotADirectoryError, match="is a file; from_pretrained takes the directory"):
        DiTo.from_pretrained(tmp_path / "run" / "model" / WEIGHTS_NAME)
    # a training run's directory: its run config.json, its model exported under model/
    (tmp_path / "run" / CONFIG_NAME).write_text(json.dumps({"model": {}, "data": {}, "train": {}}))
    with pytest.raises(FileNotFoundError, match="training run's directory; its model is exported to"):
        DiTo.from_pretrained(tmp_path / "run")
    (tmp_path / "run" / WEIGHTS_NAME).write_bytes((tmp_path / "run" / "model" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="training run's config"):
        DiTo.from_pretrained(tmp_path / "run")
    for bad in ('"dito-tiny"', "null", "[1, 2]"):
        (tmp_path / "run" / "model" / CONFIG_NAME).write_text(bad)
        with pytest.raises(ValueError, match="expected a JSON object of model settings"):
            DiTo.from_pretrained(tmp_path / "run" / "model")


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_from_pretrained_missing_file(micro_model, tmp_path, missing):
    micro_model.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        DiTo.from_pretrained(tmp_path)


def test_from_pretrained_corrupt_weights(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weights") as e:
        DiTo.from_pretrained(tmp_path)
    assert WEIGHTS_NAME in str(e.value)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read weights"):
        DiTo.from_pretrained(tmp_path)


def test_from_pretrained_bad_config(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="invalid model config"):
        DiTo.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"encoder": {"bogus_key": 1}}))
    with pytest.raises(ValueError, match="bogus_key"):
        DiTo.from_pretrained(tmp_path)


def test_from_pretrained_weights_not_matching_config_keys(micro_model, tmp_path):
    # one more residual block per level: the saved weights lack those keys
    micro_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["decoder"]["num_res_blocks"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match config") as e:
        DiTo.from_pretrained(tmp_path)
    assert "missing" in str(e.value) and WEIGHTS_NAME in str(e.value)


def test_from_pretrained_weights_not_matching_config_shapes(micro_model, tmp_path):
    # same keys, different widths: the error must still name the files and the mismatch
    micro_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["decoder"]["level_channels"] = [16, 16, 16, 16]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match config") as e:
        DiTo.from_pretrained(tmp_path)
    assert WEIGHTS_NAME in str(e.value) and "size mismatch" in str(e.value)


def test_from_pretrained_refuses_weights_and_config_of_two_saves(micro_model, tmp_path):
    """A folder whose model.safetensors comes from another save than its config.json (written over
    while a service reloads it, or a save stopped between its two files) is refused, even where
    the shapes agree (a setting that changes no shape would decode wrong images); weights saved
    without the digest (older saves, other tools) still load."""
    from safetensors.torch import save_file

    from dito_fast.models._pretrained import SAVED_CONFIG_KEY

    micro_model.save_pretrained(tmp_path / "a")
    other = copy.deepcopy(micro_model)
    other.config = dataclasses.replace(other.config, flow=dataclasses.replace(other.config.flow, sigma_min=1e-3))
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_NAME).replace(tmp_path / "a" / WEIGHTS_NAME)  # b's weights, a's config
    with pytest.raises(ValueError, match=r"is not the config .* was saved with: flow.sigma_min \(0.001 -> 1e-05\)") as e:
        DiTo.from_pretrained(tmp_path / "a")
    assert CONFIG_NAME in str(e.value) and WEIGHTS_NAME in str(e.value)
    state = {k: v.contiguous() for k, v in micro_model.state_dict().items()}
    save_file(state, tmp_path / "a" / WEIGHTS_NAME)  # no metadata
    assert DiTo.from_pretrained(tmp_path / "a").config == micro_model.config
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    saved["decoder"]["timescale"] = 2.0  # not a setting of the decoder: named as one config lacks it
    save_file(state, tmp_path / "a" / WEIGHTS_NAME, metadata={SAVED_CONFIG_KEY: json.dumps(saved)})
    with pytest.raises(ValueError, match=r"decoder.timescale \(2.0 -> \"absent\"\)"):
        DiTo.from_pretrained(tmp_path / "a")


def test_from_pretrained_names_integer_weights(micro_model, tmp_path):
    from safetensors.torch import save_file

    micro_model.save_pretrained(tmp_path)
    state = {k: v.to(torch.int32).contiguous() for k, v in micro_model.state_dict().items()}
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="dtype mismatch") as e:
        DiTo.from_pretrained(tmp_path, dtype=torch.float32)
    assert str(tmp_path / WEIGHTS_NAME) in str(e.value) and "torch.int32" in str(e.value)


def test_from_pretrained_under_inference_mode_gives_trainable_parameters(micro_model, images, tmp_path):
    """A service that loads at start-up under inference_mode still gets normal parameters: encode
    with autograd on (and training) work afterwards outside it."""
    micro_model.save_pretrained(tmp_path)
    with torch.inference_mode():
        loaded = DiTo.from_pretrained(tmp_path)
    assert not any(p.is_inference() for p in loaded.parameters())
    assert all(p.requires_grad for p in loaded.parameters())
    loaded.encode(images).sum().backward()
    assert loaded.encoder.conv_in.weight.grad is not None


# --------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("x, exc, msg", [
    (torch.zeros(3, 32, 32), ValueError, r"shape \(B, 3, H, W\)"),
    (torch.zeros(1, 4, 32, 32), ValueError, r"shape \(B, 3, H, W\)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating"),
    (torch.full((1, 3, 32, 32), 2.0), ValueError, r"in \[-1, 1\]"),
    (torch.full((1, 3, 32, 32), -255.0), ValueError, r"in \[-1, 1\]"),
    (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
    (torch.full((1, 3, 32, 32), float("inf")), ValueError, "inf"),
    (torch.zeros(1, 3, 30, 32), ValueError, "multiples of 8"),
    (torch.zeros(1, 3, 32, 36), ValueError, "multiples of 8"),
    (torch.zeros(0, 3, 32, 32), ValueError, "empty batch"),
    (torch.zeros(1, 3, 0, 32), ValueError, "positive multiples of 8"),
    (torch.zeros(1, 3, 32, 32, device="meta"), ValueError, "meta device"),
    (torch.zeros(1, 3, 32, 32).numpy(), TypeError, "torch.Tensor"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.float16), TypeError, "images are torch.float16 but the model's weights"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.float64), TypeError, "images are torch.float64 but the model's weights"),
])
def test_encode_rejects_bad_images(micro_model, x, exc, msg):
    with pytest.raises(exc, match=msg):
        micro_model.encode(x)


def test_dtype_mismatch_is_fine_under_autocast_and_named_outside(micro_model, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = micro_model.encode(images.bfloat16())
    assert z.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="images are torch.bfloat16 but the model's weights are torch.float32"):
        micro_model.encode(images.bfloat16())  # encode keeps x's dtype (a gradient path): no silent conversion
    # decode (float32 images whatever its input) takes latents of any floating dtype, as fast_decode does
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        out = micro_model.decode(z.to(dtype), steps=2, seed=0)
        assert out.dtype == torch.float32
        assert torch.equal(out, micro_model.decode(z.to(dtype).float(), steps=2, seed=0))


def test_encode_accepts_slack_at_range_edge(micro_model):
    micro_model.encode(torch.full((1, 3, 32, 32), 1.0005))  # within the documented 1e-3 slack


def test_out_of_range_hint_fits_the_values(micro_model):
    with pytest.raises(ValueError, match=r"clamp them with x.clamp\(-1, 1\)"):  # a resize's overshoot
        micro_model.encode(torch.full((1, 3, 32, 32), 1.21))
    with pytest.raises(ValueError, match="convert uint8 images"):  # 0..255 as floats
        micro_model.encode(torch.full((1, 3, 32, 32), 200.0))


def test_decode_warns_of_non_finite_output(micro_model, images, caplog):
    z = micro_model.encode(images)
    with torch.no_grad():
        micro_model.decoder.conv_out.bias.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="dito_fast.models.dito"):
        micro_model.decode(z, steps=1, seed=0)
    assert any("non-finite values" in r.message for r in caplog.records)


@pytest.mark.parametrize("z, kwargs, exc, msg", [
    (torch.zeros(1, 3, 4, 4), {}, ValueError, r"shape \(B, 4, h, w\)"),
    (torch.zeros(4, 4, 4), {}, ValueError, r"shape \(B, 4, h, w\)"),
    (torch.full((1, 4, 4, 4), float("nan")), {}, ValueError, "NaN"),
    (torch.zeros(1, 4, 4, 4, dtype=torch.int64), {}, TypeError, "floating"),
    (torch.zeros(0, 4, 4, 4), {}, ValueError, "empty batch"),
    (torch.zeros(1, 4, 0, 4), {}, ValueError, "height and width of at least 1"),
    (torch.zeros(2, 4, 0, 0), {}, ValueError, "height and width of at least 1"),
    (torch.zeros(1, 4, 4, 4, device="meta"), {}, ValueError, "latents are on the meta device"),
    (torch.zeros(1, 4, 4, 4), {"steps": 0}, ValueError, "steps must be an integer >= 1"),
    (torch.zeros(1, 4, 4, 4), {"steps": 2.5}, ValueError, "steps must be an integer >= 1"),
    (torch.zeros(1, 4, 4, 4), {"sampler": "rk4"}, ValueError, "unknown sampler 'rk4'"),
    (torch.zeros(1, 4, 4, 4), {"schedule": "cosine"}, ValueError, "unknown schedule 'cosine'"),
    (torch.zeros(1, 4, 4, 4), {"noise": torch.zeros(1, 3, 16, 16)}, ValueError, "noise must have shape"),
    (torch.zeros(1, 4, 4, 4), {"noise": torch.zeros(1, 3, 32, 32, dtype=torch.int64)}, TypeError, "noise must be a floating"),
    (torch.zeros(1, 4, 4, 4), {"noise": torch.full((1, 3, 32, 32), float("nan"))}, ValueError, "noise contains NaN"),
    (torch.zeros(1, 4, 4, 4), {"noise": torch.zeros(1, 3, 32, 32, device="meta")}, ValueError, "noise is on meta"),
])
def test_decode_rejects_bad_inputs(micro_model, z, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        micro_model.decode(z, **kwargs)


def test_decode_keeps_the_ode_state_in_float32_under_autocast(micro_model, images):
    """bf16 latents (what encode gives under autocast) decode through a float32 ODE state: the
    result is float32 and the same as decoding the float32 latents under autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = micro_model.encode(images)
        assert z16.dtype == torch.bfloat16
        a = micro_model.decode(z16, steps=4, seed=0)
        b = micro_model.decode(z16.float(), steps=4, seed=0)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = micro_model.decode(z16.float(), steps=4, seed=0)
    assert (a - ref).abs().max() < 0.05  # the network in bf16, not the state


def test_decode_checks_the_image_size_against_the_unet(make_micro_config):
    """An encoder factor (4) below the UNet's (8): latents must give multiples of 8 pixels."""
    model = DiTo(make_micro_config(**{"encoder.channel_mult": (1, 2, 2)})).eval()
    assert (model.latent_factor, model.downsample_factor) == (4, 8)
    with pytest.raises(ValueError, match="latents of 3x3 give 12x12 images; the decoder needs multiples of 8"):
        model.decode(torch.zeros(1, 4, 3, 3), steps=1)
    assert model.decode(torch.zeros(1, 4, 4, 2), steps=1, seed=0).shape == (1, 3, 16, 8)


def test_forward_checks_images(micro_model):
    with pytest.raises(ValueError, match="NaN"):
        micro_model(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        micro_model(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="multiples of 8"):
        micro_model(torch.zeros(1, 3, 20, 16))


def test_velocity_takes_a_scalar_time_and_names_bad_shapes(micro_model):
    x_t, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        v = micro_model.velocity(x_t, torch.tensor([0.5, 0.5]), z)
        torch.testing.assert_close(micro_model.velocity(x_t, 0.5, z), v, rtol=0, atol=0)
        torch.testing.assert_close(micro_model.velocity(x_t, torch.tensor(0.5), z), v, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
            micro_model.velocity(x_t, torch.tensor([0.5, 0.5, 0.5]), z)
        with pytest.raises(ValueError, match="z of 4x2 gives 32x16 images, but x_t is 32x32"):
            micro_model.velocity(x_t, 0.5, z[..., :2])
        with pytest.raises(ValueError, match=r"z must have shape \(2, 4, h, w\)"):
            micro_model.velocity(x_t, 0.5, z[:1])
        m64 = copy.deepcopy(micro_model).double()  # a Python float is not rounded to float32 there
        t64 = torch.full((2,), 0.3, dtype=torch.float64)
        x64, z64 = x_t.double(), z.double()
        torch.testing.assert_close(m64.velocity(x64, 0.3, z64), m64.velocity(x64, t64, z64), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, msg", [
    ({"flow": {"noise_sync_time_rule": "abve"}}, "noise_sync_time_rule must be above|independent"),
    ({"flow": {"noise_sync_prob": 5.0}}, r"noise_sync_prob must be in \[0, 1\]"),
    ({"flow": {"objective": "eps"}}, "objective must be velocity|epsilon|x0"),
    ({"flow": {"sigma_min": 1.5}}, r"sigma_min must be in \[0, 1\)"),
    ({"decoder.norm_groups": 7}, "must be divisible by norm_groups=7"),
])
def test_model_config_is_validated_at_construction(overrides, msg, micro_model, tmp_path):
    with pytest.raises(ValueError, match=msg):
        DiTo.from_preset("dito-tiny", **overrides)
    micro_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key, value in overrides.items():
        for k, v in (value.items() if isinstance(value, dict) else [(key.split(".")[1], value)]):
            cfg[key.split(".")[0]][k] = v
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"invalid model config {tmp_path / CONFIG_NAME}: .*{msg}"):
        DiTo.from_pretrained(tmp_path)


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError) as e:
        DiTo.from_preset("dito-XXL")
    msg = str(e.value)
    assert "dito-XXL" in msg and all(name in msg for name in PRESETS)


def test_from_preset_overrides():
    m = DiTo.from_preset("dito-tiny", **{"decoder.num_res_blocks": 2, "flow": {"noise_sync_prob": 0.1}})
    assert m.config.decoder.num_res_blocks == 2 and m.config.flow.noise_sync_prob == 0.1
    with pytest.raises(KeyError, match="unknown config key"):
        DiTo.from_preset("dito-tiny", **{"decoder.bogus": 1})


def test_config_override_errors():
    cfg = get_preset("dito-tiny")
    with pytest.raises(KeyError, match="'nonsense'"):
        apply_overrides(cfg, {"nonsense": 1})
    with pytest.raises(KeyError, match=r"'decoder.bogus' \(DecoderConfig has"):  # the full path is named
        apply_overrides(cfg, {"decoder.bogus": 1})
    with pytest.raises(KeyError, match="has no sub-fields"):
        apply_overrides(cfg, {"name.x": 1})
    with pytest.raises(ValueError, match=r"'decoder.num_res_blocks': cannot use 'three' \(expected int\)"):
        apply_overrides(cfg, {"decoder.num_res_blocks": "three"})
    with pytest.raises(ValueError, match="num_res_blocks"):
        apply_overrides(cfg, {"decoder.num_res_blocks": 2.5})
    with pytest.raises(ValueError, match="mid_attention"):
        apply_overrides(cfg, {"encoder.mid_attention": "maybe"})
    with pytest.raises(ValueError, match="level_channels"):
        apply_overrides(cfg, {"decoder.level_channels": "8,x,16"})
    with pytest.raises(TypeError, match="expects a mapping"):
        apply_overrides(cfg, {"decoder": 3})


def test_config_override_coercion():
    cfg = apply_overrides(get_preset("dito-tiny"), {
        "decoder.level_channels": "24,32,32,32", "encoder.mid_attention": "false",
        "flow.sigma_min": "1e-4", "decoder.num_res_blocks": "2"})
    assert cfg.decoder.level_channels == (24, 32, 32, 32)
    assert cfg.encoder.mid_attention is False
    assert cfg.flow.sigma_min == 1e-4 and cfg.decoder.num_res_blocks == 2
    # the preset registry itself is not modified by overrides
    assert get_preset("dito-tiny").decoder.level_channels == (16, 32, 64, 64)
    # Python's float spellings on the command line
    assert apply_overrides(get_preset("dito-tiny"), {"flow.sigma_min": ".5"}).flow.sigma_min == 0.5


def test_config_file_must_hold_sections(tmp_path):
    for text in ('["model"]', '{"model": "dito-tiny"}', '{"model": null}'):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match="must hold a JSON object of sections"):
            resolve_run_config("dito-tiny", config_file=str(tmp_path / "c.json"))


@pytest.mark.parametrize("key, value, msg", [
    ("train.lr", "NaN", "train.lr must be a finite number > 0"),
    ("train.lr", "-1e-4", "train.lr must be a finite number > 0"),
    ("train.betas", "0.9,1.0", r"train.betas must be two numbers in \[0, 1\)"),
    ("train.betas", "0.9", r"train.betas must be two numbers in \[0, 1\), got \(0.9,\)"),
    ("train.weight_decay", "-0.1", "train.weight_decay must be a finite number >= 0"),
    ("train.lr_min_ratio", "-1", r"train.lr_min_ratio must be in \[0, 1\]"),
    ("train.lr_min_ratio", "3", r"train.lr_min_ratio must be in \[0, 1\]"),
    ("train.max_grad_norm", "NaN", "train.max_grad_norm must be finite"),
    ("train.max_minutes", "-5", "train.max_minutes must be a finite number >= 0"),
    ("train.log_every_steps", "0", "train.log_every_steps must be >= 1"),
    ("train.val_sample_steps", "0", "train.val_sample_steps must be >= 1"),
    ("train.warmup_steps", "-1", "train.warmup_steps must be >= 0"),
    ("train.val_images", "-2", "train.val_images must be >= 0"),
    ("train.keep_checkpoints", "-1", "train.keep_checkpoints must be >= 0"),
    ("train.max_bad_steps", "0", "train.max_bad_steps must be >= 1"),
    ("train.threads", "-2", "train.threads must be >= 0"),
    ("train.dist_timeout_minutes", "-1", "train.dist_timeout_minutes must be a finite number >= 0"),
    ("train.steps", "true", r"'train.steps': cannot use True \(expected int\)"),
    ("train.seed", "-1", "train.seed must be >= 0"),
    ("data.num_synthetic_images", "0", "data.num_synthetic_images must be >= 1"),
    # architectures that had been accepted and failed later, naming neither key nor cause
    ("model.encoder.channel_mult", "[]", "encoder.channel_mult must be a non-empty list"),
    ("model.decoder.level_channels", "[]", "decoder.level_channels must be a non-empty list"),
    ("model.decoder.norm_groups", "0", "decoder.norm_groups must be >= 1"),  # had been a ZeroDivisionError
    ("model.decoder.time_freq_dim", "63", "decoder.time_freq_dim must be even"),
    ("model.encoder.latent_channels", "0", "encoder.latent_channels must be >= 1"),
    ("model.encoder.in_channels", "1", "must be 3"),
    ("model.latent_norm_eps", "inf", "latent_norm_eps must be finite"),
    ("model.flow.time_logit_mean", "NaN", "flow.time_logit_mean must be finite"),
    # types: a string field, a bool field, a tuple element
    ("data.source", 123, r"'data.source': cannot use 123 \(expected str\)"),
    ("data.hflip", 2, r"'data.hflip': cannot use 2 \(expected bool\)"),
    ("model.decoder.level_channels", "32.7,64,64,64", r"'model.decoder.level_channels\[0\]': cannot use 32.7"),
])
def test_resolve_run_config_refuses_bad_training_values(key, value, msg):
    # each was accepted before: a ZeroDivisionError after step 1 (log_every_steps=0), gradient
    # ascent (lr_min_ratio=-1), clipping silently off (max_grad_norm=nan), an IndexError (one beta)...
    with pytest.raises(ValueError, match=msg):
        resolve_run_config("dito-tiny", overrides={key: value})


def test_resolve_run_config_errors(tmp_path):
    with pytest.raises(ValueError, match="image_size=36 must be a multiple of 8"):
        resolve_run_config("dito-tiny", overrides={"data.image_size": 36})
    with pytest.raises(ValueError, match="multiple of 16"):
        resolve_run_config("dito-B-f16c8", overrides={"data.image_size": 72})
    with pytest.raises(ValueError, match="flow.objective"):
        resolve_run_config("dito-tiny", overrides={"model.flow.objective": "score"})
    with pytest.raises(ValueError, match="noise_sync_prob"):
        resolve_run_config("dito-tiny", overrides={"model.flow.noise_sync_prob": 1.5})
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        resolve_run_config("dito-tiny", overrides={"model.decoder.level_channels": (12, 16, 16, 16)})
    with pytest.raises(ValueError, match="ema_decay"):
        resolve_run_config("dito-tiny", overrides={"train.ema_decay": 1.0})
    with pytest.raises(KeyError):
        resolve_run_config("dito-nope")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        resolve_run_config("dito-tiny", config_file=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_run_config("dito-tiny", config_file=str(tmp_path / "bad.json"))


def test_resolve_run_config_layering(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"name": "other", "decoder": {"num_res_blocks": 2}},
                                                 "train": {"lr": 0.5, "steps": 7}}))
    cfg = resolve_run_config("dito-tiny", str(tmp_path / "c.json"), {"train.lr": "0.25"})
    assert cfg.model.name == "dito-tiny"  # the preset's name wins over the file's
    assert cfg.model.decoder.num_res_blocks == 2 and cfg.train.steps == 7
    assert cfg.train.lr == 0.25  # explicit overrides win over the file


def test_model_name_of_a_preset_selects_its_architecture(tmp_path):
    """A config file or override naming a preset (and no preset argument) gets that preset's
    architecture, not dito-B's defaults under another name; other names stay labels."""
    tiny = get_preset("dito-tiny")
    (tmp_path / "c.json").write_text(json.dumps({"model": {"name": "dito-tiny", "decoder": {"num_res_blocks": 2}}}))
    cfg = resolve_run_config(None, str(tmp_path / "c.json"))
    assert cfg.model.name == "dito-tiny" and cfg.model.decoder.num_res_blocks == 2
    assert cfg.model.decoder.level_channels == tiny.decoder.level_channels and cfg.model.encoder == tiny.encoder
    cfg = resolve_run_config(None, None, {"model.name": "dito-tiny"})
    assert cfg.model == tiny
    cfg = resolve_run_config(None, str(tmp_path / "c.json"), {"model": {"name": "dito-S"}})  # the override wins
    assert cfg.model.name == "dito-S" and cfg.model.decoder.level_channels == get_preset("dito-S").decoder.level_channels
    cfg = resolve_run_config(None, None, {"model.name": "my-tokenizer"})  # not a preset: a label on the defaults
    assert cfg.model.name == "my-tokenizer" and cfg.model.decoder == get_preset("dito-B").decoder
    with pytest.raises(ValueError, match="names another preset than dito-tiny"):
        resolve_run_config("dito-tiny", None, {"model.name": "dito-S"})
    assert resolve_run_config("dito-tiny", None, {"model.name": "dito-tiny"}).model == tiny
    # the other model's preset names are no labels: a tokenizer called DiT-S/2 (and a DiT called
    # dito-B) would be taken for the other model
    with pytest.raises(ValueError, match="model.name=DiT-S/2 names a DiT preset"):
        resolve_run_config(None, None, {"model.name": "DiT-S/2"})
    from dito_fast.train.dit import resolve_dit_run_config
    with pytest.raises(ValueError, match="model.name=dito-B names a tokenizer preset"):
        resolve_dit_run_config(None, None, {"model.name": "dito-B", "data.source": "x"})
