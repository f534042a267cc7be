"""DiTo's diffusion decoder: a consistency-decoder-style UNet without attention.

Input: x_t (B, 3, H, W), time t (B,) in [0, 1] and the latent z (B, c, H/f, W/f). The network
sees concat(x_t, nearest-upsampled z) and t * timescale through sinusoidal features, and
returns the model output (B, 3, H, W) (a velocity under the default objective).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from ..ops import Conv3x3, conv_activation_format, group_norm_modulate_silu, memory_format_of, opmath_dtype


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal features (B, dim) of times t (B,) (already multiplied by the timescale),
    computed in ``dtype`` (float32, or float64 for a float64 model)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def upsample_nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of (B, C, H, W) by an integer factor: the same values as
    F.interpolate(mode="nearest") (:func:`_nearest_copy`). A channels_last input gives a
    channels_last output.

    Differentiable: the gradient of each input value is the sum over its factor x factor copies
    (:func:`_block_sums`). When the forward was a broadcast copy, autograd formed that gradient as
    a sum over the broadcast dimensions of a 6-d view: 29 ms for a (8, 128, 64, 64) channels_last
    gradient on the 2-core development machine and 37 ms for an NCHW one; these block sums take
    0.7 and 1.2 ms."""
    return _UpsampleNearest.apply(x, factor)


def _block_sums(g: torch.Tensor, f: int) -> torch.Tensor:
    """Sums of the f x f blocks of g (B, C, f H, f W): (B, C, H, W), channels_last where g's
    channels are its innermost dimension, else NCHW. Channels innermost (channels_last, or a
    channel slice of it such as the gradient torch.cat hands each input), or any layout off the
    CPU: a sum pooling (F.avg_pool2d with divisor 1). Rows innermost on the CPU, where that pooling
    is slow (10 ms for an (8, 128, 64, 64) gradient): the f rows of each block added as slices,
    then the f columns."""
    if f == 1:
        return g
    if g.device.type != "cpu" or g.stride(3) != 1:
        return F.avg_pool2d(g, f, divisor_override=1)
    B, C, H, W = g.shape[0], g.shape[1], g.shape[2] // f, g.shape[3] // f
    rows = g.contiguous().view(B, C, H, f, W * f)
    s = rows[:, :, :, 0]
    for i in range(1, f):
        s = s + rows[:, :, :, i]  # (B, C, H, f W)
    cols = s.view(B, C, H, W, f)
    out = cols[..., 0]
    for i in range(1, f):
        out = out + cols[..., i]
    return out


def _nearest_copy(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (B, C, H, W) with every value repeated over a factor x factor block, in x's layout.
    channels_last (on the CPU the C values of a pixel are one vector): ATen's nearest-upsampling
    kernel. Other layouts: each row's values repeated along W into the first row of its block,
    which the block's other rows then copy whole (one broadcast copy with a factor-long innermost
    dimension, and row copies)."""
    if memory_format_of(x) == torch.channels_last:
        return F.interpolate(x, scale_factor=factor, mode="nearest")
    B, C, H, W = x.shape
    out = x.new_empty(B, C, H, factor, W, factor)
    out[:, :, :, 0] = x[..., None]
    out[:, :, :, 1:] = out[:, :, :, :1]
    return out.view(B, C, H * factor, W * factor)


class _UpsampleNearest(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap: forward and backward are plain torch ops

    @staticmethod
    def forward(x, factor):
        return _nearest_copy(x, factor)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _block_sums(grad, ctx.factor), None  # differentiable again (double backward)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = SiLU(GN(h)*(1+scale)+shift); out = conv(h) + shortcut(x).

    ``resample``: None, "down" (2x2 average pooling before the first conv and on the shortcut)
    or "up" (nearest 2x before the first conv and on the shortcut).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, resample: str | None = None):
        super().__init__()
        self.groups, self.resample = groups, resample
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.time_proj = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = Conv3x3(out_ch, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return upsample_nearest(x, 2)
        return x

    def modulation(self, temb_act):
        """(scale, shift), each (B, out_ch), from SiLU(time embedding) (B, temb_dim)."""
        return self.time_proj(temb_act).chunk(2, dim=1)

    def forward(self, x, temb_act):
        return self.forward_modulated(x, *self.modulation(temb_act))

    def forward_modulated(self, x, scale, shift, norm=group_norm_modulate_silu):
        """The block given its time modulation (see :meth:`modulation`). ``norm`` replaces the
        fused norm op (same signature), e.g. to use statistics gathered over a whole tiled image."""
        h = norm(x, self.groups, self.norm1.weight, self.norm1.bias, eps=self.norm1.eps)
        h = self.conv1(self._resample(h))
        h = norm(h, self.groups, self.norm2.weight, self.norm2.bias, scale, shift, eps=self.norm2.eps)
        # In place: the conv's backward does not need its output, and skipping a fresh
        # allocation (page faults on large CPU tensors) is measurably faster.
        return self.conv2(h).add_(self.shortcut(self._resample(x)))


class UNetDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, latent_channels: int, timescale: float = 1000.0):
        super().__init__()
        self.cfg, self.timescale = cfg, timescale
        g, td, chans, n = cfg.norm_groups, cfg.time_embed_dim, cfg.level_channels, cfg.num_res_blocks
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(cfg.out_channels + latent_channels, chans[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, ch = [chans[0]], chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(n):
                self.down.append(ResBlock(ch, out_ch, td, g))
                ch = out_ch
                skip_chs.append(ch)
            if level < len(chans) - 1:
                self.down.append(ResBlock(ch, ch, td, g, resample="down"))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, td, g), ResBlock(ch, ch, td, g)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            for _ in range(n + 1):
                self.up.append(ResBlock(ch + skip_chs.pop(), chans[level], td, g))
                ch = chans[level]
            if level > 0:
                self.up.append(ResBlock(ch, ch, td, g, resample="up"))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.level_channels) - 1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """SiLU(time embedding) (B, time_embed_dim) for t (B,) in [0, 1]; shared by all blocks."""
        wdtype = next(self.time_embed.parameters()).dtype
        fdtype = opmath_dtype(wdtype)  # the features' dtype
        feats = timestep_features((t.double() if fdtype == torch.float64 else t) * self.timescale,
                                  self.cfg.time_freq_dim, dtype=fdtype)
        return F.silu(self.time_embed(feats.to(wdtype)))

    @property
    def blocks(self) -> list[ResBlock]:
        """Every residual block in evaluation order (down, middle, up)."""
        return [*self.down, *self.mid, *self.up]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Model output (B, 3, H, W) in x_t's layout; inside, activations use the layout the
        convolutions prefer (:func:`conv_activation_format`: channels_last on the CPU)."""
        out_format, work = memory_format_of(x_t), conv_activation_format(x_t)
        x_t, z = x_t.contiguous(memory_format=work), z.contiguous(memory_format=work)
        temb = self.embed_time(t).to(x_t.dtype)  # (B, td)
        f = x_t.shape[-1] // z.shape[-1]  # the latent factor (H, W are multiples of it; checked by DiTo)
        z_up = upsample_nearest(z.to(x_t.dtype), f)  # (B, c, H, W)
        h = self.conv_in(torch.cat([x_t, z_up], dim=1))  # (B, c0, H, W)
        out = self._trunk(h, [block.modulation(temb) for block in self.blocks])
        return out.contiguous(memory_format=out_format)

    # -- decoding with the step-invariant work done once (dito_fast.decode) ------------------
    # conv_in(cat(x_t, z_up)) = conv(x_t; W[:, :3]) + conv(z_up; W[:, 3:]) + b: the second term and
    # every block's (scale, shift) depend on z or t only, not on x_t.

    def time_modulations(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> list:
        """Every block's (scale, shift), each (B, out_ch), for times t (B,) in [0, 1], in the
        order of :attr:`blocks`."""
        temb = self.embed_time(t)
        temb = temb if dtype is None else temb.to(dtype)
        return [block.modulation(temb) for block in self.blocks]

    def latent_features(self, z: torch.Tensor, factor: int) -> torch.Tensor:
        """The latent's part of the input convolution, bias included: (B, c0, h*factor, w*factor)
        for z (B, c, h, w). Zero padding of the concatenated input = zero padding of each half."""
        c = self.cfg.out_channels
        return F.conv2d(upsample_nearest(z, factor), self.conv_in.weight[:, c:], self.conv_in.bias, padding=1)

    def forward_cached(self, x_t: torch.Tensor, z_feat: torch.Tensor, mods: list,
                       norm=group_norm_modulate_silu) -> torch.Tensor:
        """``forward`` given ``latent_features(z)`` (B, c0, H, W) and ``time_modulations(t)``."""
        c = self.cfg.out_channels
        out_format, work = memory_format_of(x_t), conv_activation_format(x_t)
        x_t, z_feat = x_t.contiguous(memory_format=work), z_feat.contiguous(memory_format=work)
        h = F.conv2d(x_t, self.conv_in.weight[:, :c], None, padding=1).add_(z_feat)  # (B, c0, H, W)
        return self._trunk(h, mods, norm).contiguous(memory_format=out_format)

    def _trunk(self, h: torch.Tensor, mods: list, norm=group_norm_modulate_silu) -> torch.Tensor:
        """Everything after the input convolution; ``mods`` holds one (scale, shift) per block."""
        mods = iter(mods)
        skips = [h]
        for block in self.down:
            h = block.forward_modulated(h, *next(mods), norm)
            skips.append(h)
        for block in self.mid:
            h = block.forward_modulated(h, *next(mods), norm)
        for block in self.up:
            h = block.forward_modulated(h if block.resample == "up" else torch.cat([h, skips.pop()], dim=1),
                                        *next(mods), norm)
        h = norm(h, self.cfg.norm_groups, self.norm_out.weight, self.norm_out.bias, eps=self.norm_out.eps)
        return self.conv_out(h)  # (B, 3, H, W)
