"""The teacher's diffusers pipeline as the sampling stages use it: a row's LoRA fused in and taken out
again bit for bit, and images from per-image seeds (plumbing shared by sampling, curves and MSD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rapm.errors import SamplingError


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
    if not lora or not Path(lora).is_file():
        raise SamplingError(f"{lora}: LoRA file not found (row {row['name']!r})")
    try:
        teacher.pipe.load_lora_weights(str(lora))
        teacher.pipe.fuse_lora()
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise SamplingError(f"{lora}: diffusers could not load it as a LoRA of {teacher.location}: {err}") from err


def base_weights(teacher) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of the teacher's LoRA-carrying models' weights, for :func:`restore_base`."""
    return {
        name: {k: v.detach().to("cpu", copy=True) for k, v in getattr(teacher.pipe, name).state_dict().items()}
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(teacher.pipe, name, None) is not None
    }


def restore_base(teacher, base: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Remove a fused LoRA: unload its layers, then put back the saved base weights bit for bit.

    ``unfuse_lora`` subtracts the update again, which is exact only up to rounding; copying the
    saved weights back makes the next student's pipeline identical to a freshly loaded teacher.
    """
    teacher.pipe.unload_lora_weights()
    for name, state in base.items():
        getattr(teacher.pipe, name).load_state_dict(state)


@torch.no_grad()
def generate(
    teacher, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, resolution: int | None = None
) -> np.ndarray:
    """uint8 (B, H, W, 3) images of ``prompts``, image k from the noise of ``seeds[k]`` (CPU generator)."""
    shape = teacher.latent_shape(resolution)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    side = resolution or teacher.resolution
    out = teacher.pipe(
        prompts,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        height=side,
        width=side,
        latents=latents.to(teacher.device, teacher.unet.dtype),
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
