"""The DiTo autoencoder: encoder -> affine-free latent LayerNorm -> diffusion UNet decoder.

Images are float tensors (B, 3, H, W) in [-1, 1] with H and W multiples of the model's
``downsample_factor``; latents are (B, latent_channels, H/f, W/f), zero-mean unit-variance per
sample. Training minimises :func:`dito_fast.diffusion.flow.flow_matching_loss`; decoding solves
the flow ODE from Gaussian noise (``decode``).
"""

from __future__ import annotations

import copy
import logging
import numbers
import os

import torch
import torch.nn as nn

from ..config import ModelConfig, apply_overrides, get_preset, to_dict, validate_model_config
from ..diffusion import flow, samplers
from ..ops import latent_layernorm, opmath_dtype
from ._pretrained import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained  # noqa: F401 (names re-exported)
from ._pretrained import parse_model_config
from .encoder import Encoder
from .unet import UNetDecoder

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# input checks (clear errors naming the problem)


def check_images(x: torch.Tensor, factor: int, name: str = "images") -> None:
    """Raise ``ValueError``/``TypeError`` unless x is a finite float (B, 3, H, W) tensor in
    [-1, 1] (1e-3 slack) with H, W multiples of ``factor`` and B >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor with values in [-1, 1], got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    H, W = x.shape[-2:]
    if H == 0 or W == 0 or H % factor or W % factor:
        raise ValueError(f"{name}: height and width must be positive multiples of {factor}, got {H}x{W}")
    if x.is_meta:
        raise ValueError(f"{name} are on the meta device (shapes without values); give real tensors")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:
        # far outside: another range (0..255 as floats); slightly: a resize's overshoot, say
        hint = ("convert uint8 images with x / 127.5 - 1" if max(-lo, hi) > 2 else
                "clamp them with x.clamp(-1, 1), e.g. after a bicubic resize, which overshoots")
        raise ValueError(f"{name} must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] ({hint})")


def check_latents(z: torch.Tensor, channels: int, latent_factor: int = 1, factor: int = 1) -> None:
    """Raise ``ValueError``/``TypeError`` unless z is a finite float (B, channels, h, w) tensor,
    B >= 1, whose images (h, w times ``latent_factor``) are multiples of ``factor`` pixels."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4 or z.shape[1] != channels:
        raise ValueError(f"latents must have shape (B, {channels}, h, w), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"latents must be floating point, got dtype {z.dtype}")
    if z.shape[0] == 0:
        raise ValueError("latents: empty batch")
    if z.shape[-2] == 0 or z.shape[-1] == 0:
        raise ValueError(f"latents must have a height and width of at least 1, got {tuple(z.shape)}")
    H, W = z.shape[-2] * latent_factor, z.shape[-1] * latent_factor
    if H % factor or W % factor:
        raise ValueError(f"latents of {z.shape[-2]}x{z.shape[-1]} give {H}x{W} images; the decoder needs "
                         f"multiples of {factor} pixels")
    if z.is_meta:
        raise ValueError("latents are on the meta device (shapes without values); give real tensors")
    if not torch.isfinite(z).all():
        raise ValueError("latents contain NaN or inf values")


def check_matches_weights(t: torch.Tensor, model: nn.Module, name: str, dtype: bool = True) -> None:
    """A clear error for input on another device than ``model``'s weights, or (``dtype``) of
    another dtype outside autocast (the layers' own messages name neither the argument nor the
    remedy)."""
    p = next(model.parameters())
    if t.device != p.device:
        raise ValueError(f"{name} are on {t.device} but the model is on {p.device}: move one of them (.to(...))")
    if dtype and t.dtype != p.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} are {t.dtype} but the model's weights are {p.dtype}: convert them with "
                        f".to({p.dtype}), or run under torch.autocast for mixed precision")


def _check_seed(seed, what: str = "seed") -> int:
    # torch.Generator.manual_seed takes [-2^63, 2^64); a float or a string would be truncated or parsed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        raise TypeError(f"{what} must be an int in [-2**63, 2**64), got {seed!r}")
    return int(seed)


def make_noise(shape, seed: int | list[int] | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               device=None, dtype=torch.float32) -> torch.Tensor:
    """Initial decoding noise of ``shape`` (B, ...), in ``dtype`` on ``device``.

    Source: ``seed``, an int for the whole batch or a list of B ints, one per sample; or
    ``generator``, a ``torch.Generator`` for the whole batch or a list of B generators. Seeds draw
    on the CPU (the same noise on every device), generators on their own device. With one source
    per sample, a sample's noise does not depend on its batch: row i of a batch with
    ``seed=[..., s, ...]`` is, bit for bit, the noise of ``seed=s`` (or ``seed=[s]``) for a batch
    of one, so a decoded image depends on its batch only through the network's float rounding at
    another batch size. Neither: torch's global RNG (CPU)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    B = shape[0]
    if isinstance(seed, (list, tuple)):
        if len(seed) != B:
            raise ValueError(f"seed: a list of one seed per sample needs {B} seeds, got {len(seed)}")
        generator = [torch.Generator().manual_seed(_check_seed(s, f"seed[{i}]")) for i, s in enumerate(seed)]
    elif seed is not None:
        generator = torch.Generator().manual_seed(_check_seed(seed))
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"generator: a list of one generator per sample needs {B} generators, got "
                             f"{len(generator)}")
        for i, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator[{i}] must be a torch.Generator, got {type(g).__name__}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(device=device)
                for g in generator]
        return torch.stack(rows).to(dtype=dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, one per sample, got "
                        f"{type(generator).__name__} (for an int, pass seed=)")
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device=device, dtype=dtype)


def initial_noise(shape, noise: torch.Tensor | None = None, seed=None, generator=None, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """The decoders' initial noise: ``noise`` if given (a finite float tensor of ``shape``, on
    any device but meta; moved to ``device`` and ``dtype``), else :func:`make_noise` from
    ``seed`` or ``generator``."""
    if noise is None:
        return make_noise(shape, seed, generator, device, dtype)
    if seed is not None or generator is not None:
        raise ValueError("pass noise, seed or generator, not several")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating torch.Tensor, got {getattr(noise, 'dtype', type(noise).__name__)}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    if noise.is_meta:
        raise ValueError("noise is on meta: a meta tensor holds no values")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf values")
    return noise.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# the model


class DiTo(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model_config(config)
        self.config = copy.deepcopy(config)  # the model's own: editing the caller's object changes nothing here
        self.encoder = Encoder(config.encoder)
        self.decoder = UNetDecoder(config.decoder, config.encoder.latent_channels, config.flow.timescale)
        self.initialize_weights()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTo":
        """Build a preset (``dito-tiny``, ``dito-S``, ``dito-B``, ``dito-L``, ``dito-XL``,
        ``dito-B-f16c8``) with optional config overrides, e.g. ``flow={"noise_sync_prob": 0.1}``
        or ``**{"decoder.num_res_blocks": 2}``."""
        return cls(apply_overrides(get_preset(name), overrides) if overrides else get_preset(name))

    def initialize_weights(self) -> None:
        """PyTorch default init, except the decoder's output conv starts at zero (the initial
        prediction is 0, a stable start for the flow-matching regression)."""
        nn.init.zeros_(self.decoder.conv_out.weight)
        nn.init.zeros_(self.decoder.conv_out.bias)

    @property
    def latent_channels(self) -> int:
        return self.config.encoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Image sizes must be multiples of this (encoder factor and UNet depth)."""
        return max(self.config.encoder.downsample_factor, self.decoder.downsample_factor)

    @property
    def latent_factor(self) -> int:
        return self.config.encoder.downsample_factor

    # -- encode / train ----------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, c, H/f, W/f), of x's dtype
        (of the autocast dtype under autocast)."""
        check_images(x, self.downsample_factor)
        check_matches_weights(x, self, "images")
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return latent_layernorm(self.encoder(x), self.config.latent_norm_eps)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss per sample (B,) for images x (B, 3, H, W) in [-1, 1] (encoder and
        decoder trained jointly through the flow-matching loss)."""
        check_images(x, self.downsample_factor)
        check_matches_weights(x, self, "images")
        loss, _ = flow.flow_matching_loss(self.decoder, x, self._encode(x), self.config.flow, generator)
        return loss

    # -- decode ------------------------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        """Velocity dx_t/dt (B, 3, H, W) at times t (B,) in [0, 1] (or one time for the batch: a
        float or a 0-d tensor) given latents z (B, c, H/f, W/f), for any objective. Only shapes
        are checked (no synchronising value checks: the samplers call this every step)."""
        B = x_t.shape[0] if isinstance(x_t, torch.Tensor) and x_t.dim() == 4 else None
        if B is None or x_t.shape[1] != 3:
            raise ValueError(f"x_t must have shape (B, 3, H, W), got {getattr(x_t, 'shape', type(x_t).__name__)}")
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[0] != B or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must have shape ({B}, {self.latent_channels}, h, w) for x_t of shape "
                             f"{tuple(x_t.shape)}, got {getattr(z, 'shape', type(z).__name__)}")
        f = self.latent_factor
        if (z.shape[-2] * f, z.shape[-1] * f) != tuple(x_t.shape[-2:]):
            raise ValueError(f"z of {z.shape[-2]}x{z.shape[-1]} gives {z.shape[-2] * f}x{z.shape[-1] * f} images, "
                             f"but x_t is {x_t.shape[-2]}x{x_t.shape[-1]}")
        if not isinstance(t, torch.Tensor):
            t = torch.full((B,), float(t), device=x_t.device, dtype=opmath_dtype(x_t.dtype))
        elif t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) (one time per sample) or be a scalar, got {tuple(t.shape)}")
        return self._velocity(x_t, t, z)

    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return flow.to_velocity(self.decoder(x_t, t, z), x_t, t, self.config.flow)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, steps: int = 50, sampler: str = "euler", schedule: str = "uniform",
               seed: int | list[int] | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (clamped), float32
        (float64 for a float64 model).

        Defaults are the paper's (50 uniform Euler steps). The initial noise comes from ``noise``
        (B, 3, h*f, w*f) if given, else from ``seed``/``generator`` (an int or generator for the
        batch, or a list of them, one per sample: :func:`make_noise`; seeds draw on the CPU, so a
        seed gives the same noise on every device), else from torch's global RNG. NaN or inf in the
        result (an overflowing float16 model) are logged as a warning. The ODE
        state is kept in float32 (float64 for a float64 model) whatever the latents' and weights'
        dtypes and under autocast, as in :func:`dito_fast.fast_decode`: only the network runs in
        lower precision. Latents of any floating dtype are taken (bfloat16 ones from a latent
        diffusion model, say): outside autocast they are converted to the weights' dtype.
        """
        check_latents(z, self.latent_channels, self.latent_factor, self.downsample_factor)
        check_matches_weights(z, self, "latents", dtype=False)
        sampler_fn = samplers.get_sampler(sampler)
        timesteps = samplers.make_timesteps(steps, schedule)
        H, W = z.shape[-2] * self.latent_factor, z.shape[-1] * self.latent_factor
        param_dtype = next(self.parameters()).dtype
        state_dtype = opmath_dtype(param_dtype)
        noise = initial_noise((z.shape[0], 3, H, W), noise, seed, generator, z.device, state_dtype)
        autocast = torch.is_autocast_enabled(z.device.type)
        if not autocast:  # latents of any floating dtype (bf16 from a diffusion model, say), as fast_decode
            z = z.to(param_dtype)

        def velocity(x_t, t):
            v = self._velocity(x_t if autocast else x_t.to(param_dtype), t, z)  # shapes checked above
            return v.to(state_dtype)

        x = sampler_fn(velocity, noise, timesteps=timesteps)
        if not bool(torch.isfinite(x).all()):
            logger.warning("DiTo.decode: the decoder (%s weights) produced non-finite values (NaN or inf)%s",
                           param_dtype, "; a float16 model overflows easily: dito_fast.fast_decode of a float32 "
                           "model with dtype=torch.float16 redoes such batches in float32"
                           if param_dtype == torch.float16 else "")
        return x.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        """encode then decode: images (B, 3, H, W) like x's, float32 (float64 for a float64 model)."""
        return self.decode(self.encode(x), **decode_kwargs)

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
        save_pretrained(self, to_dict(self.config), directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "DiTo":
        """Load a model written by :meth:`save_pretrained`, in eval mode.

        ``map_location``: the device the model is put on (a string or ``torch.device``).
        ``dtype``: the parameters' dtype; None (default) keeps the saved one (a bfloat16 model
        loads as bfloat16). Missing files, unreadable JSON or weights that do not match the config
        raise errors naming the file; a training run's directory (``dito-fast train --out``) is
        pointed to its ``model/`` export. No random init (the model is built on the meta device)
        and no draw from torch's global RNG."""
        return load_pretrained(directory, _parse_config, cls, map_location, dtype)


def _parse_config(data: dict) -> ModelConfig:
    return parse_model_config(data, ModelConfig, "dito", validate_model_config)


# --------------------------------------------------------------------------------------------
# sizes


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_gflops(config: ModelConfig, image_size: int) -> float:
    """Forward GFLOP (2 x multiply-adds) of one decoder evaluation on one image, counted on the
    meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        dec = UNetDecoder(config.decoder, config.encoder.latent_channels, config.flow.timescale)
        f = config.encoder.downsample_factor
        x = torch.empty(1, 3, image_size, image_size)
        z = torch.empty(1, config.encoder.latent_channels, image_size // f, image_size // f)
        t = torch.empty(1)
        with FlopCounterMode(display=False) as counter:
            dec(x, t, z)
    return counter.get_total_flops() / 1e9


def encoder_gflops(config: ModelConfig, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        enc = Encoder(config.encoder)
        with FlopCounterMode(display=False) as counter:
            enc(torch.empty(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


__all__ = ["DiTo", "check_images", "check_latents", "make_noise", "initial_noise", "count_parameters", "decoder_gflops",
           "encoder_gflops"]
