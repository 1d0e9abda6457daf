"""Toy captions files (COCO captions schema), reference images, and the ``rapm toy captions`` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rapm.toy.captions import reference_image, write_captions
from rapm.toy.render import render
from rapm.toy.scene import caption, parse_caption, scene_for

REPO = Path(__file__).resolve().parents[1]
TOY = {
    "seed": 3,
    "image_size": 32,
    "num_train_images": 120,
    "num_val_images": 40,
    "max_objects": 2,
    "holdout_pairs": ["red triangle", "green circle"],
}


def _coco(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


def test_captions_files_follow_the_coco_schema_and_map_back_to_scenes(tmp_path):
    paths = write_captions(TOY, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions_train2014.json", "captions_val2014.json"]
    for split, n in (("train", 120), ("val", 40)):
        path = paths[split]
        assert path == tmp_path / f"captions_{split}2014.json"
        data = json.loads(path.read_text())
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert {"description", "version", "year", "contributor", "url", "date_created"} <= set(data["info"])
        coco = _coco(path)
        assert sorted(coco.getImgIds()) == list(range(n))
        assert len(coco.getAnnIds()) == n
        for image_id in range(n):
            img = coco.loadImgs(image_id)[0]
            assert (img["width"], img["height"]) == (32, 32)
            assert img["file_name"] == f"TOY_{split}2014_{image_id:012d}.png"
            (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert ann["caption"] == caption(scene_for(TOY, split, image_id))
            assert parse_caption(ann["caption"]) == scene_for(TOY, split, image_id)
        held = [a["caption"] for a in coco.dataset["annotations"]]
        has_held = ["red triangle" in c or "green circle" in c for c in held]
        assert all(has_held) if split == "val" else not any(has_held)


def test_captions_files_are_byte_identical_for_one_config(tmp_path):
    write_captions(TOY, tmp_path / "a")
    write_captions(dict(TOY), tmp_path / "b")
    write_captions(TOY, tmp_path / "a")  # rewriting in place: same bytes, no temp files left
    for name in ("captions_train2014.json", "captions_val2014.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(list((tmp_path / "a").iterdir())) == 2
    write_captions(dict(TOY, seed=4), tmp_path / "c")
    assert (tmp_path / "c" / "captions_val2014.json").read_bytes() != (
        tmp_path / "a" / "captions_val2014.json"
    ).read_bytes()


def test_reference_image_renders_the_caption_with_the_image_id_as_seed(tmp_path):
    write_captions(TOY, tmp_path)
    anns = json.loads((tmp_path / "captions_val2014.json").read_text())["annotations"]
    for ann in anns[:10]:
        image = reference_image(ann["caption"], ann["image_id"], 32)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert np.array_equal(image, render(scene_for(TOY, "val", ann["image_id"]), 32, seed=ann["image_id"]))
    assert reference_image(caption=anns[0]["caption"], image_id=0, size=64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="not a toy caption"):
        reference_image("a photo of a cat", 0, 32)


def test_cli_writes_the_captions(tmp_path):
    from rapm.cli import main

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["data"]["toy"].update(num_train_images=30, num_val_images=12)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    assert main(["toy", "captions", "--config", str(config_path), "--out-dir", str(out)]) == 0
    write_captions(config["data"]["toy"], tmp_path / "direct")
    for name in ("captions_train2014.json", "captions_val2014.json"):
        assert (out / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    assert len(_coco(out / "captions_val2014.json").getImgIds()) == 12


def test_cli_reports_a_bad_holdout_pair(tmp_path, capsys):
    from rapm.cli import main

    config = {
        "data": {
            "source": "toy",
            "toy": {
                "seed": 0,
                "image_size": 32,
                "num_train_images": 5,
                "num_val_images": 5,
                "holdout_pairs": ["red circle", "teal square"],
            },
        }
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["toy", "captions", "--config", str(config_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "data.toy.holdout_pairs: bad entry 'teal square'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "captions_train2014.json").exists()
