"""PNG grids of samples, labelled by row, with no dependency beyond Pillow."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] images in [-1, 1] to [N, H, W, C] uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, zoom: int = 4, label_width: int = 260) -> Path:
    """One row per (label, images[N, C, H, W]); images are upscaled ``zoom`` times with nearest neighbours."""
    if not rows:
        raise ValueError("rows must not be empty")
    cols = max(imgs.shape[0] for _, imgs in rows)
    h, w = rows[0][1].shape[-2:]
    cell_h, cell_w, pad = h * zoom, w * zoom, 2
    canvas = Image.new("RGB", (label_width + cols * (cell_w + pad), len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c, arr in enumerate(to_uint8(imgs)):
            tile = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_width + c * (cell_w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
