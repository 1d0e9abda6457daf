"""The text conditioning of the teacher's UNet, as its diffusers pipeline builds it.

- :class:`Conditioning`: what the UNet consumes for a batch (SD1.5: the encoder hidden states; SDXL: also
  the pooled embedding and the micro-conditioning time ids), movable, expandable, concatenable and
  storable as flat tensors (the trajectory store keeps it);
- :func:`encode_prompts` / :func:`unconditional`: the pipeline's own ``encode_prompt`` for a list of
  prompts and for the empty prompt of classifier-free guidance (SDXL's ``force_zeros_for_empty_prompt``
  obeyed), for a :class:`rapm.teacher.Teacher`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rapm.teacher import Teacher


@dataclass
class Conditioning:
    """The text conditioning of a batch, as the UNet consumes it.

    ``prompt_embeds`` (B, L, D): the encoder hidden states, L = tokenizer length, 77 for SD (SDXL: both encoders' penultimate layers,
    concatenated). SDXL only: ``pooled_embeds`` (B, P), the second encoder's projected EOS embedding,
    and ``add_time_ids`` (B, 6) = (original height, width, crop top, left, target height, width).
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty fields by name (what a trajectory file stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> Conditioning:
        """Inverse of :meth:`tensors`."""
        return cls(**{f.name: tensors.get(f.name) for f in dataclasses.fields(cls)})

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{name: fn(t) for name, t in self.tensors().items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a batch of one to ``batch_size`` (a batch of that size is returned as is)."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {batch_size}")
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        names = items[0].tensors().keys()
        return Conditioning(**{n: torch.cat([c.tensors()[n] for c in items]) for n in names})

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_embeds, "time_ids": self.add_time_ids}
        return kwargs


# --- text conditioning ---------------------------------------------------------------------------


def add_time_ids(teacher: Teacher, batch_size: int, dtype: torch.dtype, resolution: int | None) -> Tensor:
    """SDXL micro-conditioning: original size = target size = resolution, crop (0, 0), via the pipeline."""
    pipe = teacher.pipe
    side = resolution or pipe.default_sample_size * pipe.vae_scale_factor
    projection_dim = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids(
        (side, side), (0, 0), (side, side), dtype=dtype, text_encoder_projection_dim=projection_dim
    )
    return ids.to(teacher.device).repeat(batch_size, 1)


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: Sequence[str], *, resolution: int | None = None) -> Conditioning:
    """The conditioning the pipeline builds for ``prompts`` (its own ``encode_prompt``), one row per prompt.

    SDXL: also the pooled embedding and the time ids for square ``resolution``-pixel images
    (default: the pipeline's default size), as ``StableDiffusionXLPipeline.__call__`` makes them.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    pipe = teacher.pipe
    if teacher.type == "sd15":
        embeds, _ = pipe.encode_prompt(prompts, teacher.device, 1, False)
        return Conditioning(embeds)
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=teacher.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return Conditioning(embeds, pooled, add_time_ids(teacher, len(prompts), embeds.dtype, resolution))


@torch.no_grad()
def unconditional(teacher: Teacher) -> Conditioning:
    """The unconditional (∅) conditioning of classifier-free guidance, batch 1, as the pipeline makes it.

    SD1.5: the encoded empty prompt. SDXL: zeros when the pipeline's ``force_zeros_for_empty_prompt``
    is set (SDXL base), else the encoded empty prompt; time ids for the default size (:func:`unet_eps`
    uses the conditional batch's time ids, like the pipeline). Cached on the teacher.
    """
    if teacher._uncond is None:
        pipe = teacher.pipe
        if teacher.type == "sd15":
            _, negative = pipe.encode_prompt([""], teacher.device, 1, True)
            teacher._uncond = Conditioning(negative)
        else:
            _, negative, _, negative_pooled = pipe.encode_prompt(
                prompt=[""], device=teacher.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            ids = add_time_ids(teacher, 1, negative.dtype, None)
            teacher._uncond = Conditioning(negative, negative_pooled, ids)
    return teacher._uncond
