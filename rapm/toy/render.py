"""Procedural renderer of toy scenes: anti-aliased flat shapes on a flat background.

Geometry, in units of the grid cell (side ``size / 3``): a small object spans 0.5625 cells
(6 px at 32x32), a large one 0.84375 cells (9 px). Circles have that diameter, squares that
side, triangles (apex up) that base and height. The render seed adds jitter only: the object
centre moves by up to ``POSITION_JITTER`` cells on each axis and its extent by up to
``SIZE_JITTER`` (relative), so an object always stays inside its cell and never touches an
object in a neighbouring cell; attributes never change. Coverage is estimated with
``SUPERSAMPLE``x``SUPERSAMPLE`` samples per pixel and composited in float, then rounded.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rapm.io import atomic_path
from rapm.toy.scene import BACKGROUNDS, COLOURS, Scene, ToyObject

SIZE_FRACTION = {"small": 0.5625, "large": 0.84375}  # object extent / cell side
POSITION_JITTER = 0.04  # max centre offset per axis, in cells
SIZE_JITTER = 0.03  # max relative change of the extent
SUPERSAMPLE = 8  # samples per pixel along each axis


def object_geometry(obj: ToyObject, size: int, jitter: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[float, float, float]:
    """Centre (x, y) and extent in pixels of ``obj`` in a ``size``x``size`` image.

    ``jitter`` = three numbers in [-1, 1] (x offset, y offset, extent), scaled by the jitter bounds.
    """
    cell = size / 3.0
    row, col = obj.cell
    cx = (col + 0.5 + POSITION_JITTER * jitter[0]) * cell
    cy = (row + 0.5 + POSITION_JITTER * jitter[1]) * cell
    extent = SIZE_FRACTION[obj.size] * cell * (1.0 + SIZE_JITTER * jitter[2])
    return cx, cy, extent


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, extent: float) -> np.ndarray:
    """Inside test on offsets from the shape's centre (its bounding-box centre)."""
    h = extent / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex (0, -h), base from (-h, h) to (h, h)
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, extent: float, size: int) -> tuple[np.ndarray, slice, slice]:
    """Fractional pixel coverage of a shape, on its bounding box of pixels (rows, cols slices)."""
    h = extent / 2.0
    y0, y1 = max(int(np.floor(cy - h)), 0), min(int(np.ceil(cy + h)), size)
    x0, x1 = max(int(np.floor(cx - h)), 0), min(int(np.ceil(cx + h)), size)
    offs = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1) - cy
    xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1) - cx
    inside = _inside(shape, xs[None, :], ys[:, None], extent)
    alpha = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return alpha, slice(y0, y1), slice(x0, x1)


def render(scene: Scene, size: int = 32, seed: int = 0) -> np.ndarray:
    """Render ``scene`` as a uint8 (size, size, 3) RGB image; a pure function of (scene, size, seed)."""
    if int(size) != size or size < 12:
        raise ValueError(f"image size must be an integer >= 12, got {size!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"render seed must be a non-negative integer, got {seed!r}")
    size = int(size)
    rng = np.random.default_rng(int(seed))
    image = np.empty((size, size, 3), dtype=np.float64)
    image[...] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        jitter = rng.uniform(-1.0, 1.0, size=3)
        alpha, rows, cols = coverage(obj.shape, *object_geometry(obj, size, jitter), size)
        a = alpha[:, :, None]
        image[rows, cols] = image[rows, cols] * (1.0 - a) + np.asarray(COLOURS[obj.colour], np.float64) * a
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(scenes: Sequence[Scene], size: int, seeds: Sequence[int]) -> np.ndarray:
    """Render scenes[i] with seeds[i]; uint8 (B, size, size, 3)."""
    if len(scenes) != len(seeds):
        raise ValueError(f"render_batch: {len(scenes)} scenes but {len(seeds)} seeds")
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, (scene, seed) in enumerate(zip(scenes, seeds)):
        out[i] = render(scene, size, seed)
    return out


def save_grid(
    images: np.ndarray | Sequence[np.ndarray], path: str | os.PathLike, ncol: int, pad: int = 2, pad_value: int = 64
) -> None:
    """Tile uint8 (B, H, W, 3) images row-major into ``ncol`` columns and write a PNG atomically.

    The padding is dark gray (not a background colour), so tiles with a white or black
    background stay visibly separate.
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_grid expects uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}")
    if ncol < 1:
        raise ValueError(f"ncol must be >= 1, got {ncol}")
    b, h, w, _ = images.shape
    ncol = min(ncol, max(b, 1))
    nrow = -(-b // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
