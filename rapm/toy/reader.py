"""Read a toy scene back from pixels, and score images against the scenes (captions) they should show.

The reader knows the palette and the geometry of :mod:`rapm.toy.render`, and nothing about
the image's caption. Per image (batched with numpy/scipy):

1. Background: the background colour nearest to most pixels.
2. Per pixel and object colour ``c``: the pixel is modelled as a blend
   ``bg + alpha * (c - bg)``; ``alpha`` is the clipped projection and the residual is the
   distance to that segment. The pixel's colour is the one with the smallest residual, so an
   anti-aliased or blurred edge (a blend with the background) keeps its object's colour.
3. Foreground (``alpha >= 0.5``) is split into 4-connected components of one colour; those
   smaller than ``MIN_AREA`` of the smallest object are noise. Components are grouped by the
   grid cell of their centroid: one object per cell, coloured like its largest component.
4. Each object's soft mask is its colour's alpha on every pixel within ``GROW`` cells of it
   (nearest object wins), so the tails of a blur are kept. Shape comes from two moments that
   an isotropic blur leaves unchanged and that do not depend on scale: the vertical third
   central moment ``t3 = mu_03 / A^2.5`` (apex-up triangle -0.0210, circle and square 0) and
   the four-fold harmonic ``q4 = Re sum alpha (dx + i dy)^4 / A^3`` (square -1/60, circle 0,
   triangle +0.002). Size compares the extent implied by the area ``A`` and the shape with
   the geometric mean of the small and large extents; position is the cell of the
   bounding-box centre (the centroid, moved up by a sixth of the extent for a triangle).

``score`` matches the detected objects to the expected ones (Hungarian, on attribute
agreement) and reports per-attribute accuracy; ``all`` demands an exact match: every
attribute of every object, the background, and no extra object.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from rapm.toy.render import SIZE_FRACTION
from rapm.toy.scene import BACKGROUNDS, COLOURS, POSITIONS, Scene, ToyObject

ATTRIBUTES = ("colour", "shape", "size", "position")
MIN_AREA = 0.3  # smallest component kept, as a fraction of the smallest object's area
GROW = 0.25  # the soft mask reaches this many cells beyond the object (2.7 px at 32x32)
TRIANGLE_T3 = -0.009  # t3 below this: triangle (sharp apex-up triangle -0.0210, others 0)
SQUARE_Q4 = -0.0085  # q4 below this: square (sharp square -1/60, circle 0, triangle +0.002)
CHUNK = 256  # images per vectorised step

_COLOUR_NAMES = tuple(COLOURS)
_BG_NAMES = tuple(BACKGROUNDS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)  # (K, 3)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)  # (G, 3)
_SHAPE_AREA = {"circle": np.pi / 4.0, "square": 1.0, "triangle": 0.5}  # area / extent**2
_SHAPE_SHIFT = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0}  # (centroid - box centre) / extent, y
_FOUR_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_FOUR_CONNECTED[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # never connects two images of the batch


def _as_batch(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected uint8 RGB images (H, W, 3) or (B, H, W, 3), square; got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images


def _read_chunk(images: np.ndarray) -> list[Scene]:
    from scipy import ndimage

    b, size = images.shape[0], images.shape[1]
    cell = size / 3.0
    x = images.reshape(b, size * size, 3).astype(np.float32)  # (B, N, 3)
    xx2 = (x * x).sum(-1, keepdims=True)

    # 1. background: the background colour nearest to most pixels (object colours compete too)
    pal = np.concatenate([_BG_PALETTE, _PALETTE]).astype(np.float32)
    nearest = (xx2 - 2.0 * x @ pal.T + (pal * pal).sum(-1)).argmin(-1)  # (B, N)
    votes = np.stack([(nearest == g).sum(1) for g in range(len(_BG_NAMES))], 1)
    bg_idx = votes.argmax(1)
    bg = _BG_PALETTE[bg_idx].astype(np.float32)  # (B, 3)

    # 2. per pixel and colour: blend factor alpha and distance to the segment bg -> colour
    diff = x - bg[:, None, :]  # (B, N, 3)
    v = _PALETTE.astype(np.float32)[None] - bg[:, None, :]  # (B, K, 3)
    vv = (v * v).sum(-1)[:, None, :]  # (B, 1, K)
    dot = diff @ v.transpose(0, 2, 1)  # (B, N, K)
    alpha = np.clip(dot / vv, 0.0, 1.0)
    resid = alpha * (alpha * vv - 2.0 * dot)  # squared distance to the segment, minus |diff|^2
    kbest = resid.argmin(-1).reshape(b, size, size)
    alpha = alpha.reshape(b, size, size, -1)
    abest = np.take_along_axis(alpha, kbest[..., None], -1)[..., 0]

    # 3. single-colour 4-connected components of the foreground
    fg = abest >= 0.5
    labels = np.zeros((b, size, size), dtype=np.int64)
    n_labels = 0
    for k in range(len(_COLOUR_NAMES)):
        lab, n = ndimage.label(fg & (kbest == k), structure=_FOUR_CONNECTED)
        labels[lab > 0] = lab[lab > 0] + n_labels
        n_labels += n
    found: list[list[tuple[float, ToyObject]]] = [[] for _ in range(b)]  # (area, object) per image
    if n_labels:
        flat = labels.ravel()
        bb, yy, xx = np.indices(labels.shape).reshape(3, -1)
        w_alpha = abest.ravel()
        area = np.bincount(flat, minlength=n_labels + 1)
        mass = np.bincount(flat, w_alpha, minlength=n_labels + 1)
        safe = np.maximum(mass, 1e-9)
        cy = np.bincount(flat, w_alpha * (yy + 0.5), minlength=n_labels + 1) / safe
        cx = np.bincount(flat, w_alpha * (xx + 0.5), minlength=n_labels + 1) / safe
        first = np.full(n_labels + 1, -1)
        first[flat[::-1]] = np.arange(flat.size)[::-1]  # first pixel of each label
        comp_img, comp_colour = bb[first], kbest.ravel()[first]
        min_area = MIN_AREA * _SHAPE_AREA["triangle"] * (SIZE_FRACTION["small"] * cell) ** 2
        keep = np.flatnonzero(area >= min_area)
        keep = keep[keep > 0]
        if keep.size:  # else only specks below the minimum area: no object in this chunk
            comp_cell = np.clip((cy[keep] / cell).astype(int), 0, 2) * 3 + np.clip((cx[keep] / cell).astype(int), 0, 2)
            groups, obj_of_keep = np.unique(comp_img[keep] * 9 + comp_cell, return_inverse=True)
            n_obj = len(groups)
            # colour of an object: that of its heaviest component
            order = np.lexsort((mass[keep], obj_of_keep))  # by object, then by mass
            last = np.r_[obj_of_keep[order][1:] != obj_of_keep[order][:-1], True]
            lead = keep[order][last]  # heaviest component of objects 0 .. n_obj - 1
            obj_colour = comp_colour[lead]
            obj_img = groups // 9

            # 4. soft mask of each object: its colour's alpha on the pixels within GROW cells of it
            obj_of_label = np.zeros(n_labels + 1, dtype=np.int64)
            obj_of_label[keep] = obj_of_keep + 1
            objmap = obj_of_label[labels]
            # a pixel joins the nearest object; the huge step between images keeps them apart
            dist, nearest = ndimage.distance_transform_edt(
                objmap == 0, sampling=(4.0 * size, 1.0, 1.0), return_indices=True
            )
            region = np.where(dist <= GROW * cell, objmap[tuple(nearest)], 0).ravel()
            inside = region > 0
            rid = region[inside]
            a = alpha.reshape(-1, alpha.shape[-1])[np.flatnonzero(inside), obj_colour[rid - 1]]
            py, px = yy[inside] + 0.5, xx[inside] + 0.5
            m0 = np.bincount(rid, a, minlength=n_obj + 1)[1:]
            m0s = np.maximum(m0, 1e-9)
            my = np.bincount(rid, a * py, minlength=n_obj + 1)[1:] / m0s
            mx = np.bincount(rid, a * px, minlength=n_obj + 1)[1:] / m0s
            dx, dy = px - mx[rid - 1], py - my[rid - 1]
            # blur-invariant moments (an isotropic blur adds nothing to mu_03 or to Re C_40)
            m03 = np.bincount(rid, a * dy**3, minlength=n_obj + 1)[1:]
            c40 = np.bincount(rid, a * (dx**4 - 6 * dx**2 * dy**2 + dy**4), minlength=n_obj + 1)[1:]
            t3 = m03 / m0s**2.5
            q4 = c40 / m0s**3

            small_large = np.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]) * cell
            for i in range(n_obj):
                if t3[i] < TRIANGLE_T3:
                    shape = "triangle"
                elif q4[i] < SQUARE_Q4:
                    shape = "square"
                else:
                    shape = "circle"
                extent = np.sqrt(m0[i] / _SHAPE_AREA[shape])
                centre_y = my[i] - _SHAPE_SHIFT[shape] * extent
                row = min(max(int(centre_y // cell), 0), 2)
                col = min(max(int(mx[i] // cell), 0), 2)
                found[obj_img[i]].append(
                    (
                        float(m0[i]),
                        ToyObject(
                            _COLOUR_NAMES[obj_colour[i]],
                            shape,
                            "large" if extent > small_large else "small",
                            POSITIONS[3 * row + col],
                        ),
                    )
                )

    out = []
    for i in range(b):
        objs: dict[str, ToyObject] = {}
        for _, obj in sorted(found[i], key=lambda t: -t[0]):  # one object per cell: the largest
            objs.setdefault(obj.position, obj)
        out.append(Scene(tuple(objs.values()), _BG_NAMES[bg_idx[i]]))
    return out


def read_scenes(images) -> list[Scene]:
    """The scene of each image of a uint8 (B, H, W, 3) batch (see the module docstring)."""
    images = _as_batch(images)
    out: list[Scene] = []
    for start in range(0, len(images), CHUNK):
        out.extend(_read_chunk(images[start : start + CHUNK]))
    return out


def read_scene(image) -> Scene:
    """The scene shown by one uint8 (H, W, 3) image; ``objects`` is empty when nothing is found."""
    return read_scenes(np.asarray(image)[None])[0]


def _best_assignment(gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a one-to-one assignment with the largest total ``gain``."""
    n, m = gain.shape
    if n * m > 16:  # many objects: Hungarian algorithm
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment(-gain)
    best, best_pairs = -1.0, ((), ())
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            total = gain[range(n), cols].sum()
            if total > best:
                best, best_pairs = total, (tuple(range(n)), cols)
    else:
        for rows in itertools.permutations(range(n), m):
            total = gain[rows, range(m)].sum()
            if total > best:
                best, best_pairs = total, (rows, tuple(range(m)))
    return np.array(best_pairs[0], dtype=int), np.array(best_pairs[1], dtype=int)


_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.5])  # matching gain per agreeing attribute; position breaks ties


def compare(found: Scene, expected: Scene) -> dict[str, float]:
    """Per-attribute agreement of a read scene with the expected one (see :func:`score`)."""
    n = len(expected.objects)
    if n == 0:
        raise ValueError("cannot score against an empty scene")
    match = np.array(
        [[[getattr(e, a) == getattr(f, a) for a in ATTRIBUTES] for f in found.objects] for e in expected.objects],
        dtype=bool,
    ).reshape(n, len(found.objects), len(ATTRIBUTES))
    correct = np.zeros((n, len(ATTRIBUTES)), dtype=bool)
    if found.objects:
        rows, cols = _best_assignment(match @ _WEIGHTS)
        correct[rows] = match[rows, cols]
    result = {a: float(correct[:, k].mean()) for k, a in enumerate(ATTRIBUTES)}
    result["background"] = float(found.background == expected.background)
    result["count"] = float(len(found.objects) == n)
    result["all"] = float(correct.all() and result["background"] == 1.0 and result["count"] == 1.0)
    return result


def score(image, scene: Scene) -> dict[str, float]:
    """How well one image shows ``scene``.

    Keys: ``colour``, ``shape``, ``size``, ``position`` (fraction of the scene's objects whose
    matched detection has that attribute right; an object without a detection counts wrong),
    ``background`` and ``count`` (0 or 1), and ``all`` (1 only if every attribute of every object,
    the background and the number of objects are right).
    """
    return compare(read_scene(image), scene)


def scores(images, scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """:func:`score` of each image against its scene, per key: ``{key: (n,) float64}``."""
    images = _as_batch(images)
    if len(images) != len(scenes):
        raise ValueError(f"accuracy: {len(images)} images but {len(scenes)} scenes")
    if not len(scenes):
        raise ValueError("accuracy: no images")
    rows = [compare(f, e) for f, e in zip(read_scenes(images), scenes)]
    return {key: np.array([r[key] for r in rows], dtype=np.float64) for key in rows[0]}


def accuracy(images, scenes: Sequence[Scene]) -> dict[str, float]:
    """Mean of :func:`score` over a batch of images and their scenes; also ``n``, the number of images."""
    out = {key: float(v.mean()) for key, v in scores(images, scenes).items()}
    out["n"] = len(scenes)
    return out
