"""Scenes of the embedded toy dataset: attributes, sampling, captions and their parser.

A scene is a background colour plus one or two objects; each object has a colour, a shape,
a size and a cell of a 3x3 grid. The caption names every attribute, so a caption determines
its scene exactly (``parse_caption`` inverts ``caption``) and an image can be scored against
its caption (:mod:`rapm.toy.reader`).

Scene ``i`` of a split depends only on ``(seed, split, i)`` (:func:`scene_for`), never on
how many other scenes were drawn, so any image can be regenerated on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from rapm.config import ConfigError, load_schema

# Object colours (name -> sRGB). Saturated and far apart in RGB, and none is close to a
# background, so nearest-colour classification of a blurred image stays unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Cells of the 3x3 grid in reading order (row-major); index = 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
SPLITS: tuple[str, ...] = ("train", "val")  # index in this tuple is the split's seed component

assert not set(COLOURS) & set(BACKGROUNDS), "an object colour must never be a background colour"


def _check(kind: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ToyObject:
    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, SHAPES)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)

    @property
    def pair(self) -> str:
        """The "colour shape" pair, as written in ``data.toy.holdout_pairs``."""
        return f"{self.colour} {self.shape}"

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the object's grid cell."""
        return divmod(POSITIONS.index(self.position), 3)


@dataclass(frozen=True)
class Scene:
    """Objects (stored in reading order of their cells, so equal scenes compare equal) on a background.

    Sampled and parsed scenes hold 1..max_objects objects; an empty scene is allowed only as
    what :func:`rapm.toy.reader.read_scene` finds in an image with no recognisable object.
    """

    objects: tuple[ToyObject, ...]
    background: str

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUNDS)
        objects = tuple(self.objects)
        if not all(isinstance(o, ToyObject) for o in objects):
            raise ValueError("Scene.objects must hold ToyObject instances")
        positions = [o.position for o in objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        ordered = tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)


def check_holdout_pairs(pairs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Validate ``data.toy.holdout_pairs`` entries ("colour shape") and return them as tuples.

    Raises :class:`rapm.config.ConfigError` (a ValueError) naming the key and the bad entry.
    """
    out = []
    for entry in pairs:
        parts = entry.split(" ") if isinstance(entry, str) else []
        if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
            raise ConfigError(
                f"data.toy.holdout_pairs: bad entry {entry!r}; expected 'colour shape' with colour in "
                f"{{{', '.join(COLOURS)}}} and shape in {{{', '.join(SHAPES)}}}"
            )
        out.append((parts[0], parts[1]))
    if len(set(out)) == len(COLOURS) * len(SHAPES):
        raise ConfigError("data.toy.holdout_pairs: every colour-shape pair is held out; the train split would be empty")
    return tuple(out)


def sample_scene(
    rng: np.random.Generator, *, max_objects: int = 2, holdout_pairs: Iterable[str] = (), split: str = "train"
) -> Scene:
    """Draw one scene: 1..max_objects objects in distinct cells, uniform attributes.

    ``split="train"``: no object is a held-out "colour shape" pair (rejection per object).
    ``split="val"``: one object, chosen uniformly, is a held-out pair drawn uniformly; the
    others are unconstrained. With no held-out pairs both splits share one distribution.
    """
    _check("split", split, SPLITS)
    if max_objects < 1 or max_objects > len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    held = check_holdout_pairs(holdout_pairs)
    colours, n_shapes = list(COLOURS), len(SHAPES)

    n = int(rng.integers(1, max_objects + 1))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    cells = rng.permutation(len(POSITIONS))[:n]
    forced = int(rng.integers(n)) if split == "val" and held else -1
    objects = []
    for k, cell in enumerate(cells):
        if k == forced:
            colour, shape = held[int(rng.integers(len(held)))]
        else:
            while True:
                colour = colours[int(rng.integers(len(colours)))]
                shape = SHAPES[int(rng.integers(n_shapes))]
                if split != "train" or (colour, shape) not in held:
                    break
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(ToyObject(colour, shape, size, POSITIONS[int(cell)]))
    return Scene(tuple(objects), background)


def toy_settings(toy_cfg: Mapping) -> dict:
    """``toy_cfg`` with schema defaults filled in for absent optional keys (max_objects, holdout_pairs)."""
    props = load_schema()["properties"]["data"]["properties"]["toy"]["properties"]
    out = {k: v["default"] for k, v in props.items() if "default" in v}
    out.update(toy_cfg)
    check_holdout_pairs(out["holdout_pairs"])
    return out


def scene_for(toy_cfg: Mapping, split: str, image_id: int) -> Scene:
    """Scene ``image_id`` of ``split`` ("train" or "val"): a function of (seed, split, image_id) only."""
    _check("split", split, SPLITS)
    cfg = toy_settings(toy_cfg)
    count = cfg[f"num_{split}_images"]
    if int(image_id) != image_id or not 0 <= image_id < count:
        raise ValueError(f"image_id {image_id!r} out of range for the toy {split} split ({count} images)")
    return split_scenes(cfg, split, [int(image_id)])[0]


def split_scenes(toy_cfg: Mapping, split: str, image_ids: Iterable[int]) -> list[Scene]:
    """``[scene_for(toy_cfg, split, i) for i in image_ids]`` without re-checking the config per scene."""
    _check("split", split, SPLITS)
    cfg = toy_settings(toy_cfg)
    seed, index = int(cfg["seed"]), SPLITS.index(split)
    max_objects, held = int(cfg["max_objects"]), tuple(cfg["holdout_pairs"])
    return [
        sample_scene(
            np.random.default_rng([seed, index, int(i)]), max_objects=max_objects, holdout_pairs=held, split=split
        )
        for i in image_ids
    ]


def caption(scene: Scene) -> str:
    """E.g. "a small red circle at the top left and a large blue square at the center on a gray background"."""
    if not scene.objects:
        raise ValueError("an empty scene has no caption")
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return f"{' and '.join(parts)} on a {scene.background} background"


def _alternation(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"a (?P<size>{_alternation(SIZES)}) (?P<colour>{_alternation(COLOURS)}) (?P<shape>{_alternation(SHAPES)})"
    rf" at the (?P<position>{_alternation(POSITIONS)})"
)


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption`; ValueError naming the text on anything else.

    Objects may be listed in any order (the scene stores them in reading order), so
    ``caption(parse_caption(t)) == t`` holds for every caption that :func:`caption` writes.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a toy caption (not a string): {text!r}")
    parts_text, sep, tail = text.rpartition(" on a ")
    if not sep or not tail.endswith(" background") or tail[: -len(" background")] not in BACKGROUNDS:
        raise ValueError(f"not a toy caption (expected '... on a <background> background'): {text!r}")
    objects = []
    for part in parts_text.split(" and "):
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"not a toy caption (cannot parse {part!r}): {text!r}")
        objects.append(ToyObject(m["colour"], m["shape"], m["size"], m["position"]))
    try:
        scene = Scene(tuple(objects), tail[: -len(" background")])
    except ValueError as err:
        raise ValueError(f"not a toy caption ({err}): {text!r}") from err
    return scene
