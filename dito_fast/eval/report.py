"""Writing images and grids to disk."""

from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) float in [-1, 1] -> uint8 in [0, 255] (rounded, clamped; NaN -> 0,
    explicitly: a NaN float-to-integer cast is undefined)."""
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects floating images in [-1, 1], got {x.dtype}")
    return ((x.detach().float().nan_to_num(-1.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack equally-shaped batches (B, 3, H, W) as rows of one image
    (3, R*(H+pad)+pad, B*(W+pad)+pad)."""
    if not rows or any(r.dim() != 4 or r.shape != rows[0].shape for r in rows):
        raise ValueError(f"make_grid expects one or more batches of one shape (B, C, H, W), got "
                         f"{[tuple(r.shape) for r in rows]}")
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

    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects one image (3, H, W) or (1, H, W), got shape {tuple(x.shape)}")
    arr = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]  # grey
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell an image format from the file name {path}")
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt))
