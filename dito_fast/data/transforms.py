"""Image <-> tensor conversion and the resize/crop/flip transform used by every dataset.

Convention for the whole package: an image tensor is float32, shape (3, H, W) (or
(N, 3, H, W) for a batch), RGB, with values in [-1, 1] (uint8 value v maps to v / 127.5 - 1).
This is the pixel space the flow-matching loss of DiTo (arXiv 2501.18593, eq. for x_t) works in.
"""

from __future__ import annotations

import errno
import io
import logging
import os
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "ImageTransform",
    "crop_params",
    "crop_params_array",
    "crop_window",
    "decode_image",
    "load_image",
    "loader_resize_size",
    "resize_crop_flip",
    "uint8_batch_to_float",
    "make_generator",
    "pil_to_tensor",
    "resize_shorter_side",
    "tensor_to_pil",
    "to_rgb",
    "to_uint8",
    "unreadable_file_error",
]

PathLike = Union[str, "os.PathLike[str]"]


class SharedEpoch:
    """The epoch a dataset seeds its per-item randomness from, kept in shared memory so that
    DataLoader worker processes, persistent ones included (forked or spawned), read the value the
    main process's ``set_epoch`` last wrote instead of the one they were created with."""

    def __init__(self, epoch: int = 0):
        self._value = torch.zeros((), dtype=torch.int64)
        try:
            self._value.share_memory_()
        except RuntimeError as e:  # no shared memory here: workers see the epoch they started with
            logger.warning("SharedEpoch: shared memory unavailable (%s); set_epoch will not reach persistent "
                           "DataLoader workers", e)
        self.set(epoch)

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))


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

    - alpha (RGBA, LA, palette with transparency, ...) is dropped: the colour channels are kept as
      stored, as torchvision's ``convert("RGB")`` loaders and DALI's RGB decoding do, so the two
      loaders (dito_fast.data.loader, dali) give the same pixels;
    - 16-bit integer greyscale ("I;16*") is scaled to 8 bits (65535 -> 255); 32-bit ("I") the
      same when the image's maximum is above 255, else taken as 8-bit values (so the scale
      depends on the image: a PNG of mode I holding 0..256 comes out nearly black);
      float greyscale ("F") is taken as [0, 1] when its maximum is <= 1, else as [0, 255];
    - everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's own conversion.
    """
    if img.mode == "RGB":
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


# OSError numbers that say the process, not the file, is in trouble (out of file descriptors or
# memory): such an error must not get a good file skipped as unreadable.
_PROCESS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def unreadable_file_error(e: BaseException) -> bool:
    """Whether ``e``, raised while reading or decoding one image file, means that file is
    unusable (missing, unreadable, not an image, corrupt or truncated), so that a loader skips
    and counts it. PIL's decoders raise many kinds of exception on damaged data (OSError,
    SyntaxError, EOFError, ValueError, but also TypeError, IndexError, struct.error, ...), so any
    ``Exception`` counts, except those about the process: MemoryError and the OSErrors of
    ``_PROCESS_ERRNOS`` ("Too many open files", ...), which propagate."""
    if not isinstance(e, Exception) or isinstance(e, MemoryError):
        return False
    return not (isinstance(e, OSError) and e.errno in _PROCESS_ERRNOS)


def _open_verified(open_stream, name: str) -> Image.Image:
    """Decode the image that ``open_stream()`` yields (a fresh stream per call) fully into memory.
    Raises ValueError naming ``name`` for an unusable file (``unreadable_file_error``); errors
    about the process propagate unchanged."""
    try:
        # verify() catches structural damage (e.g. bad PNG chunk CRCs) without decoding;
        # it leaves the file unusable, hence the second open, whose load() decodes every
        # pixel and catches truncation.
        with Image.open(open_stream()) as img:
            img.verify()
        with Image.open(open_stream()) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except Exception as e:
        if not unreadable_file_error(e):
            raise
        raise ValueError(f"cannot read image file {name}: {type(e).__name__}: {e}") from e


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
    return _open_verified(lambda: path, path)


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Like :func:`load_image` for an encoded image held in memory (e.g. a tar member).

    Raises:
        ValueError: not an image, or a corrupt/truncated one (the message names ``name``).
    """
    return _open_verified(lambda: io.BytesIO(data), name)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased when shrinking) so that min(H, W) == size, keeping aspect: to
    the loaders' :func:`loader_resize_size`, so that ``evaluate``, ``encode`` and the training
    loaders' validation crops agree (Python's round had taken exact halves to even: 512 x 769 at
    256 gave 256 x 384 here and 256 x 385 there). ValueError for an image thinner than
    ``MAX_ASPECT_RATIO`` that needs resizing."""
    w, h = img.size
    new_w, new_h = loader_resize_size(w, h, size)
    if (new_w, new_h) == (w, h):
        return img
    problem = aspect_ratio_problem(w, h)
    if problem is not None:
        raise ValueError(problem)
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


# --------------------------------------------------------------------------------------------
# The loaders' transform (dito_fast.data.loader): resize shorter side, crop, flip.
#
# Written so that a DALI pipeline can compute exactly the same geometry in float32 graph
# arithmetic (dito_fast/data/dali.py): the resized size, the crop offsets and the flip are the same
# integers in both loaders; only the pixel values differ by the decoders' and resamplers' rounding.


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def crop_params_array(seed: int, epochs, indices, hflip: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample random crop position and flip of the loaders, vectorised.

    Sample ``indices[j]`` read in epoch ``epochs[j]`` gets (u_x[j], u_y[j], flip[j]): u_x, u_y are
    float32 multiples of 2^-24 in [0, 1) that place the crop window (see :func:`crop_window`),
    flip is a left-right flip with p = 0.5 (never when ``hflip`` is False). They are a hash of
    (seed, epoch, index), so any process, in any order, computes the same values.
    """
    e = np.asarray(epochs, dtype=np.int64).astype(np.uint64)
    i = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    if np.any(np.asarray(epochs) < 0) or np.any(np.asarray(indices) < 0) or int(seed) < 0:
        raise ValueError("seed, epochs and indices must be non-negative")
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(_splitmix64(np.full(e.shape, int(seed), np.uint64)) ^ e) ^ i)
        draws = [(_splitmix64(key ^ np.uint64(k)) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
                 for k in (1, 2, 3)]
    flip = (draws[2] < 0.5) if hflip else np.zeros(e.shape, bool)
    return draws[0], draws[1], flip


def crop_params(seed: int, epoch: int, index: int, hflip: bool = True) -> Tuple[float, float, bool]:
    """:func:`crop_params_array` for one sample: (u_x, u_y, flip)."""
    u_x, u_y, flip = crop_params_array(seed, [epoch], [index], hflip)
    return float(u_x[0]), float(u_y[0]), bool(flip[0])


def loader_resize_size(w: int, h: int, size: int) -> Tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``, keeping the aspect ratio.

    The longer side is floor(long * size / short + 0.5) evaluated in float32 (as the DALI graph
    does), never below ``size``; this equals round(long * size / short) except at exact ties.
    """
    f32 = np.float32
    if w <= h:
        return size, max(size, int(np.floor(f32(h) * f32(size) / f32(w) + f32(0.5))))
    return max(size, int(np.floor(f32(w) * f32(size) / f32(h) + f32(0.5)))), size


def crop_window(w: int, h: int, size: int, u_x: Optional[float] = None,
                u_y: Optional[float] = None) -> Tuple[int, int]:
    """(left, top) of a ``size`` x ``size`` window in a w x h image.

    With ``u_x``/``u_y`` in [0, 1): left = min(floor(u_x * (w - size + 1)), w - size) in float32
    arithmetic, uniform over all valid offsets (likewise top); None means centred:
    (w - size) // 2.
    """
    f32 = np.float32

    def offset(extent: int, u: Optional[float]) -> int:
        room = extent - size
        if room < 0:
            raise ValueError(f"image side {extent} is smaller than the crop size {size}")
        if u is None:
            return room // 2
        return min(int(np.floor(f32(u) * f32(room + 1))), room)

    return offset(w, u_x), offset(h, u_y)


# The loaders resize a whole image before cropping it (as DALI's graph does), so a thin one costs
# its aspect ratio times size^2 pixels: a 4 KB PNG of 1 x 1,000,000 pixels would be resized to
# 256 x 256,000,000 (a MemoryError that stopped training). Longer / shorter side beyond this is
# refused as an unusable image, by the screening (both loaders), resize_crop_flip and
# resize_shorter_side (evaluate, fid, encode), where it is skipped and counted as unreadable.
MAX_ASPECT_RATIO = 64


def aspect_ratio_problem(w: int, h: int) -> Optional[str]:
    """Why a w x h image is too thin for the loaders (see ``MAX_ASPECT_RATIO``), or None."""
    if max(w, h) <= MAX_ASPECT_RATIO * min(w, h):
        return None
    return (f"its aspect ratio {max(w, h) / max(min(w, h), 1):.1f}:1 ({w} x {h} pixels) is beyond "
            f"{MAX_ASPECT_RATIO}:1 (images are resized whole before they are cropped)")


def resize_crop_flip(img: Image.Image, size: int, params: Optional[Tuple[float, float, bool]] = None) -> np.ndarray:
    """The loaders' per-image transform: RGB PIL image -> uint8 array (size, size, 3).

    Resize (bicubic, antialiased when shrinking) to :func:`loader_resize_size`, crop the window
    of :func:`crop_window` (``params`` = (u_x, u_y, flip) from :func:`crop_params`; None means a
    center crop without flip), then flip left-right if asked.

    Raises:
        ValueError: the image is thinner than ``MAX_ASPECT_RATIO`` allows.
    """
    problem = aspect_ratio_problem(*img.size)
    if problem is not None:
        raise ValueError(problem)
    img = to_rgb(img)
    w, h = img.size
    new_w, new_h = loader_resize_size(w, h, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    u_x, u_y, flip = params if params is not None else (None, None, False)
    left, top = crop_window(new_w, new_h, size, u_x, u_y)
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(img, dtype=np.uint8)  # a writable copy


def uint8_batch_to_float(x: torch.Tensor, memory_format: str = "contiguous") -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (v / 127.5 - 1).

    ``memory_format``: "contiguous" (NCHW in memory) or "channels_last" (NHWC in memory, the
    same logical shape; no copy of the channel order is needed).
    """
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2)  # a channels_last view
    if memory_format == "contiguous":
        x = x.contiguous()
    elif memory_format != "channels_last":
        raise ValueError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)
