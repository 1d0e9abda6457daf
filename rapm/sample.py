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

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from rapm.errors import RapmError
from rapm.io import atomic_path, sha256_file, write_json
from rapm.progress import progress
from rapm.shards import item_seed
from rapm.shards import shard_range as _shard_range

log = logging.getLogger(__name__)


class SamplingError(RapmError):
    """A row cannot be sampled as configured."""


def num_images(sampling_cfg: Mapping[str, Any], num_prompts: int) -> int:
    """Images per row: ``sampling.num_images`` (at most the number of evaluation prompts), or all of them."""
    n = sampling_cfg.get("num_images")
    return num_prompts if n is None else min(int(n), num_prompts)


def shard_range(n: int, shards: int, shard: int) -> tuple[int, int]:
    """Images [start, stop) of sampling shard ``shard`` of ``shards`` (:func:`rapm.shards.shard_range`)."""
    try:
        return _shard_range(n, shards, shard)
    except ValueError as err:
        raise SamplingError(f"sampling {err}") from None


def row_settings(row: Mapping[str, Any], teacher_cfg: Mapping[str, Any], prompts_sha256: str, seed: int,
                 resolution: int | None) -> dict[str, Any]:
    """Everything the pixels of a row depend on (its ``lora`` file by content)."""
    files = [row["lora"]] if row.get("lora") else [*row.get("loras", []), *([row["router"]] if row.get("router") else [])]
    for f in files:
        if not Path(f).is_file():
            raise SamplingError(f"{f}: {'router' if f == row.get('router') else 'LoRA'} file not found (row {row.get('name')!r})")
    return {"kind": row["kind"], "steps": int(row["steps"]), "guidance": float(row["guidance"]),
            "lora_sha256": [sha256_file(f) for f in files] or None, "teacher": {k: teacher_cfg.get(k) for k in
            ("path", "type", "dtype", "revision", "variant")}, "prompts_sha256": prompts_sha256, "seed": int(seed),
            "resolution": resolution}


def load_row_pipeline(row: Mapping[str, Any], teacher_cfg: Mapping[str, Any]):
    """The teacher (:func:`rapm.teacher.load_teacher`), with the row's LoRA loaded and fused if it has one."""
    from rapm.teacher import load_teacher

    teacher = load_teacher(teacher_cfg)
    if row.get("lora"):
        fuse_row_lora(teacher, row)
    return teacher


def fuse_row_lora(teacher, row: Mapping[str, Any]) -> None:
    """Load ``row["lora"]`` into the teacher's pipeline and fuse it (what a user of the LoRA runs)."""
    lora = row["lora"]
    if not Path(lora).is_file():
        raise SamplingError(f"{lora}: LoRA file not found (row {row.get('name')!r})")
    try:
        teacher.pipe.load_lora_weights(str(lora))
        teacher.pipe.fuse_lora()
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise SamplingError(f"{lora}: diffusers could not load it as a LoRA of {teacher.location}: {err}") from err


def base_weights(teacher) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of the teacher's LoRA-carrying models' weights, for :func:`restore_base`."""
    return {name: {k: v.detach().to("cpu", copy=True) for k, v in getattr(teacher.pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder", "text_encoder_2") if getattr(teacher.pipe, name, None) is not None}


def restore_base(teacher, base: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Remove a fused LoRA: unload its layers, then put back the saved base weights bit for bit.

    ``unfuse_lora`` subtracts the update again, which is exact only up to rounding; copying the
    saved weights back makes the next student's pipeline identical to a freshly loaded teacher.
    """
    teacher.pipe.unload_lora_weights()
    for name, state in base.items():
        getattr(teacher.pipe, name).load_state_dict(state)


@torch.no_grad()
def generate(teacher, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
             resolution: int | None = None) -> np.ndarray:
    """uint8 (B, H, W, 3) images of ``prompts``, image k from the noise of ``seeds[k]`` (CPU generator)."""
    shape = teacher.latent_shape(resolution)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    side = resolution or teacher.resolution
    out = teacher.pipe(prompts, num_inference_steps=int(steps), guidance_scale=float(guidance), height=side, width=side,
                       latents=latents.to(teacher.device, teacher.unet.dtype), output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def route(row: Mapping[str, Any], teacher, captions: list[str]) -> list[int]:
    """The MSD student of each caption: the row's router on the (LoRA-free) teacher's pooled text embedding."""
    from rapm.msd import Router, pooled_features
    from rapm.teacher import encode_prompts

    router = Router.load(row["router"])
    groups = []
    for start in range(0, len(captions), 64):
        cond = encode_prompts(teacher, captions[start:start + 64])
        groups += router.assign(pooled_features(cond.prompt_embeds.cpu(), None if cond.pooled_embeds is None
                                                else cond.pooled_embeds.cpu())).tolist()
    return groups


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def sample_shard(row: Mapping[str, Any], teacher_cfg: Mapping[str, Any], sampling_cfg: Mapping[str, Any],
                 prompts_csv: str | Path, shard: int, out_dir: str | Path, manifest: str | Path,
                 *, resolution: int | None = None) -> dict[str, Any]:
    """Sample the missing images of one shard of a row; write its manifest CSV. Returns a summary."""
    t0 = time.time()
    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    lo, hi = shard_range(num_images(sampling_cfg, len(prompts)), int(sampling_cfg["shards"]), shard)
    seed = int(sampling_cfg["seed"])
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    settings = row_settings(row, teacher_cfg, sha256_file(prompts_csv), seed, resolution)
    settings_path = out_dir / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        log.info("%s: settings changed; discarding its images", out_dir)
        shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, settings)

    todo = [i for i in range(lo, hi) if not (images_dir / f"{i:06d}.png").is_file()]
    log.info("row %s, shard %d: images [%d, %d), %d to sample", row.get("name"), shard, lo, hi, len(todo))
    from rapm.teacher import load_teacher

    groups = plan = None
    if row["kind"] == "msd":
        # one teacher for routing and every student: each student's LoRA is fused for its prompts,
        # then removed by restoring the base weights
        teacher = load_teacher(teacher_cfg)
        groups = route(row, teacher, [prompts["caption"][i] for i in range(lo, hi)])
        plan = [({**row, "lora": lora}, [i for i in todo if groups[i - lo] == k]) for k, lora in enumerate(row["loras"])]
        plan = [(sub_row, indices) for sub_row, indices in plan if indices]
        if plan:
            base = base_weights(teacher)
    elif todo:
        teacher = load_row_pipeline(row, teacher_cfg)
        plan = [(row, todo)]
    bs = int(sampling_cfg["batch_size"])
    for n, (sub_row, indices) in enumerate(plan or []):
        if groups is not None:
            if n:
                restore_base(teacher, base)
            fuse_row_lora(teacher, sub_row)
        starts = range(0, len(indices), bs)
        for start in progress(starts, len(indices), f"sample {row.get('name')}", unit="img",
                              weight=lambda s: min(bs, len(indices) - s)):
            idx = indices[start:start + bs]
            images = generate(teacher, [prompts["caption"][i] for i in idx], [item_seed(seed, i) for i in idx],
                              steps=row["steps"], guidance=row["guidance"], resolution=resolution)
            for i, image in zip(idx, images):
                _write_png(image, images_dir / f"{i:06d}.png")
    table = prompts.iloc[lo:hi][["prompt_id", "image_id", "caption"]].copy()
    table.insert(0, "index", range(lo, hi))
    table["seed"] = [item_seed(seed, i) for i in range(lo, hi)]
    if groups is not None:
        table["group"] = list(groups)
    manifest = Path(manifest)
    rel = os.path.relpath(images_dir, manifest.parent)
    table["file"] = [f"{rel}/{i:06d}.png" for i in range(lo, hi)]
    with atomic_path(manifest) as tmp:
        table.to_csv(tmp, index=False)
    return {"row": row.get("name"), "shard": shard, "images": hi - lo, "sampled": len(todo),
            "wall_time_s": round(time.time() - t0, 1)}


def read_row_images(manifests: list[str | Path]) -> tuple[np.ndarray, pd.DataFrame]:
    """All images of a row (uint8 (n, H, W, 3), in index order) and their manifest rows."""
    from PIL import Image

    tables = []
    for m in manifests:
        t = pd.read_csv(m, keep_default_na=False)
        t["path"] = [str(Path(m).parent / f) for f in t["file"]]
        tables.append(t)
    table = pd.concat(tables).sort_values("index").reset_index(drop=True)
    if list(table["index"]) != list(range(len(table))):
        raise SamplingError(f"shard manifests {manifests} do not cover images 0..{len(table) - 1} exactly once")
    images = []
    for p in table["path"]:
        if not Path(p).is_file():
            raise SamplingError(f"{p}: image listed in its shard manifest is missing; rerun the sample_images job")
        images.append(np.asarray(Image.open(p).convert("RGB")))
    return np.stack(images), table
