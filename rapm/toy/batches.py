"""Training batches of TinySD, the toy teacher (:mod:`rapm.toy.train_teacher`): renders of train-split
scenes, their captions (optionally with colour words left out), foreground masks, uint8 conversion.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

PHASE_VAE, PHASE_DIFFUSION = 0, 1


def train_batch(toy_cfg: Mapping, seed: int, phase: int, step: int, batch_size: int):
    """Scenes, captions and renders (float (B, 3, H, W) in [-1, 1]) of batch ``step`` of ``phase``."""
    from rapm.toy.render import render_batch
    from rapm.toy.scene import caption, sample_scene

    rng = np.random.default_rng([seed, phase, step])
    scenes = [
        sample_scene(
            rng, max_objects=int(toy_cfg["max_objects"]), holdout_pairs=toy_cfg["holdout_pairs"], split="train"
        )
        for _ in range(batch_size)
    ]
    images = render_batch(scenes, int(toy_cfg["image_size"]), rng.integers(0, 2**31 - 1, size=batch_size).tolist())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return scenes, [caption(s) for s in scenes], x, rng


def caption_without_colours(scene, drop) -> str:
    """The caption of ``scene`` with the colour word of object k left out where ``drop[k]``.

    "a small square at the top left and a large blue circle ..." is a caption in which the square's
    colour is unspecified: trained on such captions, the shape must be read from the shape word
    alone, not inferred from the colour (the train split never shows a held-out pair such as
    "blue square", so "blue and not a triangle" would otherwise predict "circle").
    """
    parts = [
        f"a {o.size} {o.shape} at the {o.position}" if d else f"a {o.size} {o.colour} {o.shape} at the {o.position}"
        for o, d in zip(scene.objects, drop)
    ]
    return f"{' and '.join(parts)} on a {scene.background} background"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def foreground_mask(x: torch.Tensor, scenes) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where a render ``x`` (in [-1, 1]) differs from its scene's background colour."""
    from rapm.toy.scene import BACKGROUNDS

    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=x.dtype, device=x.device)
    bg = (bg / 127.5 - 1.0)[:, :, None, None]
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 1.0 / 255).to(x.dtype)
