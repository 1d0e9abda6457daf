"""The teacher's VAE: latents to images and back, as the diffusers pipelines do it.

The scaling factor, the latent mean/std where the VAE config has them (SDXL), and SDXL's fp16
``force_upcast`` are handled as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` handle
them. Re-exported by :mod:`rapm.teacher`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rapm.teacher import Teacher


def _latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor] | None:
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean).view(shape).to(like.device, like.dtype),
        torch.tensor(std).view(shape).to(like.device, like.dtype),
    )


@contextlib.contextmanager
def _vae_for_decoding(teacher: Teacher):
    """The VAE, upcast to float32 for the duration when SDXL's pipeline would upcast it.

    ``StableDiffusionXLPipeline`` decodes a float16 VAE whose config says ``force_upcast`` (the SDXL VAE
    overflows in float16) in float32 and casts it back afterwards; so do we, which keeps the
    pipeline's own ``__call__`` working on the shared modules.
    """
    vae = teacher.vae
    upcast = teacher.type == "sdxl" and vae.dtype == torch.float16 and vae.config.force_upcast
    # torch's Module.to: ModelMixin.to would log a "keep in float32" warning at every decode
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            torch.nn.Module.to(vae, torch.float16)


@torch.no_grad()
def decode_latents(teacher: Teacher, latents: Tensor) -> Tensor:
    """Latents → float32 images in [0, 1], (B, 3, H, W), as the pipelines' ``output_type="pt"``.

    Undoes the scaling factor (and the latent mean/std when the VAE config has them, as in the SDXL
    pipeline) and decodes in the VAE's dtype, or in float32 where the SDXL pipeline upcasts (fp16 with
    ``force_upcast``).
    """
    with _vae_for_decoding(teacher) as vae:
        x = latents.to(teacher.device, vae.dtype)
        stats = _latent_stats(vae, x)
        x = x * stats[1] / vae.config.scaling_factor + stats[0] if stats else x / vae.config.scaling_factor
        image = vae.decode(x, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(
    teacher: Teacher, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Images in [0, 1], (B, 3, H, W) → scaled float32 latents (the posterior mode, or a sample)."""
    with _vae_for_decoding(teacher) as vae:
        dist = vae.encode((images * 2 - 1).to(teacher.device, vae.dtype)).latent_dist
        latents = (dist.sample(generator) if sample else dist.mode()).float()
    stats = _latent_stats(vae, latents)
    sf = vae.config.scaling_factor
    return (latents - stats[0]) * sf / stats[1] if stats else latents * sf
