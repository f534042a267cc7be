"""DiT, the downstream latent diffusion model DiTo's latents are made for (Peebles & Xie, "Scalable
Diffusion Models with Transformers", 2023), in DiTo's flow-matching convention.

A transformer over p x p patches of a latent (B, c, h, w), conditioned on the time t and a class
label through adaptive LayerNorm whose gates start at zero (adaLN-Zero: every block starts as the
identity, the output layer at zero). Trained with the flow-matching loss DiTo's decoder uses
(DESIGN.md §1: z_t = (1 - t) z + (s + t (1 - s)) e, target v = (1 - s) e - z, t ~ U(0, 1); the
network sees t * 1000) and sampled with the same ODE samplers from t = 1 (noise) to t = 0, with
classifier-free guidance (labels dropped to a null class in training). It answers the question
noise synchronisation is about: how easy a tokenizer's latent space is to generate in.

Latents: DiTo's are already normalised (affine-free LayerNorm per sample), so no scale factor.
Usage (see README "Downstream: a DiT on DiTo latents")::

    dit = DiT.from_preset("DiT-B/2", latent_channels=4, latent_size=32, num_classes=1000)
    loss = dit.loss(z, y).mean()                      # z (B, 4, 32, 32) from dito_fast.encode
    z_gen = dit.sample(y, steps=50, cfg_scale=4.0, seed=0)
    images = dito_fast.fast_decode(tokenizer, z_gen, seed=0)
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..config import Presets, apply_overrides
from ..diffusion import flow, samplers
from ..ops import attention, fm_loss, fm_noise, opmath_dtype
from ._pretrained import load_pretrained, parse_model_config, save_pretrained
from .dito import check_matches_weights, initial_noise
from .unet import timestep_features


@dataclass
class DiTConfig:
    name: str = "DiT-B/2"
    latent_channels: int = 4  # c of the latents (DiTo's f8c4: 4)
    latent_size: int = 32  # the latents' side the fixed position table is built for (256 px / f8)
    patch_size: int = 2
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: unconditional
    class_dropout_prob: float = 0.1  # training labels replaced by the null class, for guidance
    time_freq_dim: int = 256
    timescale: float = 1000.0  # the network sees t * timescale
    sigma_min: float = 1e-5  # s of the flow-matching path (DESIGN.md §1)


def validate_dit_config(c: DiTConfig) -> None:
    """Raise ValueError naming the first setting that cannot make a DiT."""
    for key in ("latent_channels", "latent_size", "patch_size", "hidden_size", "depth", "num_heads", "time_freq_dim"):
        v = getattr(c, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    if c.latent_size % c.patch_size:
        raise ValueError(f"latent_size {c.latent_size} is not a multiple of patch_size {c.patch_size}")
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 2:
        raise ValueError(f"hidden_size {c.hidden_size} must split into num_heads {c.num_heads} heads of an even size")
    if c.hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (the 2-D sin-cos positions), got {c.hidden_size}")
    if c.time_freq_dim % 2:
        raise ValueError(f"time_freq_dim must be even, got {c.time_freq_dim}")
    if isinstance(c.num_classes, bool) or not isinstance(c.num_classes, int) or c.num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {c.num_classes!r}")
    if not 0.0 <= c.class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {c.class_dropout_prob}")
    if not c.mlp_ratio > 0 or not c.timescale > 0 or not 0.0 <= c.sigma_min < 1.0:
        raise ValueError("mlp_ratio and timescale must be positive and sigma_min in [0, 1)")


# --------------------------------------------------------------------------------------------
# helpers


def sincos_positions(dim: int, gh: int, gw: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (gh * gw, dim), row-major over the patch grid: the
    first half of the features encodes the column, the second the row (the DiT and MAE tables'
    order), each as sin then cos of position x 1/10000^(k/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))

    def one_axis(pos):  # (n,) -> (n, dim / 2)
        args = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    rows = one_axis(torch.arange(gh, device=device)).repeat_interleave(gw, dim=0)  # (gh gw, dim / 2)
    cols = one_axis(torch.arange(gw, device=device)).repeat(gh, 1)
    return torch.cat([cols, rows], dim=1).to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) * (1 + scale) + shift, with scale, shift (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    """Multi-head self-attention over the tokens, through :func:`dito_fast.ops.attention`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        out = attention(q, k, v)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """x + gate_a * attn(modulate(LN(x))), then x + gate_m * mlp(modulate(LN(x))); the six
    per-sample vectors (shift, scale, gate for each half) come from the conditioning c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=1)  # each (B, D)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """modulate(LN(x)) -> a linear map to each patch's p * p * c values."""

    def __init__(self, dim: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------------------------
# the model


class DiT(nn.Module):
    """Velocity network v(z_t, t, y) on latents (B, c, h, w), h and w multiples of the patch
    size; a class-conditional model's null label is ``num_classes`` (``y=None`` means it for the
    whole batch)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        validate_dit_config(config)
        self.config = c = copy.deepcopy(config)
        D, p = c.hidden_size, c.patch_size
        self.x_embed = nn.Conv2d(c.latent_channels, D, p, stride=p)
        self._pos_cache: dict = {}  # (grid, device, dtype) -> the fixed position table (not a parameter)
        self.t_embed = nn.Sequential(nn.Linear(c.time_freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        # one more row than classes: the null label of classifier-free guidance
        self.y_embed = nn.Embedding(c.num_classes + 1, D) if c.num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = FinalLayer(D, p, c.latent_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiT":
        """``DiT.from_preset("DiT-XL/2", num_classes=0)``: a preset's architecture with settings changed."""
        return cls(get_dit_preset(name, **overrides))

    def initialize_weights(self) -> None:
        """Xavier-uniform linear layers with zero biases, the patch embedding as a linear map,
        N(0, 0.02) time-MLP and label weights; every adaLN output and the final linear layer at
        zero, so that each block starts as the identity and the model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embed.weight.view(self.x_embed.weight.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for m in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(m.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.final.ada]:
            nn.init.zeros_(ada[1].weight)
            nn.init.zeros_(ada[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    # -- the network -------------------------------------------------------------------------

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, c, h, w) at z_t (B, c, h, w), times t (B,) in [0, 1] (or a number), labels
        y (B,) int64 in [0, num_classes] (num_classes: the null label; None: null for all; must
        be None for an unconditional model)."""
        B, C, H, W = self._check_latents(z_t, "z_t")
        t = self._check_times(t, B, z_t)
        y = self._check_labels(y, B, z_t.device)
        p = self.config.patch_size
        x = self.x_embed(z_t).flatten(2).transpose(1, 2)  # (B, N, D), N = (H/p)(W/p) row-major
        x = x + self._positions(H // p, W // p, x)
        c = self.t_embed(timestep_features(t * self.config.timescale, self.config.time_freq_dim,
                                           dtype=opmath_dtype(z_t.dtype)).to(x.dtype))  # (B, D)
        if y is not None:
            c = c + self.y_embed(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final(x, c)  # (B, N, p p C)
        # unpatchify: (B, H/p, W/p, p, p, C) -> (B, C, H, W)
        x = x.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def _positions(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        """The (gh gw, D) table for this grid, made once per (grid, device, dtype): the position
        encoding is a fixed function, not a parameter, so any latent size works."""
        key = (gh, gw, like.device, like.dtype)
        if key not in self._pos_cache:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            self._pos_cache[key] = sincos_positions(self.config.hidden_size, gh, gw, like.device, like.dtype)
        return self._pos_cache[key]

    # -- training ----------------------------------------------------------------------------

    def loss(self, z: torch.Tensor, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, seeds: list[int] | None = None) -> torch.Tensor:
        """Flow-matching loss per sample (B,) on clean latents z (B, c, h, w): t ~ U(0, 1), noise
        e ~ N(0, I), each label replaced by the null one with ``class_dropout_prob`` (all draws
        from ``generator``, else torch's global RNG, on z's device), MSE between the predicted
        and the true velocity.

        ``seeds`` (B ints) instead of ``generator``: sample i's draws (its time, its noise, its
        label drop, in that order) from a generator seeded by ``seeds[i]``, so that they do not
        depend on the batch around it (what the trainer's resumable runs use)."""
        B = self._check_latents(z, "z")[0]
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or inf values")
        y = self._check_labels(y, B, z.device)
        p_drop = self.config.class_dropout_prob if y is not None else 0.0
        if seeds is not None:
            if generator is not None or len(seeds) != B:
                raise ValueError(f"give one seed per sample ({B}) and no generator, got {len(seeds)} seeds"
                                 + (" and a generator" if generator is not None else ""))
            t, noise, u = [], [], []
            for seed in seeds:
                g = torch.Generator(device=z.device).manual_seed(int(seed))
                t.append(flow.sample_times(1, g, z.device))
                noise.append(torch.randn((1, *z.shape[1:]), generator=g, device=z.device, dtype=z.dtype))
                u.append(torch.rand(1, generator=g, device=z.device))
            t, noise, drop = torch.cat(t), torch.cat(noise), torch.cat(u) < p_drop
        else:
            t = flow.sample_times(B, generator, z.device)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            drop = torch.rand(B, generator=generator, device=z.device) < p_drop if p_drop > 0 else None
        if p_drop > 0:
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        z_t, v = fm_noise(z, noise, t, self.config.sigma_min)
        pred = self(z_t, t, y)
        return fm_loss(pred.to(v.dtype), v)  # under autocast pred is bf16/fp16: the loss in z's dtype

    # -- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, y: torch.Tensor | None = None, *, batch_size: int | None = None, steps: int = 50,
               sampler: str = "euler", schedule: str = "uniform", cfg_scale: float = 1.0,
               latent_size: int | tuple[int, int] | None = None, seed: int | list[int] | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, c, h, w) float32 (float64 for a float64 model), from noise at t = 1 to t = 0.

        ``y``: labels (B,) (the batch size), or None with ``batch_size`` for unconditional
        samples. ``cfg_scale`` >= 0: classifier-free guidance, v = v_null + s (v_y - v_null) (1: none;
        the null half then is not evaluated; 0: the null class's model alone). ``latent_size``: h (= w) or (h, w), default the
        config's. ``seed`` / ``generator`` / ``noise``: as in :meth:`DiTo.decode`."""
        device, param_dtype = self.x_embed.weight.device, self.x_embed.weight.dtype
        if y is None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"without labels, give batch_size (a positive int), got {batch_size!r}")
            B = batch_size
        else:
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            if y.dim() != 1 or y.shape[0] == 0:
                raise ValueError(f"y must be a 1-D tensor of labels (B >= 1,), got shape {tuple(y.shape)}")
            B = y.shape[0]
            if batch_size is not None and batch_size != B:
                raise ValueError(f"batch_size {batch_size} does not match the {B} labels")
            y = self._check_labels(y.to(device), B, device)
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be finite and >= 0 (0: the unconditional model, 1: no guidance), "
                             f"got {cfg_scale}")
        guided = cfg_scale != 1.0
        if guided and self.y_embed is None:
            raise ValueError("cfg_scale needs a class-conditional model (num_classes > 0)")
        if guided and y is None:
            raise ValueError("cfg_scale guides towards labels: give y")
        h, w = _size(latent_size if latent_size is not None else self.config.latent_size, self.config.patch_size)
        timesteps = samplers.make_timesteps(steps, schedule)
        sampler_fn = samplers.get_sampler(sampler)
        state_dtype = opmath_dtype(param_dtype)
        x = initial_noise((B, self.config.latent_channels, h, w), noise, seed, generator, device, state_dtype)
        if guided:
            y_both = torch.cat([y, torch.full_like(y, self.null_label)])

        def velocity(x_t, t):
            if not guided:
                return self(x_t.to(param_dtype), t, y).to(state_dtype)
            v_y, v_null = self(torch.cat([x_t, x_t]).to(param_dtype), torch.cat([t, t]), y_both).to(state_dtype).chunk(2)
            return v_null + cfg_scale * (v_y - v_null)

        return sampler_fn(velocity, x, timesteps=timesteps)

    # -- checks ------------------------------------------------------------------------------

    def _check_latents(self, z, name: str) -> tuple[int, int, int, int]:
        c = self.config
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != c.latent_channels or z.shape[0] == 0:
            raise ValueError(f"{name} must have shape (B >= 1, {c.latent_channels}, h, w), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {z.dtype}")
        if z.shape[2] % c.patch_size or z.shape[3] % c.patch_size:
            raise ValueError(f"{name}: h and w must be multiples of the patch size {c.patch_size}, got "
                             f"{z.shape[2]}x{z.shape[3]}")
        check_matches_weights(z, self, name)
        return tuple(z.shape)

    def _check_times(self, t, B: int, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.full((B,), float(t), device=like.device)
        elif t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) or be a scalar, got {tuple(t.shape)}")
        return t.to(device=like.device, dtype=opmath_dtype(like.dtype))

    def _check_labels(self, y, B: int, device) -> torch.Tensor | None:
        n = self.config.num_classes
        if y is None:
            return None if n == 0 else torch.full((B,), n, device=device, dtype=torch.long)
        if n == 0:
            raise ValueError("this DiT is unconditional (num_classes=0): pass y=None")
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (B,):
            raise ValueError(f"y must be an int64 tensor of shape ({B},), got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if y.device != device:
            raise ValueError(f"y is on {y.device} but the latents are on {device}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > n:
            raise ValueError(f"labels must be in [0, {n}] ({n}: the null label), got values in [{lo}, {hi}]")
        return y.long()

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
        save_pretrained(self, asdict(self.config), directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "DiT":
        """Load a DiT written by :meth:`save_pretrained`, in eval mode (as :meth:`DiTo.from_pretrained`)."""
        return load_pretrained(directory, _parse_config, cls, map_location, dtype)


def _size(size, patch: int) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % patch:
            raise ValueError(f"latent_size must be positive multiples of the patch size {patch}, got {size!r}")
    return h, w


def _parse_config(data: dict) -> DiTConfig:
    return parse_model_config(data, DiTConfig, "dit", validate_dit_config)


# --------------------------------------------------------------------------------------------
# presets: the DiT paper's sizes (S, B, L, XL) and patch sizes (2, 4, 8)

_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_DIT_PRESETS = {f"DiT-{s}/{p}": DiTConfig(name=f"DiT-{s}/{p}", patch_size=p, hidden_size=d, depth=n, num_heads=h)
                for s, (d, n, h) in _SIZES.items() for p in (2, 4, 8)}


DIT_PRESETS = Presets(_DIT_PRESETS, "DiT preset")  # read-only; each lookup a fresh copy


def get_dit_preset(name: str, **overrides) -> DiTConfig:
    """A copy of preset ``name`` with ``overrides`` (DiTConfig fields) applied."""
    return apply_overrides(DIT_PRESETS[name], overrides)


__all__ = ["DiT", "DiTConfig", "DIT_PRESETS", "get_dit_preset", "validate_dit_config", "sincos_positions"]
