"""Image files the pipeline writes for people to look at: captioned sample grids."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def captioned_grid(images: np.ndarray, captions: Sequence[str], path: str | Path, *, ncol: int = 8,
                   scale: int = 4, width_chars: int = 30) -> Path:
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
