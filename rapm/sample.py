"""Sampling the evaluation images of one table row (``python -m rapm sample``), sharded and resumable.

A *row* is what one line of a table measures: the teacher with its many-step sampler and guidance,
the undistilled teacher with the student's N DDIM steps, a trained student LoRA (N steps, guidance
1), or an external diffusers-loadable LoRA with its own sampler settings. Every row samples through
the teacher's diffusers pipeline (DDIM, ``timestep_spacing="trailing"``; a LoRA loaded with
``load_lora_weights`` + ``fuse_lora``), exactly what a user of the LoRA runs.

Image i (row i of ``results/prompts/eval.csv``) starts from the noise drawn by a CPU generator seeded
with ``sampling.seed + i``: it depends on (seed, i) only, never on the shard count, batch size or
device. Shard s of S owns images [s·n/S, (s+1)·n/S) and writes ``<dir>/images/<i:06d>.png`` one file at
a time (atomically), so a killed shard resumes with the missing images; ``settings.json`` next to them
holds a hash of everything the pixels depend on (prompts, teacher, LoRA file, sampler) and images of
other settings are discarded. The shard's manifest CSV (image index, prompt_id, image_id, caption,
seed, file) is written last: it is the rule's declared output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rapm.cliargs import add_config_args, add_threads_arg, set_threads, stage_config
from rapm.io import atomic_path, sha256_file, write_json
from rapm.manifests import num_images
from rapm.pipeline import SamplingError, generate, load_row_pipeline
from rapm.progress import progress
from rapm.rows import Row
from rapm.shards import item_seed
from rapm.shards import shard_range as _shard_range

log = logging.getLogger(__name__)


def shard_range(n: int, shards: int, shard: int) -> tuple[int, int]:
    """Images [start, stop) of sampling shard ``shard`` of ``shards`` (:func:`rapm.shards.shard_range`)."""
    try:
        return _shard_range(n, shards, shard)
    except ValueError as err:
        raise SamplingError(f"sampling {err}") from None


def row_settings(
    row: Mapping[str, Any], teacher_cfg: Mapping[str, Any], prompts_sha256: str, seed: int, resolution: int | None
) -> dict[str, Any]:
    """Everything the pixels of a row depend on (its ``lora`` file by content)."""
    row = Row.from_dict(row)
    files = row.weight_files()
    for f in files:
        if not Path(f).is_file():
            raise SamplingError(f"{f}: {'router' if f == row.router else 'LoRA'} file not found (row {row.name!r})")
    return {
        "kind": row.kind,
        "steps": int(row.steps),
        "guidance": float(row.guidance),
        "lora_sha256": [sha256_file(f) for f in files] or None,
        "teacher": {k: teacher_cfg.get(k) for k in ("path", "type", "dtype", "revision", "variant")},
        "prompts_sha256": prompts_sha256,
        "seed": int(seed),
        "resolution": resolution,
    }


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _images_dir(out_dir: Path, settings: dict[str, Any]) -> Path:
    """``<out_dir>/images``, emptied first when ``settings.json`` records other settings; writes ``settings``."""
    images_dir = out_dir / "images"
    settings_path = out_dir / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        log.info("%s: settings changed; discarding its images", out_dir)
        shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, settings)
    return images_dir


def _write_manifest(prompts, lo: int, hi: int, seed: int, groups, images_dir: Path, manifest: Path) -> None:
    """The shard's manifest CSV (index, prompt_id, image_id, caption, seed[, group], file), atomically."""
    table = prompts.iloc[lo:hi][["prompt_id", "image_id", "caption"]].copy()
    table.insert(0, "index", range(lo, hi))
    table["seed"] = [item_seed(seed, i) for i in range(lo, hi)]
    if groups is not None:
        table["group"] = list(groups)
    rel = os.path.relpath(images_dir, manifest.parent)
    table["file"] = [f"{rel}/{i:06d}.png" for i in range(lo, hi)]
    with atomic_path(manifest) as tmp:
        table.to_csv(tmp, index=False)


def sample_shard(
    row: Mapping[str, Any],
    teacher_cfg: Mapping[str, Any],
    sampling_cfg: Mapping[str, Any],
    prompts_csv: str | Path,
    shard: int,
    out_dir: str | Path,
    manifest: str | Path,
    *,
    resolution: int | None = None,
) -> dict[str, Any]:
    """Sample the missing images of one shard of a row; write its manifest CSV. Returns a summary."""
    t0 = time.time()
    row = Row.from_dict(row)
    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    lo, hi = shard_range(num_images(sampling_cfg, len(prompts)), int(sampling_cfg["shards"]), shard)
    seed = int(sampling_cfg["seed"])
    images_dir = _images_dir(Path(out_dir), row_settings(row, teacher_cfg, sha256_file(prompts_csv), seed, resolution))

    todo = [i for i in range(lo, hi) if not (images_dir / f"{i:06d}.png").is_file()]
    log.info("row %s, shard %d: images [%d, %d), %d to sample", row.name, shard, lo, hi, len(todo))
    groups, plan = None, []
    if row.kind == "msd":  # one teacher routes, then carries each student's LoRA in turn
        from rapm.msd import each_student, route
        from rapm.teacher import load_teacher

        teacher = load_teacher(teacher_cfg)
        groups = route(row, teacher, [prompts["caption"][i] for i in range(lo, hi)])
        plan = each_student(teacher, row, groups, todo, lo)
    elif todo:
        teacher = load_row_pipeline(row, teacher_cfg)
        plan = [(row, todo)]
    bs = int(sampling_cfg["batch_size"])
    for _sub_row, indices in plan:
        starts = range(0, len(indices), bs)
        for start in progress(
            starts, len(indices), f"sample {row.name}", unit="img", weight=lambda s: min(bs, len(indices) - s)
        ):
            idx = indices[start : start + bs]
            images = generate(
                teacher,
                [prompts["caption"][i] for i in idx],
                [item_seed(seed, i) for i in idx],
                steps=row.steps,
                guidance=row.guidance,
                resolution=resolution,
            )
            for i, image in zip(idx, images):
                _write_png(image, images_dir / f"{i:06d}.png")
    _write_manifest(prompts, lo, hi, seed, groups, images_dir, Path(manifest))
    return {
        "row": row.name,
        "shard": shard,
        "images": hi - lo,
        "sampled": len(todo),
        "wall_time_s": round(time.time() - t0, 1),
    }


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm sample`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--row", required=True, help="the row's file (results/config/rows/<row>.yaml)")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--shard", type=int, required=True, help="shard index in [0, sampling.shards)")
    p.add_argument("--out-dir", required=True, help="the shard's folder (images/ and settings.json go inside)")
    p.add_argument("--manifest", required=True, help="the shard's manifest CSV, written once its images are complete")
    add_threads_arg(p)


def command(args: argparse.Namespace) -> int:
    from rapm.rows import Row

    cfg = stage_config(args, "teacher", "sampling")
    row = Row.from_file(args.row)
    set_threads(args.threads)

    sample_shard(
        row,
        cfg["teacher"],
        cfg["sampling"],
        args.prompts,
        args.shard,
        args.out_dir,
        args.manifest,
        resolution=row.get("resolution"),
    )
    return 0
