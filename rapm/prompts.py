"""Deterministic training and evaluation prompt sets from COCO-schema captions files.

Training prompts come only from ``captions_train2014.json`` and evaluation prompts only from
``captions_val2014.json``; each set has one prompt per distinct image. The selection is a pure
function of the seed and the *content* of the captions files (rows are sorted first), so the same
config gives byte-identical ``train.csv``, ``eval.csv`` and ``manifest.json``.

Selection, per split, with its own generator ``default_rng(SeedSequence(seed).spawn(2)[k])``
(k = 0 for train, 1 for eval):

1. sort the captions by (image_id, caption_id) and list the distinct image ids in ascending order;
2. draw a random permutation of the images, and for *every* image a caption index uniform over
   that image's captions;
3. prompt i is the drawn caption of the i-th image of the permutation, for i < n.

Because the draws in step 2 do not depend on n, a larger ``num_eval`` extends the smaller set
(its first rows are unchanged), and the train set does not depend on ``num_eval`` or vice versa.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rapm.captions import load_captions
from rapm.cliargs import add_config_args, stage_config
from rapm.config import ConfigError
from rapm.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = ["prompt_id", "image_id", "caption_id", "caption", "file_name"]
# output set -> (captions file it is drawn from, config key of its size)
SPLITS = {
    "train": ("captions_train2014.json", "num_train"),
    "eval": ("captions_val2014.json", "num_eval"),
}


class PromptSetError(ConfigError):
    """The prompt configuration cannot be satisfied by the captions (e.g. too few images)."""


def select_prompts(
    captions: pd.DataFrame, n: int, rng: np.random.Generator, *, key: str = "n", source: str = "<captions>"
) -> pd.DataFrame:
    """Pick ``n`` distinct images and one caption of each, with ``rng``.

    ``captions`` is a :func:`rapm.captions.load_captions` frame (sorted by image_id, caption_id).
    ``key`` and ``source`` name the config key and the file in the error raised when ``n``
    exceeds the number of distinct images. Returns the chosen rows, in draw order, with a
    ``prompt_id`` column 0..n-1 first.
    """
    image_ids = captions["image_id"].to_numpy()
    if len(image_ids) and np.any(np.diff(image_ids) < 0):
        raise ValueError("captions must be sorted by (image_id, caption_id); use rapm.captions.load_captions")
    _, first_row, counts = np.unique(image_ids, return_index=True, return_counts=True)
    if n > len(counts):
        raise PromptSetError(
            f"prompts.{key} = {n} requested, but {source} has only {len(counts)} "
            f"distinct images ({len(captions)} captions)"
        )
    order = rng.permutation(len(counts))  # images in draw order
    caption_index = rng.integers(0, counts)  # one caption per image, for every image
    rows = first_row[order[:n]] + caption_index[order[:n]]
    chosen = captions.iloc[rows].reset_index(drop=True)
    chosen.insert(0, "prompt_id", np.arange(n, dtype=np.int64))
    return chosen[COLUMNS]


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _draw_split(
    prompts_cfg: Mapping[str, Any], captions_dir: Path, split: str, file_name: str, key: str, rng: np.random.Generator
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The prompts of ``split`` drawn from ``captions_dir / file_name`` with ``rng``, and its manifest source entry."""
    path = captions_dir / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: captions file not found (run `rapm fetch-coco` or `rapm toy captions` to create {captions_dir})"
        )
    captions = load_captions(path)
    n = int(prompts_cfg[key])
    frame = select_prompts(captions, n, rng, key=key, source=str(path))
    source = {
        "file": file_name,
        "sha256": sha256_file(path),
        "images": int(captions["image_id"].nunique()),
        "captions": len(captions),
    }
    log.info("%s: %d prompts from %d images (%d captions) in %s", split, n, source["images"], source["captions"], path)
    return frame, source


def make_prompt_sets(prompts_cfg: Mapping[str, Any], captions_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``train.csv``, ``eval.csv`` and ``manifest.json`` to ``out_dir``; return the manifest.

    ``prompts_cfg`` is the ``prompts`` config section (seed, num_train, num_eval);
    ``captions_dir`` holds ``captions_train2014.json`` and ``captions_val2014.json`` (from
    COCO or the toy dataset). CSV columns: prompt_id, image_id, caption_id, caption, file_name.
    """
    captions_dir, out_dir = Path(captions_dir), Path(out_dir)
    seed = int(prompts_cfg["seed"])
    generators = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(SPLITS))]

    sets: dict[str, pd.DataFrame] = {}
    sources: dict[str, dict[str, Any]] = {}
    for (split, (file_name, key)), rng in zip(SPLITS.items(), generators):
        sets[split], sources[split] = _draw_split(prompts_cfg, captions_dir, split, file_name, key, rng)

    outputs: dict[str, dict[str, Any]] = {}
    for split, frame in sets.items():
        data = _csv_bytes(frame)
        _write_bytes(out_dir / f"{split}.csv", data)
        outputs[f"{split}.csv"] = {"rows": len(frame), "sha256": hashlib.sha256(data).hexdigest()}

    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_train": int(prompts_cfg["num_train"]),
        "num_eval": int(prompts_cfg["num_eval"]),
        "sources": sources,
        "outputs": outputs,
    }
    _write_bytes(
        out_dir / "manifest.json",
        (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"),
    )
    log.info(
        "wrote %d train and %d eval prompts to %s (train.csv sha256 %s, eval.csv sha256 %s)",
        len(sets["train"]),
        len(sets["eval"]),
        out_dir,
        outputs["train.csv"]["sha256"][:12],
        outputs["eval.csv"]["sha256"][:12],
    )
    return manifest


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm prompts`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--captions-dir", required=True, help="directory with captions_{train,val}2014.json")
    p.add_argument("--out-dir", required=True, help="where train.csv, eval.csv and manifest.json go")


def command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "prompts")

    make_prompt_sets(cfg["prompts"], captions_dir=args.captions_dir, out_dir=args.out_dir)
    return 0
