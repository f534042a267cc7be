"""DiTo's image encoder: an LDM-style convolutional encoder followed by a 1x1 conv.

(B, 3, H, W) in [-1, 1] -> (B, latent_channels, H/f, W/f), f = 2 ** (levels - 1). The latent
LayerNorm is applied by the autoencoder (models/dito.py), not here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EncoderConfig
from ..ops import Conv3x3, attention, conv_activation_format, group_norm_modulate_silu, memory_format_of


class ResBlock(nn.Module):
    """GN-SiLU-conv3x3 twice, with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.groups = groups
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = Conv3x3(out_ch, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(group_norm_modulate_silu(x, self.groups, self.norm1.weight, self.norm1.bias,
                                                eps=self.norm1.eps))
        h = self.conv2(group_norm_modulate_silu(h, self.groups, self.norm2.weight, self.norm2.bias,
                                                eps=self.norm2.eps))
        return h + self.shortcut(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.groups = groups
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = group_norm_modulate_silu(x, self.groups, self.norm.weight, self.norm.bias,
                                     eps=self.norm.eps, silu=False)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padding only right/bottom by one (halves even sizes exactly)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.norm_groups
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.base_channels
        for level, out_ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, g))
                ch = out_ch
            stage = nn.Module()
            stage.blocks = blocks
            stage.downsample = Downsample(ch) if level < len(chans) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid_block1 = ResBlock(ch, ch, g)
        self.mid_attn = AttnBlock(ch, g) if cfg.mid_attention else nn.Identity()
        self.mid_block2 = ResBlock(ch, ch, g)
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)
        self.proj = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_channels, H/f, W/f) in x's layout; inside, activations use the layout
        the convolutions prefer (:func:`conv_activation_format`: channels_last on the CPU)."""
        out_format = memory_format_of(x)
        h = self.conv_in(x.contiguous(memory_format=conv_activation_format(x)))  # (B, c, H, W)
        for stage in self.down:
            for block in stage.blocks:
                h = block(h)
            h = stage.downsample(h)  # (B, c_l, H/2^l, W/2^l)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h)))
        h = group_norm_modulate_silu(h, self.cfg.norm_groups, self.norm_out.weight, self.norm_out.bias,
                                     eps=self.norm_out.eps)
        return self.proj(self.conv_out(h)).contiguous(memory_format=out_format)  # (B, latent_channels, H/f, W/f)
