"""Tests of rapm.prompts: deterministic, split-respecting prompt sets, and the CLI stage."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rapm.cli import main
from rapm.prompts import COLUMNS, PromptSetError, make_prompt_sets

REPO = Path(__file__).resolve().parents[1]


def write_split(path: Path, split: str, image_ids: list[int], shuffle_seed: int | None = None) -> None:
    """A COCO-schema captions file whose captions and file names say which split they belong to.

    Image i has 1 + i % 4 captions (one with a comma, quotes and a newline), caption ids are
    unique across both splits.
    """
    offset = 0 if split == "train" else 500_000
    images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in image_ids]
    anns = [
        {
            "id": offset + i * 10 + k,
            "image_id": i,
            "caption": f'{split.upper()} only: image {i}, "caption"\n{k} ünïcode',
        }
        for i in image_ids
        for k in range(1 + i % 4)
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
        random.Random(shuffle_seed + 1).shuffle(anns)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def captions_dir(tmp_path: Path) -> Path:
    """Disjoint image ids: train 1..60, val 1001..1040."""
    d = tmp_path / "captions"
    write_split(d / "captions_train2014.json", "train", list(range(1, 61)))
    write_split(d / "captions_val2014.json", "val", list(range(1001, 1041)))
    return d


def cfg(seed: int = 7, num_train: int = 25, num_eval: int = 15) -> dict:
    return {"seed": seed, "num_train": num_train, "num_eval": num_eval}


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, keep_default_na=False)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.csv", "eval.csv", "manifest.json")}


def test_prompt_sets_are_byte_identical_and_seed_dependent(tmp_path, captions_dir):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_prompt_sets(cfg(), captions_dir, a)
    make_prompt_sets(cfg(), captions_dir, b)
    assert output_bytes(a) == output_bytes(b)
    assert sorted(p.name for p in a.iterdir()) == ["eval.csv", "manifest.json", "train.csv"]  # no temp files

    make_prompt_sets(cfg(seed=8), captions_dir, c)
    for name in ("train.csv", "eval.csv"):
        assert set(read(a, name)["image_id"]) != set(read(c, name)["image_id"])


def test_selection_does_not_depend_on_json_order(tmp_path, captions_dir):
    shuffled = tmp_path / "shuffled"
    write_split(shuffled / "captions_train2014.json", "train", list(range(1, 61)), shuffle_seed=1)
    write_split(shuffled / "captions_val2014.json", "val", list(range(1001, 1041)), shuffle_seed=2)
    assert (shuffled / "captions_train2014.json").read_bytes() != (
        captions_dir / "captions_train2014.json"
    ).read_bytes()
    make_prompt_sets(cfg(), captions_dir, tmp_path / "a")
    make_prompt_sets(cfg(), shuffled, tmp_path / "b")
    for name in ("train.csv", "eval.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_csv_format_and_splits(tmp_path, captions_dir):
    out = tmp_path / "out"
    manifest = make_prompt_sets(cfg(), captions_dir, out)
    train, val = read(out, "train.csv"), read(out, "eval.csv")
    for frame, n, split, ids in ((train, 25, "train", range(1, 61)), (val, 15, "val", range(1001, 1041))):
        assert list(frame.columns) == COLUMNS
        assert frame["prompt_id"].tolist() == list(range(n))
        assert frame["image_id"].is_unique and set(frame["image_id"]) <= set(ids)
        assert frame["caption"].str.startswith(f"{split.upper()} only: image ").all()
        assert frame["file_name"].str.startswith(f"COCO_{split}2014_").all()
        # the caption belongs to the image, and its newline was normalised away
        assert all(f"image {i}, " in c for i, c in zip(frame["image_id"], frame["caption"]))
        assert all(cid // 10 % 50_000 == i for i, cid in zip(frame["image_id"], frame["caption_id"]))
    assert set(train["image_id"]).isdisjoint(val["image_id"])
    assert (train["caption_id"] % 10).nunique() > 1  # the caption of an image is drawn, not always its first
    raw = (out / "train.csv").read_bytes()
    assert b"\r" not in raw and raw.count(b"\n") == 26 and "ünïcode".encode() in raw

    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert (out / "manifest.json").read_text(encoding="utf-8").endswith("}\n")
    assert manifest["sources"]["train"]["file"] == "captions_train2014.json"
    assert manifest["sources"]["eval"]["file"] == "captions_val2014.json"
    assert manifest["sources"]["eval"]["images"] == 40
    assert manifest["outputs"]["eval.csv"]["rows"] == 15
    assert manifest["outputs"]["train.csv"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (
        manifest["sources"]["train"]["sha256"]
        == hashlib.sha256((captions_dir / "captions_train2014.json").read_bytes()).hexdigest()
    )


def test_sources_are_kept_apart_when_image_ids_collide(tmp_path):
    """Both splits use image ids 1..30; every prompt must still come from its own file."""
    d = tmp_path / "captions"
    write_split(d / "captions_train2014.json", "train", list(range(1, 31)))
    write_split(d / "captions_val2014.json", "val", list(range(1, 31)))
    out = tmp_path / "out"
    make_prompt_sets(cfg(num_train=30, num_eval=30), d, out)
    train, val = read(out, "train.csv"), read(out, "eval.csv")
    assert train["caption"].str.startswith("TRAIN only").all() and train["caption_id"].lt(500_000).all()
    assert val["caption"].str.startswith("VAL only").all() and val["caption_id"].ge(500_000).all()
    assert sorted(train["image_id"]) == sorted(val["image_id"]) == list(range(1, 31))  # every image once


def test_larger_set_extends_smaller_one(tmp_path, captions_dir):
    make_prompt_sets(cfg(num_eval=10), captions_dir, tmp_path / "small")
    make_prompt_sets(cfg(num_eval=40), captions_dir, tmp_path / "large")
    small, large = read(tmp_path / "small", "eval.csv"), read(tmp_path / "large", "eval.csv")
    pd.testing.assert_frame_equal(small, large.iloc[:10])
    # the train set does not depend on num_eval
    assert (tmp_path / "small" / "train.csv").read_bytes() == (tmp_path / "large" / "train.csv").read_bytes()


@pytest.mark.parametrize(
    "key, numbers, available, file",
    [
        ("num_eval", dict(num_eval=41), 40, "captions_val2014.json"),
        ("num_train", dict(num_train=61), 60, "captions_train2014.json"),
    ],
)
def test_too_many_prompts_requested(tmp_path, captions_dir, key, numbers, available, file):
    out = tmp_path / "out"
    with pytest.raises(PromptSetError) as err:
        make_prompt_sets(cfg(**numbers), captions_dir, out)
    message = str(err.value)
    assert f"prompts.{key} = {numbers[key]}" in message
    assert f"only {available} distinct images" in message and file in message
    assert not out.exists() or not any(out.iterdir())


def test_missing_captions_file(tmp_path, captions_dir):
    (captions_dir / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        make_prompt_sets(cfg(), captions_dir, tmp_path / "out")


def write_config(path: Path, **prompts) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    config["prompts"].update(prompts)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_cli_end_to_end(tmp_path, captions_dir, capsys):
    config = write_config(tmp_path / "config.yaml", seed=3, num_train=12, num_eval=9)
    args = ["prompts", "--config", str(config), "--captions-dir", str(captions_dir)]
    assert main([*args, "--out-dir", str(tmp_path / "cli")]) == 0
    make_prompt_sets(cfg(seed=3, num_train=12, num_eval=9), captions_dir, tmp_path / "api")
    assert output_bytes(tmp_path / "cli") == output_bytes(tmp_path / "api")
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["num_train"], manifest["num_eval"]) == (3, 12, 9)

    # --set overrides reach the stage; asking for too much is a config error (exit 2) naming the key
    assert main([*args, "--out-dir", str(tmp_path / "bad"), "--set", "prompts.num_eval=500"]) == 2
    assert "prompts.num_eval = 500" in capsys.readouterr().err
