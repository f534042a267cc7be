"""Procedurally generated images, so the package can train and be tested with no data at all.

Each image is a deterministic function of (seed, index): a background (linear or radial colour
gradient, or a texture: smoothed noise, stripes, checkerboard), then a few layers of geometric
shapes (filled / outlined / translucent / textured), lines and rendered text. It is drawn at
twice the output resolution and box-downsampled, which gives antialiased edges: the mix of flat
regions, smooth ramps, sharp edges, thin strokes, text and fine texture exercises what an image
tokenizer has to reconstruct.

Fonts: Pillow's built-in scalable font plus, when present, DejaVu TrueType fonts from
matplotlib's data folder or the usual system font folders. The set of fonts found therefore
changes the pictures from one machine to another; on a given machine they are reproducible.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
import string
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from .transforms import pil_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["SyntheticImages", "find_fonts"]

_CHARACTERS = string.ascii_letters + string.digits
_FONT_FAMILIES = ("DejaVu", "Liberation", "FreeSans", "FreeSerif", "FreeMono")
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
              "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
_MAX_FONT_FILES = 8  # each (file, size) pair held open costs a FreeType face per worker


def find_fonts(max_fonts: int = _MAX_FONT_FILES) -> List[str]:
    """Paths of up to ``max_fonts`` TrueType fonts (DejaVu and similar families), sorted.

    Looks in matplotlib's bundled fonts (found without importing matplotlib) and in common
    system folders. Returns [] when none exist; nothing here requires them.
    """
    dirs = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf"))
    dirs += [os.path.expanduser(d) for d in _FONT_DIRS]
    found: Dict[str, str] = {}  # file name -> first path, so one family is not counted twice
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for path in sorted(glob.glob(os.path.join(d, "**", "*.[tT][tT][fF]"), recursive=True)):
            name = os.path.basename(path)
            # Skip symbol/maths fonts: their glyphs for letters are not letters.
            if name.startswith(_FONT_FAMILIES) and "Math" not in name and name not in found:
                found[name] = path
    paths = [found[name] for name in sorted(found)]
    if len(paths) > max_fonts:  # an evenly spread subset keeps the mix of styles
        paths = [paths[round(i * (len(paths) - 1) / (max_fonts - 1))] for i in range(max_fonts)]
    return paths


def _color(rng: np.random.Generator, alpha: bool = False) -> tuple:
    """A random RGB (or RGBA, mostly opaque) colour as a tuple of ints."""
    rgb = tuple(int(c) for c in rng.integers(0, 256, 3))
    if not alpha:
        return rgb
    return rgb + (255 if rng.random() < 0.6 else int(rng.integers(90, 230)),)


def _mix(t: np.ndarray, c0: tuple, c1: tuple) -> np.ndarray:
    """Blend two RGB colours with weights t (H, W) in [0, 1] -> float32 (H, W, 3) in [0, 255]."""
    c0 = np.asarray(c0[:3], np.float32)
    c1 = np.asarray(c1[:3], np.float32)
    return c0 + t.astype(np.float32, copy=False)[..., None] * (c1 - c0)


class SyntheticImages(Dataset):
    """``num_images`` procedurally drawn images, float32 (3, size, size) in [-1, 1].

    Args:
        num_images: dataset length.
        size: output side in pixels (drawn at 2 * size, then 2x2 box-averaged).
        seed: image ``i`` is a deterministic function of (seed, i); no state between items.

    ``render(i)`` gives the same image as an RGB PIL image. ``set_epoch`` exists for a common
    dataset interface and changes nothing (an index always renders the same picture).
    """

    def __init__(self, num_images: int, size: int, seed: int = 0):
        if int(num_images) < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if int(size) < 4:
            raise ValueError(f"size must be at least 4, got {size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_images = int(num_images)
        self.size = int(size)
        self.seed = int(seed)
        self.font_paths = find_fonts()
        r = 2 * self.size
        # Pixel-centre coordinate grids of the 2x canvas, shared by every gradient and texture.
        self._ys, self._xs = np.mgrid[0:r, 0:r].astype(np.float32) + 0.5
        # Text sizes: a few values from ~1/14 to ~1/2.5 of the canvas, so few fonts are cached.
        self._font_sizes = sorted({max(6, round(r / d)) for d in (14, 10, 7, 5, 3.5, 2.5)})
        self._fonts: Dict[Tuple[int, int], ImageFont.ImageFont] = {}
        self._fonts_pid = os.getpid()

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"SyntheticImages(num_images={self.num_images}, size={self.size}, seed={self.seed}, "
                f"fonts={len(self.font_paths) + 1})")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fonts"] = {}  # FreeType faces are rebuilt in each process
        return state

    def set_epoch(self, epoch: int) -> None:
        """No-op: synthetic images do not depend on the epoch."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return pil_to_tensor(self.render(index))

    # ------------------------------------------------------------------ composition

    def render(self, index: int) -> Image.Image:
        """The RGB PIL image (size x size) for ``index``."""
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        rng = np.random.default_rng([self.seed, index])
        r = 2 * self.size

        u = rng.random()
        if u < 0.4:
            background = self._linear_gradient(rng)
        elif u < 0.7:
            background = self._radial_gradient(rng)
        else:
            background = self._texture(rng)
        if rng.random() < 0.3:  # film-grain-like noise on the background
            grain = rng.standard_normal(background.shape, dtype=np.float32)
            background = background + grain * rng.uniform(2, 10)
        canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")

        for _ in range(int(rng.integers(2, 9))):
            u = rng.random()
            if u < 0.5:
                self._draw_shape(canvas, rng, r)
            elif u < 0.65:
                self._draw_lines(canvas, rng, r)
            elif u < 0.88:
                self._draw_text(canvas, rng, r)
            else:
                self._draw_textured_shape(canvas, rng, r)
        return canvas.reduce(2)  # 2x2 box average: antialiased edges

    # ------------------------------------------------------------------ backgrounds

    def _linear_gradient(self, rng: np.random.Generator) -> np.ndarray:
        theta = rng.uniform(0, 2 * math.pi)
        t = self._xs * math.cos(theta) + self._ys * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        if rng.random() < 0.5:  # three colour stops instead of two
            mid = rng.uniform(0.25, 0.75)
            c0, c1, c2 = _color(rng), _color(rng), _color(rng)
            lo = _mix(np.clip(t / mid, 0, 1), c0, c1)
            hi = _mix(np.clip((t - mid) / (1 - mid), 0, 1), c1, c2)
            return np.where((t < mid)[..., None], lo, hi)
        return _mix(t, _color(rng), _color(rng))

    def _radial_gradient(self, rng: np.random.Generator) -> np.ndarray:
        r = 2 * self.size
        cx, cy = (float(v) for v in rng.uniform(-0.25, 1.25, 2) * r)
        d = np.hypot(self._xs - cx, self._ys - cy)
        t = np.clip(d * (1.0 / (rng.uniform(0.4, 1.5) * r)), 0, 1) ** rng.uniform(0.5, 2.0)
        return _mix(t, _color(rng), _color(rng))

    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        """Float (R, R, 3) in [0, 255]: smoothed noise, stripes or a checkerboard."""
        r = 2 * self.size
        kind = int(rng.integers(0, 3))
        if kind == 0:  # value noise: a coarse random grid, bicubic-upsampled
            k = int(rng.integers(2, 17))
            if rng.random() < 0.5:  # free colours
                grid = rng.integers(0, 256, (k, k, 3), dtype=np.uint8)
                return np.asarray(Image.fromarray(grid, "RGB").resize((r, r), Image.Resampling.BICUBIC),
                                  dtype=np.float32)
            grid = rng.integers(0, 256, (k, k), dtype=np.uint8)  # between two colours
            t = np.asarray(Image.fromarray(grid, "L").resize((r, r), Image.Resampling.BICUBIC),
                           dtype=np.float32) / 255.0
            return _mix(t, _color(rng), _color(rng))
        theta = rng.uniform(0, math.pi)
        u = self._xs * math.cos(theta) + self._ys * math.sin(theta)
        period = rng.uniform(4, max(4.0, r / 3))  # images under 6 pixels: a 4-pixel period
        if kind == 1:  # stripes, soft (sine) or hard (square wave)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
            if rng.random() < 0.5:
                t = (t > 0.5).astype(np.float32)
        else:  # checkerboard, possibly rotated
            v = -self._xs * math.sin(theta) + self._ys * math.cos(theta)
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        return _mix(t, _color(rng), _color(rng))

    # ------------------------------------------------------------------ layers

    @staticmethod
    def _box(rng: np.random.Generator, r: int) -> List[float]:
        """A random box [x0, y0, x1, y1] from 1/10 to 3/4 of the canvas, maybe partly outside."""
        w, h = rng.uniform(0.1, 0.75, 2) * r
        x0, y0 = rng.uniform(-0.1 * r, r - 0.5 * w), rng.uniform(-0.1 * r, r - 0.5 * h)
        return [float(x0), float(y0), float(x0 + w), float(y0 + h)]

    @staticmethod
    def _polygon(rng: np.random.Generator, box: List[float]) -> List[Tuple[float, float]]:
        """3-9 vertices at sorted angles around the box centre (star-like when radii vary)."""
        n = int(rng.integers(3, 10))
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.3, 1.0, n) if rng.random() < 0.5 else np.ones(n)
        return [(float(cx + rx * q * math.cos(a)), float(cy + ry * q * math.sin(a)))
                for a, q in zip(angles, radii)]

    def _shape_on(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: int,
                  fill, outline, width: int) -> None:
        """Draw one random shape with the given fill/outline on ``draw``."""
        box = self._box(rng, r)
        kind = int(rng.integers(0, 6))
        if kind == 0:
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        elif kind == 1:
            # integer corners: Pillow's rounded_rectangle can reject float boxes after rounding
            ibox = [int(round(v)) for v in box]
            ibox[2], ibox[3] = max(ibox[2], ibox[0] + 2), max(ibox[3], ibox[1] + 2)
            radius = int(rng.uniform(0.05, 0.5) * min(ibox[2] - ibox[0], ibox[3] - ibox[1]))
            draw.rounded_rectangle(ibox, radius=radius, fill=fill, outline=outline, width=width)
        elif kind == 2:
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind == 3:
            draw.polygon(self._polygon(rng, box), fill=fill, outline=outline, width=width)
        elif kind == 4:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            radius = (box[2] - box[0]) / 2
            draw.regular_polygon((cx, cy, radius), int(rng.integers(3, 9)),
                                 rotation=float(rng.uniform(0, 360)), fill=fill, outline=outline,
                                 width=width)
        else:
            start = float(rng.uniform(0, 360))
            end = start + float(rng.uniform(40, 320))
            draw.pieslice(box, start, end, fill=fill, outline=outline, width=width)

    def _draw_shape(self, canvas: Image.Image, rng: np.random.Generator, r: int) -> None:
        draw = ImageDraw.Draw(canvas, "RGBA")  # RGBA mode: translucent colours blend
        style = rng.random()
        fill = None if style < 0.2 else _color(rng, alpha=True)
        outline = _color(rng, alpha=True) if style < 0.6 else None
        width = int(rng.integers(1, max(2, r // 16)))
        self._shape_on(draw, rng, r, fill, outline, width)

    def _draw_lines(self, canvas: Image.Image, rng: np.random.Generator, r: int) -> None:
        draw = ImageDraw.Draw(canvas, "RGBA")
        points = [tuple(float(v) for v in rng.uniform(-0.1, 1.1, 2) * r)
                  for _ in range(int(rng.integers(2, 6)))]
        width = int(rng.integers(1, max(2, r // 12)))
        draw.line(points, fill=_color(rng, alpha=True), width=width, joint="curve")

    def _draw_textured_shape(self, canvas: Image.Image, rng: np.random.Generator, r: int) -> None:
        texture = Image.fromarray(np.clip(self._texture(rng), 0, 255).astype(np.uint8), "RGB")
        mask = Image.new("L", (r, r), 0)
        self._shape_on(ImageDraw.Draw(mask), rng, r, fill=255, outline=None, width=1)
        canvas.paste(texture, (0, 0), mask)

    def _font(self, rng: np.random.Generator) -> ImageFont.ImageFont:
        # A forked DataLoader worker must not share FreeType faces (and their file handles)
        # with its parent, so the cache is per process.
        if self._fonts_pid != os.getpid():
            self._fonts, self._fonts_pid = {}, os.getpid()
        key = (int(rng.integers(0, len(self.font_paths) + 1)),
               self._font_sizes[int(rng.integers(0, len(self._font_sizes)))])
        font = self._fonts.get(key)
        if font is None:
            font = self._load_font(*key)
            self._fonts[key] = font
        return font

    def _load_font(self, font_id: int, size: int) -> ImageFont.ImageFont:
        """Font ``font_id`` (0 = Pillow's built-in, i = font_paths[i-1]) at ``size`` pixels."""
        if font_id > 0:
            path = self.font_paths[font_id - 1]
            try:
                return ImageFont.truetype(path, size)
            except OSError as e:
                logger.warning("cannot load font %s (%s); using Pillow's default font", path, e)
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed bitmap font
            return ImageFont.load_default()

    def _draw_text(self, canvas: Image.Image, rng: np.random.Generator, r: int) -> None:
        font = self._font(rng)
        text = "".join(rng.choice(list(_CHARACTERS), int(rng.integers(1, 11))))
        x, y = (float(v) for v in rng.uniform(-0.15, 0.85, 2) * r)
        fill = _color(rng, alpha=True)
        stroke = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
        stroke_fill = _color(rng) if stroke else None
        if rng.random() < 0.25:  # rotated: draw on a small transparent layer, rotate, composite
            x0, y0, x1, y1 = font.getbbox(text, stroke_width=stroke)
            layer = Image.new("RGBA", (max(1, int(x1 - x0)), max(1, int(y1 - y0))), (0, 0, 0, 0))
            ImageDraw.Draw(layer).text((-x0, -y0), text, font=font, fill=fill,
                                       stroke_width=stroke, stroke_fill=stroke_fill)
            layer = layer.rotate(float(rng.uniform(-90, 90)), Image.Resampling.BILINEAR, expand=True)
            canvas.paste(layer, (int(x), int(y)), layer)
        else:
            ImageDraw.Draw(canvas, "RGBA").text((x, y), text, font=font, fill=fill,
                                                stroke_width=stroke, stroke_fill=stroke_fill)
