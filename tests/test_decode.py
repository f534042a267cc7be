"""Tests for dito_fast/decode.py: ``fast_decode`` equals ``model.decode`` with the same seed,
as uint8, whatever the chunking."""

from __future__ import annotations

import pytest
import torch

import dito_fast
from dito_fast.eval.report import to_uint8
from dito_fast.models.dito import make_noise


def test_fast_decode_matches_decode_and_chunking(micro_model, images):
    z = micro_model.encode(images)
    out = dito_fast.fast_decode(micro_model, z, steps=3, seed=11)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 32, 32) and out.device.type == "cpu"
    ref = to_uint8(micro_model.decode(z, steps=3, seed=11))
    assert torch.equal(out, ref)
    # the noise is drawn for the whole batch up front, so chunk i decodes with noise i: each chunk
    # equals decoding that chunk alone with its slice of the noise, bit for bit
    noise = make_noise((3, 3, 32, 32), seed=11)
    for max_batch in (1, 2):
        chunked = dito_fast.fast_decode(micro_model, z, steps=3, seed=11, max_batch=max_batch)
        for i in range(0, 3, max_batch):
            sl = slice(i, i + max_batch)
            assert torch.equal(chunked[sl], to_uint8(micro_model.decode(z[sl], steps=3, noise=noise[sl])))
        # and matches the unchunked output up to float rounding (conv kernels differ by batch
        # size at the 1e-6 level, which can move a pixel across a uint8 rounding boundary)
        diff = (chunked.int() - out.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    # other samplers/schedules go through too
    heun = dito_fast.fast_decode(micro_model, z, steps=2, sampler="heun", schedule="edm", seed=11)
    ref_heun = to_uint8(micro_model.decode(z, steps=2, sampler="heun", schedule="edm", seed=11))
    assert torch.equal(heun, ref_heun)
    assert not torch.equal(dito_fast.fast_decode(micro_model, z, steps=3, seed=12), out)


def test_fast_decode_restores_training_mode(micro_model, images):
    micro_model.train()
    dito_fast.fast_decode(micro_model, micro_model.encode(images), steps=1, seed=0)
    assert micro_model.training


def test_fast_decode_bad_max_batch(micro_model):
    with pytest.raises(ValueError, match="max_batch"):
        dito_fast.fast_decode(micro_model, torch.zeros(1, 4, 4, 4), steps=1, seed=0, max_batch=0)


def test_fast_decode_same_seed_bit_identical(micro_model, images):
    z = micro_model.encode(images)
    a = dito_fast.fast_decode(micro_model, z, steps=2, seed=5)
    assert torch.equal(a, dito_fast.fast_decode(micro_model, z, steps=2, seed=5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(a, dito_fast.fast_decode(micro_model, z, steps=2, generator=g))
    # uint8 conversion: -1 -> 0, 1 -> 255, rounded
    assert torch.equal(to_uint8(torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0])),
                       torch.tensor([0, 64, 128, 255, 255], dtype=torch.uint8))


def test_fast_decode_non_square_and_dtype(micro_model):
    z = torch.randn(2, 4, 2, 5, dtype=torch.float64)
    out = dito_fast.fast_decode(micro_model, z, steps=1, seed=0, device="cpu")
    assert out.shape == (2, 3, 16, 40) and out.dtype == torch.uint8
    # latents of another float dtype are decoded in float32, like model.decode(z.float())
    assert torch.equal(out, to_uint8(micro_model.decode(z.float(), steps=1, seed=0)))


@pytest.mark.parametrize("z, msg", [
    (torch.zeros(1, 3, 4, 4), r"shape \(B, 4, h, w\)"),
    (torch.full((1, 4, 4, 4), float("nan")), "NaN"),
    (torch.zeros(0, 4, 4, 4), "empty batch"),
])
def test_fast_decode_rejects_bad_latents(micro_model, z, msg):
    with pytest.raises(ValueError, match=msg):
        dito_fast.fast_decode(micro_model, z, steps=1, seed=0)
