"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG16 variant, version 0.1: the perceptual distance tokenizer papers report next to
PSNR and SSIM.

Both images pass through VGG16's convolutional layers; at the five taps (relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3) each position's feature vector is scaled to unit length, the squared
difference is weighted per channel by a calibrated linear layer, averaged over positions, and the
five layers are summed.

No weights ship with the package and nothing is downloaded: :meth:`LPIPS.from_files` takes
torchvision's ImageNet VGG16 (``vgg16-397923af.pth``) and the ``lpips`` package's calibrated
layers (``lpips/weights/v0.1/vgg.pth``; v0.0's file has the same names and shapes but other
values, and cannot be told apart), both read with ``weights_only=True`` (or safetensors copies
with the same names).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import check_unit_range

logger = logging.getLogger(__name__)

# VGG16's convolutions: (index in torchvision's ``features``, in channels, out channels)
_VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
                (28, 512, 512))
_POOLS = (4, 9, 16, 23)  # 2x2 max pools between the stages
_TAPS = (3, 8, 15, 22, 29)  # the ReLUs whose outputs are compared
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1's input scaling: (x - shift) / scale for x in [-1, 1] (ImageNet's mean and std there)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """``LPIPS()(x, y)`` -> (B,) float32 distances between images x, y (B, 3, H, W) in [-1, 1]
    (0 for identical images; ~0.1-0.7 between unrelated ones). H, W >= 16 (four 2x2 pools).

    Module names: ``features.<i>`` as torchvision's ``vgg16().features``, ``lin<k>`` for the
    calibrated layers (weights (1, C_k, 1, 1), non-negative). Built with random weights: use
    :meth:`from_files`.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, 3, padding=1) for i, cin, cout in _VGG16_CONVS})
        for k, c in enumerate(TAP_CHANNELS):
            self.register_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """VGG16's five tap activations of images x (B, 3, H, W) in [-1, 1]."""
        h = (x.float() - self.shift) / self.scale
        out = []
        for i in range(_TAPS[-1] + 1):
            if str(i) in self.features:
                h = F.relu(self.features[str(i)](h))
            elif i in _POOLS:
                h = F.max_pool2d(h, 2)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS: expected x and y of one shape (B, 3, H, W), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS: images must be at least 16x16, got {tuple(x.shape)}")
        check_unit_range("LPIPS", "x", x)
        check_unit_range("LPIPS", "y", y)
        total = 0.0
        for k, f in enumerate(self.taps(torch.cat([x, y]).to(self.shift.device))):
            f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)  # unit length per position
            a, b = f.chunk(2)
            total = total + getattr(self, f"lin{k}")((a - b).square()).mean((1, 2, 3))
        return total

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike,
                   map_location: str | torch.device = "cpu") -> "LPIPS":
        """LPIPS with torchvision's VGG16 weights (``vgg16-397923af.pth``; its classifier is
        ignored) and the ``lpips`` package's v0.1 calibration (``vgg.pth``: ``lin<k>.model.1.weight``).
        Names and shapes are checked."""
        from ..models._pretrained import state_mismatch
        from ._weights import read_state_dict

        model = cls()
        state = {}
        vgg = read_state_dict(vgg_path, "VGG16 weights (torchvision's vgg16-397923af.pth)")
        state.update({k: v for k, v in vgg.items() if k.startswith("features.")})
        lin = read_state_dict(lin_path, "LPIPS layers (the lpips package's weights/v0.1/vgg.pth)")
        for k in range(len(TAP_CHANNELS)):
            for name in (f"lin{k}.model.1.weight", f"lin{k}.weight"):  # the lpips package's names, or ours
                if name in lin:
                    state[f"lin{k}.weight"] = lin[name]
        problem = state_mismatch(model, state)
        if problem:
            raise ValueError(f"LPIPS weights {vgg_path} + {lin_path} do not match VGG16 / LPIPS v0.1: {problem}")
        model.load_state_dict(state)
        logger.info("LPIPS: loaded %s and %s", vgg_path, lin_path)
        return model.to(map_location).eval()
