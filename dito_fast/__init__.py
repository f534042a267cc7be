"""dito_fast: DiTo diffusion-autoencoder image tokenizers (Chen et al., arXiv 2501.18593).

Public surface::

    model = dito_fast.DiTo.from_preset("dito-B")          # or DiTo.from_pretrained(dir)
    z = model.encode(x)                                    # x: (B, 3, H, W) in [-1, 1]
    x_hat = model.decode(z, steps=50, sampler="euler", seed=0)
    images = dito_fast.fast_decode(model, z, seed=0)       # uint8 (B, 3, H, W)
    dito_fast.keep_freed_memory()                          # once, in a CPU service (see dito_fast.allocator)
    dit = dito_fast.DiT.from_preset("DiT-B/2", latent_size=32) # the downstream latent diffusion model
"""

from __future__ import annotations

from .allocator import keep_freed_memory
from .config import PRESETS, ModelConfig, RunConfig, get_preset
from .decode import fast_decode
from .models.dit import DiT, DiTConfig
from .models.dito import DiTo

__version__ = "0.1.0"


def load(directory, map_location="cpu", dtype=None) -> DiTo:
    """Load a model saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``), in
    eval mode, on ``map_location``, in ``dtype`` (None: the saved one); see DiTo.from_pretrained."""
    return DiTo.from_pretrained(directory, map_location=map_location, dtype=dtype)


def encode(model: DiTo, x):
    """``model.encode(x)`` without gradients: (B, 3, H, W) in [-1, 1] -> (B, c, H/f, W/f), an
    ordinary tensor (usable in autograd, e.g. to train a latent model on it, and in place)."""
    import torch

    with torch.inference_mode():  # inference mode: the convolutions' transformed filters are cached
        z = model.encode(x)
    return z.clone()  # outside inference mode: not an inference tensor


presets = PRESETS

__all__ = ["DiTo", "DiT", "DiTConfig", "ModelConfig", "RunConfig", "PRESETS", "presets", "get_preset", "fast_decode", "load",
           "encode", "keep_freed_memory", "__version__"]
