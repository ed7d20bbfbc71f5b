"""The demo's figure: what the default does, readable at a glance.

One figure per model family. Each sampler gets a row of three groups of the same few seeded images: full CFG, the
default, and full CFG on as many steps as the default computes ("fewer steps at the same NFE", the honest baseline).
Each group is captioned with its steps, NFE per image and PSNR against full CFG; under the two cheap groups their
difference to full CFG, amplified and in a heat colour map, shows which one stays closer without zooming in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont

from .images import to_uint8
from .metrics import PSNR_CAP

#: How the figure names the lab's sampler variants (A1111's names).
SAMPLER_TITLES = {"euler": "Euler", "euler_ancestral": "Euler a", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddim_eta1": "DDIM, eta 1"}
#: Column headers of the three groups.
GROUP_TITLES = ("full CFG", "the default", "fewer steps, same NFE")
#: The colour map of the difference images (black: identical).
DIFFERENCE_COLOURS = "inferno"
#: The caption colour of the cheap group closer to full CFG.
HIGHLIGHT = (0, 120, 40)

_MARGIN, _PAD, _GROUP_GAP, _ROW_GAP = 18, 4, 30, 22
_TEXT, _CAPTION, _TITLE, _NOTE = 22, 19, 26, 17
_DARK, _GREY = (20, 20, 20), (105, 105, 105)


@dataclass(frozen=True)
class Group:
    """One group of a sampler's row: the images shown (``[N, C, H, W]`` in [-1, 1]), the run's step count, its NFE per
    image and its mean PSNR against full CFG over all the run's images (None for full CFG itself)."""

    images: torch.Tensor
    steps: int
    nfe: float
    psnr: float | None = None


@dataclass(frozen=True)
class SamplerRow:
    """One sampler's row: full CFG, the default and fewer steps at the default's NFE, on the same seeds."""

    title: str
    full: Group
    default: Group
    fewer: Group

    @property
    def groups(self) -> tuple[Group, Group, Group]:
        return self.full, self.default, self.fewer


def pick_images(labels: Sequence[int], count: int) -> list[int]:
    """Indices of ``count`` images with distinct labels spread over the labels present (the first image of each),
    so that a few images show different digits."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    first: dict[int, int] = {}
    for index, label in enumerate(labels):
        first.setdefault(int(label), index)
    if count > len(first):
        raise ValueError(f"count ({count}) must be at most the number of distinct labels ({len(first)})")
    classes = sorted(first)
    chosen = [classes[round(k * (len(classes) - 1) / max(1, count - 1))] for k in range(count)]
    return [first[c] for c in chosen]


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu Sans ships with matplotlib (a dependency) and has every glyph the captions use.
    family = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
    return ImageFont.truetype(font_manager.findfont(family, fallback_to_default=True), size)


def _nfe(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _psnr(value: float) -> str:
    return "identical" if value >= PSNR_CAP else f"{value:.1f} dB"


def _captions(row: SamplerRow) -> list[tuple[str, bool]]:
    """(caption, is the closer of the two cheap groups) per group; a tie at the precision shown highlights neither."""
    full, default, fewer = row.groups
    shown = _psnr(default.psnr), _psnr(fewer.psnr)
    tie = shown[0] == shown[1]
    return [(f"{full.steps} steps · NFE {_nfe(full.nfe)}", False),
            (f"NFE {_nfe(default.nfe)} · {shown[0]}", not tie and default.psnr > fewer.psnr),
            (f"{fewer.steps} steps · NFE {_nfe(fewer.nfe)} · {shown[1]}", not tie and fewer.psnr > default.psnr)]


def _tile(image: np.ndarray, zoom: int) -> Image.Image:
    tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    return tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)


def _difference(a: torch.Tensor, b: torch.Tensor, amplify: float) -> np.ndarray:
    """|a - b| averaged over channels, times ``amplify`` as a fraction of the data range (2), as heat colours."""
    diff = ((a.float() - b.float()).abs().mean(1) * amplify / 2).clamp(0, 1).cpu().numpy()
    return (colormaps[DIFFERENCE_COLOURS](diff)[..., :3] * 255).round().astype(np.uint8)


def _check(rows: Sequence[SamplerRow], zoom: int, amplify: float) -> tuple[int, int, int]:
    if not rows:
        raise ValueError("rows must not be empty")
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be a positive integer, got {zoom!r}")
    if isinstance(amplify, bool) or not isinstance(amplify, (int, float)) or not math.isfinite(amplify) or amplify <= 0:
        raise ValueError(f"amplify must be a positive finite number, got {amplify!r}")
    shape = rows[0].full.images.shape
    if len(shape) != 4 or shape[0] < 1:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {tuple(shape)}")
    for row in rows:
        for group in row.groups:
            if group.images.shape != shape:
                raise ValueError(f"every group must show images of shape {tuple(shape)}; {row.title!r} has "
                                 f"{tuple(group.images.shape)}")
        if row.default.psnr is None or row.fewer.psnr is None:
            raise ValueError(f"{row.title!r}: the default and fewer steps need a PSNR against full CFG")
    return shape[0], shape[-2] * zoom, shape[-1] * zoom


def comparison_figure(rows: Sequence[SamplerRow], path: str | Path, title: str, note: str = "", zoom: int = 4,
                      amplify: float = 5.0) -> Path:
    """Write the figure (PNG) of ``rows``, one per sampler, under ``title`` with ``note`` as a footnote.

    Images are upscaled ``zoom`` times with nearest neighbours; difference images show ``|image - full CFG|`` times
    ``amplify`` (1 = the data range is white hot)."""
    count, tile_h, tile_w = _check(rows, zoom, amplify)
    bold, caption, caption_bold = _font(_TEXT, True), _font(_CAPTION), _font(_CAPTION, True)
    title_font, note_font = _font(_TITLE, True), _font(_NOTE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textlength(r.title, font=bold) for r in rows)
    label_w = int(max(label_w, probe.textlength(f"difference ×{amplify:g}", font=caption))) + 24
    group_w = max(count * (tile_w + _PAD) - _PAD, *(int(probe.textlength(t, font=bold)) for t in GROUP_TITLES))
    for row in rows:  # a caption may be wider than a small group
        group_w = max(group_w, *(int(probe.textlength(c, font=caption_bold)) for c, _ in _captions(row)))
    width = 2 * _MARGIN + label_w + 3 * group_w + 2 * _GROUP_GAP
    row_h = _CAPTION + 10 + 2 * tile_h + _PAD + _ROW_GAP
    note_lines = _wrap(note, note_font, width - 2 * _MARGIN, probe)
    header_h = _TITLE + 14 + _TEXT + 14
    height = _MARGIN + header_h + len(rows) * row_h + len(note_lines) * (_NOTE + 6) + _MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, font=title_font, fill=_DARK)
    left = [_MARGIN + label_w + g * (group_w + _GROUP_GAP) for g in range(3)]
    y = _MARGIN + _TITLE + 14
    for x, name in zip(left, GROUP_TITLES):
        draw.text((x, y), name, font=bold, fill=_DARK)
    y += _TEXT + 14
    for row in rows:
        full = row.full.images
        image_y = y + _CAPTION + 10
        diff_y = image_y + tile_h + _PAD
        draw.text((_MARGIN, image_y + tile_h // 2), row.title, font=bold, fill=_DARK, anchor="lm")
        draw.text((_MARGIN, diff_y + tile_h // 2), f"difference ×{amplify:g}", font=caption, fill=_GREY, anchor="lm")
        for g, (group, (words, wins)) in enumerate(zip(row.groups, _captions(row))):
            draw.text((left[g], y), words, font=caption_bold if wins else caption,
                      fill=HIGHLIGHT if wins else _GREY)
            for i, image in enumerate(to_uint8(group.images)):
                canvas.paste(_tile(image, zoom), (left[g] + i * (tile_w + _PAD), image_y))
            if g:
                for i, heat in enumerate(_difference(group.images, full, amplify)):
                    canvas.paste(_tile(heat, zoom), (left[g] + i * (tile_w + _PAD), diff_y))
        y += row_h
    for line in note_lines:
        draw.text((_MARGIN, y), line, font=note_font, fill=_GREY)
        y += _NOTE + 6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines

