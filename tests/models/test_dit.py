"""Tests for dito_fast/models/dit.py: the downstream DiT on DiTo latents."""

from __future__ import annotations

import math

import pytest
import torch

from dito_fast.diffusion import samplers
from dito_fast.models.dit import DIT_PRESETS, DiT, DiTConfig, get_dit_preset, sincos_positions
from dito_fast.ops import attention_ref, fm_noise_ref


def tiny(**overrides) -> DiTConfig:
    settings = dict(name="tiny", latent_channels=4, latent_size=8, patch_size=2, hidden_size=32, depth=2,
                    num_heads=2, num_classes=5)
    return DiTConfig(**{**settings, **overrides})


def live(config: DiTConfig, seed: int = 0) -> DiT:
    """A tiny DiT whose zero-initialised gates and output layer are given values, so that every
    block and the conditioning change the output."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or "final.linear" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name,params", [("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416),
                                         ("DiT-L/2", 458_102_816), ("DiT-XL/2", 675_129_632)])
def test_preset_sizes_match_the_paper(name, params):
    """The DiT paper's code counts a learned-variance output (2c channels) and its frozen position
    table as parameters: 675,129,632 for DiT-XL/2 on 4x32x32 latents (its published figure); ours
    predicts the velocity only (c channels) and computes the positions."""
    with torch.device("meta"):
        model = DiT(get_dit_preset(name))
    c = model.config
    sigma_half = c.hidden_size * c.patch_size**2 * c.latent_channels + c.patch_size**2 * c.latent_channels
    positions = (c.latent_size // c.patch_size) ** 2 * c.hidden_size
    assert sum(p.numel() for p in model.parameters()) + sigma_half + positions == params
    assert len(DIT_PRESETS) == 12 and DIT_PRESETS["DiT-XL/2"] is not DIT_PRESETS["DiT-XL/2"]


def test_zero_init_predicts_zero_and_blocks_start_as_identity():
    model = DiT(tiny())
    z = torch.randn(3, 4, 8, 8)
    assert torch.equal(model(z, torch.rand(3), torch.tensor([0, 1, 5])), torch.zeros_like(z))
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    assert torch.equal(model.blocks[0](x, c), x)


def test_forward_follows_its_definition():
    """The patchify -> blocks -> unpatchify path against a direct computation for one sample:
    output patch (i, j) is the final layer of token i * (w / p) + j."""
    model = live(tiny()).eval()
    z, t, y = torch.randn(2, 4, 8, 12), torch.tensor([0.3, 0.9]), torch.tensor([1, 5])
    out = model(z, t, y)
    p, D = 2, 32
    tokens = z.unfold(2, p, p).unfold(3, p, p)  # (B, C, 4, 6, p, p)
    tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(2, 24, 4 * p * p)
    w = model.x_embed.weight.reshape(D, -1)
    x = tokens @ w.T + model.x_embed.bias + sincos_positions(D, 4, 6)
    from dito_fast.models.unet import timestep_features
    c = model.t_embed(timestep_features(t * 1000, 256)) + model.y_embed(y)
    for block in model.blocks:
        x = block(x, c)
    x = model.final(x, c).reshape(2, 4, 6, p, p, 4)  # (B, gh, gw, p, p, C)
    expected = x.permute(0, 5, 1, 3, 2, 4).reshape(2, 4, 8, 12)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_sincos_positions():
    pos = sincos_positions(8, 3, 4)
    assert pos.shape == (12, 8)
    # token (r, c) = r * 4 + c: the first half encodes the column c, the second the row r (DiT's order)
    assert torch.equal(pos[1 * 4 + 2, :4], pos[0 * 4 + 2, :4]) and torch.equal(pos[1 * 4 + 2, 4:], pos[1 * 4 + 0, 4:])
    torch.testing.assert_close(pos[6], torch.tensor([math.sin(2), math.sin(2e-2), math.cos(2), math.cos(2e-2),
                                                     math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)]))


def test_attention_is_the_reference():
    model = live(tiny()).eval()
    x = torch.randn(2, 16, 32)
    B, N, D = x.shape
    q, k, v = model.blocks[0].attn.qkv(x).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = model.blocks[0].attn.proj(attention_ref(q, k, v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(model.blocks[0].attn(x), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_flow_matching_with_label_dropout():
    model = live(tiny(class_dropout_prob=0.5))
    z, y = torch.randn(6, 4, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = model.loss(z, y, generator=torch.Generator().manual_seed(7))
    # the same draws by hand: t, the noise, the dropout
    g = torch.Generator().manual_seed(7)
    t = torch.rand(6, generator=g)
    e = torch.randn(z.shape, generator=g)
    drop = torch.rand(6, generator=g) < 0.5
    assert 0 < int(drop.sum()) < 6  # this seed drops some labels and keeps others
    z_t, v = fm_noise_ref(z, e, t)
    expected = (model(z_t, t, torch.where(drop, 5, y)) - v).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_under_bf16_autocast():
    """Mixed-precision training: the network runs in bfloat16, the loss compares in float32."""
    model = live(tiny())
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(z, y, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    loss.mean().backward()
    reference = model.loss(z, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, reference, rtol=0.1, atol=0.05)


def test_a_tiny_dit_learns_four_latents():
    torch.manual_seed(0)
    model = DiT(tiny(class_dropout_prob=0.0))
    z = torch.randn(4, 4, 8, 8)
    y = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(300):
        loss = model.loss(z, y, generator=g).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = model.loss(z.repeat(8, 1, 1, 1), y.repeat(8), generator=torch.Generator().manual_seed(1)).mean()
    # each label names one latent, so the velocity is determined by (z_t, t, y): the loss can reach 0
    assert first > 1.5 and final < 0.4 * first, (first, float(final))


def test_sampling_with_guidance_is_the_guided_ode():
    """One Euler step from t = 1: x0 = e - v(e, 1) with v = v_null + s (v_y - v_null)."""
    model = live(tiny()).eval()
    y = torch.tensor([2, 4])
    e = torch.randn(2, 4, 8, 8)
    out = model.sample(y, steps=1, cfg_scale=3.0, noise=e)
    with torch.no_grad():
        v_y, v_null = model(e, torch.ones(2), y), model(e, torch.ones(2), torch.full((2,), 5))
    torch.testing.assert_close(out, e - (v_null + 3.0 * (v_y - v_null)), rtol=1e-5, atol=1e-5)
    plain = model.sample(y, steps=1, noise=e)
    torch.testing.assert_close(plain, e - v_y, rtol=1e-5, atol=1e-5)


def test_sampling_seeds_samplers_and_sizes():
    model = live(tiny()).eval()
    y = torch.tensor([0, 1, 2])
    a = model.sample(y, steps=4, seed=[3, 4, 5])
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32
    # per-sample seeds: row i is what seed i gives alone (up to the matmuls' rounding at another batch size)
    torch.testing.assert_close(model.sample(y[1:2], steps=4, seed=[4]), a[1:2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.sample(y[1:2], steps=4, seed=[3]), a[1:2], atol=1e-2)
    assert torch.equal(model.sample(y, steps=4, seed=[3, 4, 5]), a)
    assert model.sample(y, steps=3, sampler="heun", latent_size=(8, 12), seed=0).shape == (3, 4, 8, 12)
    e = torch.randn(3, 4, 8, 8)
    direct = samplers.sample(lambda x, t: model(x, t, y), e, steps=4, sampler="ab2")
    torch.testing.assert_close(model.sample(y, steps=4, sampler="ab2", noise=e), direct)
    uncond = live(tiny(num_classes=0)).eval()
    assert uncond.sample(batch_size=2, steps=2, seed=0).shape == (2, 4, 8, 8)


def test_save_and_load_round_trip(tmp_path):
    model = live(tiny())
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(loaded(z, torch.rand(2, generator=torch.Generator().manual_seed(0))),
                       model.eval()(z, torch.rand(2, generator=torch.Generator().manual_seed(0))))
    (tmp_path / "config.json").write_text('{"hidden_size": 30, "num_heads": 4}')
    with pytest.raises(ValueError, match="invalid model config.*even size"):
        DiT.from_pretrained(tmp_path)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.rand(2)), ValueError, r"shape \(B >= 1, 4, h, w\)"),
    (lambda m: m(torch.randn(2, 4, 8, 7), torch.rand(2)), ValueError, "multiples of the patch size 2"),
    (lambda m: m(torch.randn(2, 4, 8, 8).double(), torch.rand(2)), TypeError, "float64 but the model's weights"),
    (lambda m: m(torch.randn(2, 4, 8, 8), torch.rand(3)), ValueError, r"t must have shape \(2,\)"),
    (lambda m: m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 6])), ValueError, r"in \[0, 5\]"),
    (lambda m: m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0.0, 1.0])), ValueError, "int64 tensor"),
    (lambda m: m.loss(torch.full((1, 4, 8, 8), math.nan)), ValueError, "NaN"),
    (lambda m: m.sample(steps=2), ValueError, "give batch_size"),
    (lambda m: m.sample(batch_size=2, cfg_scale=2.0), ValueError, "give y"),
    (lambda m: m.sample(torch.tensor([1]), cfg_scale=-0.5), ValueError, "cfg_scale must be finite and >= 0"),
    (lambda m: m.sample(torch.tensor([1]), latent_size=7), ValueError, "multiples of the patch size"),
    (lambda m: m.sample(torch.tensor(1)), ValueError, r"1-D tensor of labels \(B >= 1,\), got shape \(\)"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call(live(tiny()))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiT(tiny(latent_size=9))
    with pytest.raises(ValueError, match="num_classes"):
        DiT(tiny(num_classes=-1))
    with pytest.raises(KeyError, match="unknown DiT preset"):
        get_dit_preset("DiT-XXL/2")
    with pytest.raises(ValueError, match="unconditional"):
        live(tiny(num_classes=0))(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
