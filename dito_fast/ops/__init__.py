"""Fused ops with several backends (DESIGN.md §3). The models call these, never a backend directly.

Every op has ``ref`` (plain PyTorch, the specification); the C++ (CPU), CUDA and Triton backends
and, for attention, SDPA and xformers plug into the same dispatchers (:func:`available_backends`).
"""

from .attention import attention, attention_ref
from ._cpp import opmath_dtype
from .conv3x3 import Conv3x3, clear_filter_cache, conv3x3, conv3x3_ref, conv_activation_format, memory_format_of
from .fm import fm_loss, fm_loss_ref, fm_noise, fm_noise_ref
from .group_norm_modulate_silu import group_norm_modulate_silu, group_norm_modulate_silu_ref
from .latent_layernorm import latent_layernorm, latent_layernorm_ref

__all__ = [
    "Conv3x3", "attention", "attention_ref", "clear_filter_cache", "conv3x3", "conv3x3_ref", "conv_activation_format",
    "fm_loss", "fm_loss_ref", "fm_noise", "fm_noise_ref",
    "group_norm_modulate_silu", "group_norm_modulate_silu_ref", "latent_layernorm", "latent_layernorm_ref",
    "memory_format_of", "opmath_dtype",
]


def available_backends() -> dict[str, list[str]]:
    """Backend names registered per op, in priority order."""
    import importlib

    mod = lambda name: importlib.import_module(f"{__name__}.{name}")  # noqa: E731 (functions shadow modules)
    return {
        "attention": [b.name for b in mod("attention")._BACKENDS],
        "conv3x3": [b.name for b in mod("conv3x3")._BACKENDS],
        "fm_noise": [b.name for b in mod("fm")._NOISE_BACKENDS],
        "fm_loss": [b.name for b in mod("fm")._LOSS_BACKENDS],
        "group_norm_modulate_silu": [b.name for b in mod("group_norm_modulate_silu")._BACKENDS],
        "latent_layernorm": [b.name for b in mod("latent_layernorm")._BACKENDS],
    }
