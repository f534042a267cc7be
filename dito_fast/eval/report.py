"""Writing images and grids to disk."""

from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) float in [-1, 1] -> uint8 in [0, 255] (rounded, clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack equally-shaped batches (B, 3, H, W) as rows of one image (3, R*(H+pad), B*(W+pad))."""
    B, C, H, W = rows[0].shape
    grid = torch.ones(C, len(rows) * (H + pad) + pad, B * (W + pad) + pad)
    for r, batch in enumerate(rows):
        for c in range(B):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            grid[:, y:y + H, x:x + W] = batch[c].detach().float().cpu()
    return grid


def save_image(x: torch.Tensor, path) -> None:
    """Save one image (3, H, W) in [-1, 1] as PNG (or any format PIL infers from the suffix),
    atomically (a temporary file renamed into place: never a truncated image)."""
    from PIL import Image

    from ..train.checkpoint import atomic_write

    arr = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell an image format from the file name {path}")
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt))
