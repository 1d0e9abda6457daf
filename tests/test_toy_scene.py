"""Toy scenes (sampling, per-image seeds, captions and their parser) and the renderer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rapm.toy.render import SIZE_FRACTION, render, render_batch, save_grid
from rapm.toy.scene import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ToyObject,
    caption,
    parse_caption,
    sample_scene,
    scene_for,
    split_scenes,
)

HOLDOUT = ["red triangle", "green circle", "blue square", "yellow triangle"]
CFG = {
    "seed": 7,
    "image_size": 32,
    "num_train_images": 3000,
    "num_val_images": 1000,
    "max_objects": 2,
    "holdout_pairs": HOLDOUT,
}


def test_palette_is_well_separated_and_never_a_background():
    colours = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(dists) > 80, min(dists)
    assert not set(COLOURS) & set(BACKGROUNDS)
    assert len(POSITIONS) == 9 and SHAPES == ("circle", "square", "triangle") and SIZES == ("small", "large")


def test_scene_for_is_a_function_of_seed_split_and_id():
    assert scene_for(CFG, "train", 17) == scene_for(dict(CFG), "train", 17)
    assert split_scenes(CFG, "val", range(50)) == [scene_for(CFG, "val", i) for i in range(50)]
    # the order and number of other draws do not matter
    assert split_scenes(CFG, "train", [40, 3, 40])[0] == split_scenes(CFG, "train", range(41))[40]
    other = dict(CFG, seed=8)
    assert sum(scene_for(CFG, "train", i) != scene_for(other, "train", i) for i in range(50)) > 40
    assert sum(scene_for(CFG, "train", i) != scene_for(CFG, "val", i) for i in range(50)) > 40


def test_scene_for_fills_schema_defaults_and_checks_the_id():
    bare = {"seed": 7, "image_size": 32, "num_train_images": 3000, "num_val_images": 1000}
    assert scene_for(bare, "val", 5) == scene_for(CFG, "val", 5)  # schema defaults = CFG's values
    with pytest.raises(ValueError, match="out of range"):
        scene_for(CFG, "val", 1000)
    with pytest.raises(ValueError, match="unknown split"):
        scene_for(CFG, "test", 0)


@pytest.mark.parametrize("bad", ["pink circle", "red hexagon", "red", "red  circle", "big red circle"])
def test_holdout_pairs_are_validated(bad):
    with pytest.raises(ValueError, match=r"data\.toy\.holdout_pairs.*" + bad):
        scene_for(dict(CFG, holdout_pairs=["red circle", bad]), "train", 0)


def test_splits_respect_the_holdout_pairs():
    held = set(HOLDOUT)
    train, val = split_scenes(CFG, "train", range(3000)), split_scenes(CFG, "val", range(1000))
    assert all(o.pair not in held for s in train for o in s.objects)
    assert all(any(o.pair in held for o in s.objects) for s in val)
    # everything else is reachable: every other pair, size, position, background and count
    train_pairs = {o.pair for s in train for o in s.objects}
    assert train_pairs == {f"{c} {s}" for c in COLOURS for s in SHAPES} - held
    assert {o.pair for s in val for o in s.objects} >= held
    assert {o.size for s in train for o in s.objects} == set(SIZES)
    assert {o.position for s in train for o in s.objects} == set(POSITIONS)
    assert {s.background for s in train} == set(BACKGROUNDS)
    assert {len(s.objects) for s in train} == {1, 2}


def test_objects_have_distinct_positions_and_respect_max_objects():
    for split in ("train", "val"):
        for s in split_scenes(CFG, split, range(1000)):
            positions = [o.position for o in s.objects]
            assert len(set(positions)) == len(positions)
            assert positions == sorted(positions, key=POSITIONS.index)  # canonical order
    single = dict(CFG, max_objects=1)
    assert {len(s.objects) for s in split_scenes(single, "val", range(300))} == {1}
    with pytest.raises(ValueError, match="share a position"):
        Scene((ToyObject("red", "circle", "small", "top"), ToyObject("blue", "square", "large", "top")), "gray")


def test_without_holdout_pairs_the_splits_are_unconstrained():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, holdout_pairs=(), split="val") for _ in range(500)]
    assert len({o.pair for s in scenes for o in s.objects}) == len(COLOURS) * len(SHAPES)


def test_caption_example_and_parser_round_trip():
    scene = Scene(
        (ToyObject("blue", "square", "large", "center"), ToyObject("red", "circle", "small", "top left")), "gray"
    )
    text = "a small red circle at the top left and a large blue square at the center on a gray background"
    assert caption(scene) == text
    assert parse_caption(text) == scene
    # any object order parses to the same (canonical) scene
    assert (
        parse_caption("a large blue square at the center and a small red circle at the top left on a gray background")
        == scene
    )
    for split in ("train", "val"):
        for s in split_scenes(CFG, split, range(2000)):
            assert parse_caption(caption(s)) == s
            assert caption(parse_caption(caption(s))) == caption(s)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle at the top on a gray background",  # no size
        "a small red circle at the top on a gray backdrop",
        "a small red circle at the top on a pink background",
        "a small red circle at the middle on a gray background",
        "a small red circle at the top and on a gray background",
        "a small red circle at the top and a large blue square at the top on a black background",  # same cell
        "A small red circle at the top on a gray background",
        "a small red circle at the top on a gray background.",
    ],
)
def test_parser_rejects_anything_else_and_names_the_text(text):
    with pytest.raises(ValueError) as err:
        parse_caption(text)
    assert repr(text) in str(err.value)


def test_render_is_deterministic_and_seed_only_jitters():
    scene = scene_for(CFG, "train", 3)
    a, b = render(scene, 32, seed=5), render(scene, 32, seed=5)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(scene, 32, seed=6))
    assert render(scene, 64, seed=5).shape == (64, 64, 3)
    scenes = split_scenes(CFG, "val", range(6))
    assert np.array_equal(
        render_batch(scenes, 32, range(6)), np.stack([render(s, 32, i) for i, s in enumerate(scenes)])
    )


def test_render_reference_numbers():
    """Pinned pixels: a change of geometry, palette or anti-aliasing must fail here."""
    scene = Scene(
        (ToyObject("red", "circle", "small", "top left"), ToyObject("blue", "triangle", "large", "center")), "white"
    )
    img = render(scene, 32, seed=0).astype(np.int64)
    assert img.sum() == 752455
    assert tuple(img[5, 5]) == COLOURS["red"] and tuple(img[0, 31]) == BACKGROUNDS["white"]
    assert img.sum(axis=(0, 1)).tolist() == [251114, 247294, 254047]


def test_shapes_and_sizes_are_large_enough_to_tell_apart():
    def coverage(shape, size):
        img = render(Scene((ToyObject("red", shape, size, "center"),), "black"), 32, seed=0)
        return img[..., 0].astype(float).sum() / COLOURS["red"][0]

    cell = 32 / 3
    assert 5.5 <= SIZE_FRACTION["small"] * cell <= 7.0 and 8.5 <= SIZE_FRACTION["large"] * cell <= 10.5
    for shape in SHAPES:
        assert coverage(shape, "large") / coverage(shape, "small") > 2.0
    areas = {shape: coverage(shape, "small") for shape in SHAPES}
    assert areas["triangle"] < areas["circle"] < areas["square"]


def test_objects_stay_inside_their_cells_for_any_seed():
    from scipy import ndimage

    from rapm.toy.render import object_geometry

    cell = 32 / 3
    for obj in (ToyObject("red", "square", "large", p) for p in POSITIONS):
        row, col = obj.cell
        for jitter in itertools.product((-1.0, 1.0), repeat=3):  # the extreme jitters
            cx, cy, extent = object_geometry(obj, 32, jitter)
            assert col * cell < cx - extent / 2 and cx + extent / 2 < (col + 1) * cell
            assert row * cell < cy - extent / 2 and cy + extent / 2 < (row + 1) * cell
    # nine large squares never touch, whatever the seed
    scene = Scene(tuple(ToyObject("yellow", "square", "large", p) for p in POSITIONS), "black")
    for seed in range(20):
        _, n = ndimage.label(render(scene, 32, seed=seed).max(-1) >= 128, structure=np.ones((3, 3)))
        assert n == 9


def test_save_grid(tmp_path):
    from PIL import Image

    images = render_batch(split_scenes(CFG, "train", range(5)), 32, range(5))
    path = tmp_path / "sub" / "grid.png"
    save_grid(images, path, ncol=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert np.array_equal(grid[2:34, 36:68], images[1])
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
