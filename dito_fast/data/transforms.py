"""Image <-> tensor conversion and the resize/crop/flip transform used by every dataset.

Convention for the whole package: an image tensor is float32, shape (3, H, W) (or
(N, 3, H, W) for a batch), RGB, with values in [-1, 1] (uint8 value v maps to v / 127.5 - 1).
This is the pixel space the flow-matching loss of DiTo (arXiv 2501.18593, eq. for x_t) works in.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "ImageTransform",
    "load_image",
    "make_generator",
    "pil_to_tensor",
    "resize_shorter_side",
    "tensor_to_pil",
    "to_rgb",
    "to_uint8",
]

# Modes whose pixels carry an alpha channel; they are composited onto white.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

PathLike = Union[str, "os.PathLike[str]"]


def make_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a tuple of non-negative ints.

    Used for per-item randomness, e.g. ``make_generator(seed, epoch, index)``: the same keys give
    the same stream in any process, and nearby keys give unrelated streams (numpy's
    SeedSequence hashes the tuple, so (0, 1, 2) and (0, 2, 1) do not collide).
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"generator keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]))
    return generator


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    - alpha (RGBA, LA, palette with transparency, ...) is composited onto a white background;
    - 16-bit / 32-bit integer greyscale ("I;16*", "I") is scaled to 8 bits (65535 -> 255);
      float greyscale ("F") is taken as [0, 1] when its maximum is <= 1, else as [0, 255];
    - everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's own conversion.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif img.mode == "F" and arr.size and arr.max() <= 1.0:
            scale = 255.0
        elif img.mode == "I" and arr.size and arr.max() > 255:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, H x W) -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float image tensor in [-1, 1] -> uint8 numpy array, channels last.

    Args:
        x: (3, H, W) or (N, 3, H, W), any float dtype, any device. Values outside [-1, 1] are
            clamped; NaN is treated as -1 (black).
    Returns:
        (H, W, 3) or (N, H, W, 3) uint8, v = round((x + 1) * 127.5).
    """
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=-1.0)
    v = ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return v.movedim(-3, -1).contiguous().numpy()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float image tensor (3, H, W) in [-1, 1] -> RGB PIL image (rounded and clamped)."""
    if x.dim() != 3:
        raise ValueError(f"expected a single (3, H, W) image, got shape {tuple(x.shape)}")
    return Image.fromarray(to_uint8(x), mode="RGB")


def load_image(path: PathLike) -> Image.Image:
    """Read an image file fully into memory as an RGB PIL image.

    EXIF orientation is applied; only the first frame of an animated file is used.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is a directory, not an image, or a corrupt/truncated image.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"expected an image file, got a directory: {path}")
    try:
        # verify() catches structural damage (e.g. bad PNG chunk CRCs) without decoding;
        # it leaves the file unusable, hence the second open, whose load() decodes every
        # pixel and catches truncation.
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased when shrinking) so that min(H, W) == size, keeping aspect."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    # PIL widens the bicubic kernel by the shrink factor, i.e. it antialiases.
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _randint(high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


class ImageTransform:
    """Resize the shorter side to ``size``, crop ``size`` x ``size``, optionally flip.

    Args:
        size: output side in pixels.
        crop: "center" or "random" (uniform over all valid offsets).
        hflip: flip left-right with probability 0.5.

    Calling ``transform(img, generator=None)`` on a PIL image of any mode returns a float32
    tensor (3, size, size) in [-1, 1]. All randomness comes from ``generator`` (a CPU
    ``torch.Generator``; None uses torch's global generator), drawn in the order: crop left,
    crop top, flip.
    """

    def __init__(self, size: int, crop: str = "center", hflip: bool = False):
        if int(size) < 1:
            raise ValueError(f"size must be a positive integer, got {size}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.size = int(size)
        self.crop = crop
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop={self.crop!r}, hflip={self.hflip})"

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        img = resize_shorter_side(to_rgb(img), self.size)
        w, h = img.size
        if self.crop == "random":
            left = _randint(w - self.size + 1, generator)
            top = _randint(h - self.size + 1, generator)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)
