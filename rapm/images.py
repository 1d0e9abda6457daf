"""Image files the pipeline writes for people to look at: captioned sample grids (drawn here; the
``grid`` stage is :mod:`rapm.grid`, the validation grids :mod:`rapm.trainer`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def captioned_grid(
    images: np.ndarray,
    captions: Sequence[str],
    path: str | Path,
    *,
    ncol: int = 8,
    scale: int = 4,
    width_chars: int = 30,
) -> Path:
    """Write a PNG grid: each image upscaled ``scale``x (nearest) above its wrapped caption."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = images.shape[1] * scale, images.shape[2] * scale
    lines = [textwrap.wrap(c, width_chars) for c in captions]
    line_h = 11
    cell_w, cell_h = max(w, 6 * width_chars) + 8, h + line_h * max(len(x) for x in lines) + 10
    nrow = -(-len(images) // ncol)
    grid = Image.new("RGB", (ncol * cell_w, nrow * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, text) in enumerate(zip(images, lines)):
        x0, y0 = (i % ncol) * cell_w + 4, (i // ncol) * cell_h + 4
        grid.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x0 + (cell_w - 8 - w) // 2, y0))
        for k, line in enumerate(text):
            draw.text((x0, y0 + h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def comparison_grid(
    rows: dict[str, np.ndarray], captions: Sequence[str], path: str | Path, *, scale: int = 3, width_chars: int = 24
) -> Path:
    """A PNG with one line per table row (its label on the left) and one column per prompt (caption on
    top): the same prompts and seeds across the teacher, the undistilled N-step teacher and each variant."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    first = next(iter(rows.values()))
    h, w = first.shape[1] * scale, first.shape[2] * scale
    lines = [textwrap.wrap(c, width_chars) for c in captions]
    line_h, label_w = 11, 6 * max(len(name) for name in rows) + 12
    cell_w = max(w, 6 * width_chars) + 8
    head_h = line_h * max(len(x) for x in lines) + 8
    grid = Image.new("RGB", (label_w + len(captions) * cell_w, head_h + len(rows) * (h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(lines):
        for k, line in enumerate(text):
            draw.text((label_w + j * cell_w + 4, 4 + k * line_h), line, fill=(0, 0, 0), font=font)
    for i, (name, images) in enumerate(rows.items()):
        y0 = head_h + i * (h + 8)
        draw.text((4, y0 + h // 2 - 5), name, fill=(0, 0, 0), font=font)
        for j, img in enumerate(images[: len(captions)]):
            grid.paste(
                Image.fromarray(img).resize((w, h), Image.NEAREST), (label_w + j * cell_w + (cell_w - w) // 2, y0)
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
