"""Quality of a toy teacher on held-out prompts (``python -m rapm toy eval-teacher``).

Prompts are the captions of val-split scenes 0..n-1 (``scene_for(cfg, "val", i)``); every val
scene contains a colour-shape pair that never occurs in training, so this measures compositional
generalisation. Images are sampled with the teacher's own pipeline (DDIM trailing, classifier-free
guidance), image i from a generator seeded with ``seed + i`` (independent of the batch size), and
read back by :mod:`rapm.toy.reader`. Writes ``metrics.json`` (accuracies and the protocol) and
``samples.png`` (a captioned grid).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from rapm.cliargs import add_config_args, stage_config
from rapm.device import resolve_device
from rapm.io import write_json

log = logging.getLogger(__name__)


def sample_prompts(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """uint8 (N, H, W, 3) images of ``prompts``; image i uses ``torch.Generator().manual_seed(seed + i)``."""
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", mininterval=5):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np"
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _protocol(toy_cfg: Mapping, ecfg: Mapping, n: int) -> dict:
    """How the ``n`` images were made and read (the ``protocol`` entry of ``metrics.json``)."""
    return {
        "split": "val",
        "image_ids": f"0..{n - 1}",
        "holdout_pairs": list(toy_cfg["holdout_pairs"]),
        "sampler": "DDIM, timestep_spacing=trailing (the teacher's saved scheduler)",
        "steps": int(ecfg["steps"]),
        "guidance": float(ecfg["guidance"]),
        "seed": int(ecfg["seed"]),
        "image_seed": "seed + i",
        "reader": "rapm.toy.reader.accuracy",
    }


def eval_teacher(cfg: Mapping, teacher: str | Path, out_dir: str | Path, device: str | None = None) -> dict:
    """Sample ``toy_teacher.eval.num_prompts`` held-out val prompts with ``teacher``; score and save."""
    from rapm.images import captioned_grid
    from rapm.toy.reader import accuracy
    from rapm.toy.scene import caption, split_scenes, toy_settings
    from rapm.toy.tinysd import load_pipeline

    t0 = time.time()
    toy_cfg, tcfg = toy_settings(cfg["data"]["toy"]), cfg["toy_teacher"]
    ecfg = tcfg["eval"]
    torch.set_num_threads(int(tcfg["num_threads"]))
    dev = resolve_device(device or str(tcfg["device"]))
    n = int(ecfg["num_prompts"])
    if n > int(toy_cfg["num_val_images"]):
        raise ValueError(
            f"toy_teacher.eval.num_prompts={n} exceeds data.toy.num_val_images={toy_cfg['num_val_images']}"
        )
    scenes = split_scenes(toy_cfg, "val", range(n))
    prompts = [caption(s) for s in scenes]
    pipe = load_pipeline(teacher, dev)
    images = sample_prompts(
        pipe,
        prompts,
        steps=int(ecfg["steps"]),
        guidance=float(ecfg["guidance"]),
        seed=int(ecfg["seed"]),
        batch_size=int(ecfg["batch_size"]),
        device=dev,
    )
    acc = accuracy(images, scenes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = min(int(ecfg["grid_images"]), n)
    captioned_grid(images[:k], prompts[:k], out_dir / "samples.png")
    np.save(out_dir / "images.npy", images)
    result = {
        "teacher": str(teacher),
        "accuracy": acc,
        "protocol": _protocol(toy_cfg, ecfg, n),
        "device": str(dev),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json(out_dir / "metrics.json", result, sort_keys=False)
    print(
        " ".join(
            f"{key} {acc[key]:.3f}"
            for key in ("colour", "shape", "size", "position", "background", "all")
            if key in acc
        )
        + f" (n={n}, {ecfg['steps']} DDIM steps, guidance {ecfg['guidance']})"
    )
    return result


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm toy eval-teacher`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="StableDiffusionPipeline directory (e.g. rapm/assets/tinysd)")
    p.add_argument("--out-dir", required=True, help="where metrics.json and samples.png go")


def command(args: argparse.Namespace) -> int:

    cfg = stage_config(args, "data.toy", "toy_teacher")
    eval_teacher(cfg, teacher=args.teacher, out_dir=args.out_dir)
    return 0
