"""Building blocks of the benchmarks (``benchmarks/*.py``): random-weight SD-shaped teachers, RAPM set-ups, timing.

Nothing here downloads anything. The full-size models are built from the published configs with
random weights: the UNets, VAE and CLIP text encoders of :mod:`rapm.models.shapes` (SD1.5:
CLIP ViT-L/14; SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection), so a random pipeline
costs what the real one costs per call. ``tiny=True`` gives the tiny pipelines of
:mod:`rapm.models.tiny` instead (a CPU runs them in milliseconds).

The RAPM pieces mirror :class:`rapm.train.Trainer` (student LoRA, discriminator heads, AdamW, gradient
clipping) through the public API of :mod:`rapm.objective`, :mod:`rapm.lora` and
:mod:`rapm.discriminator` only, so a benchmark measures the code that trains.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from rapm.conditioning import Conditioning
from rapm.teacher import Teacher

MODEL_NAMES = ("sd15", "sdxl")


# --- devices and timing --------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, synchronised with the device on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak-memory window (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset; None on the CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and return cached CUDA blocks, so the next measurement starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device (the GPU's, or the CPU's core count)."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


class CallCounter:
    """Counts the forwards of a module (a forward pre-hook), e.g. UNet evaluations per update.

    ``with CallCounter(unet) as calls: ...`` then ``calls.n``; :meth:`take` reads and resets.
    """

    def __init__(self, module: nn.Module):
        self.module, self.n, self._handle = module, 0, None

    def __enter__(self) -> CallCounter:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args) -> None:
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def relative_difference(a: Tensor, b: Tensor) -> float:
    """||a − b|| / ||b|| in float64 (b is the reference); inf when b is 0 and a is not."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    num, den = float((a - b).norm()), float(b.norm())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


# --- random-weight teachers ----------------------------------------------------------------------


def ddim_trailing_scheduler(config: Mapping[str, Any] | None = None):
    """The inference/trajectory sampler of method.md ("Notation"): DDIM, trailing, as :func:`rapm.teacher.load_teacher` sets it."""
    from diffusers import DDIMScheduler

    from rapm.models.tiny import SD_SCHEDULER_CONFIG

    return DDIMScheduler.from_config(
        dict(config or SD_SCHEDULER_CONFIG), timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )


def _text_encoder(spec: Mapping[str, Any], with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rapm.tokenizer import VOCAB_SIZE

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
        **spec,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _full_pipeline(name: str, device: torch.device):
    """A random-weight pipeline of the published SD1.5 / SDXL architecture, its modules initialised on ``device``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    from rapm.models.shapes import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, VAE_CONFIGS, build_unet
    from rapm.tokenizer import clip_tokenizer

    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for SDXL's 3.5B parameters
        unet, vae = build_unet(name), AutoencoderKL(**VAE_CONFIGS[name])
        encoders = [_text_encoder(CLIP_L_TEXT, False)] + (
            [_text_encoder(OPENCLIP_BIGG_TEXT, True)] if name == "sdxl" else []
        )
    if name == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=ddim_trailing_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=ddim_trailing_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model shape {name!r}; choose {', '.join(MODEL_NAMES)}")


def _cast(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    # torch's Module.to: diffusers' ModelMixin.to logs a "keep in float32" warning on every cast
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def random_pipeline(
    name: str,
    *,
    tiny: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random-weight ``StableDiffusionPipeline`` (``sd15``) or ``StableDiffusionXLPipeline`` (``sdxl``).

    Full size (the published configs; built directly on ``device``, so a GPU initialises it in seconds) or
    ``tiny`` (:mod:`rapm.models.tiny`). Weights depend only on ``seed``; every module frozen, in eval mode.
    """
    _check_name(name)
    device = torch.device(device)
    torch.manual_seed(seed)
    if tiny:
        from rapm.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

        pipe = (tiny_sd_pipeline if name == "sd15" else tiny_sdxl_pipeline)(seed=seed)
    else:
        pipe = _full_pipeline(name, device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            _cast(module, device, dtype).requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_from_pipeline(pipe, name: str, *, source: str) -> Teacher:
    """A :class:`rapm.teacher.Teacher` around an in-memory pipeline, its scheduler set as ``load_teacher`` sets it."""
    _check_name(name)
    pipe.scheduler = ddim_trailing_scheduler(pipe.scheduler.config)
    return Teacher(
        pipe=pipe, type=name, dtype=pipe.unet.dtype, device=pipe.unet.device, source=source, location="memory"
    )


def random_teacher(
    name: str,
    *,
    tiny: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Teacher:
    """A teacher with the full random pipeline (text encoders, VAE, UNet): trajectories and sampling."""
    pipe = random_pipeline(name, tiny=tiny, device=device, dtype=dtype, seed=seed)
    return teacher_from_pipeline(pipe, name, source=f"random {name}{' (tiny)' if tiny else ''}")


def unet_teacher(
    name: str,
    *,
    tiny: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Teacher:
    """A teacher holding only the random UNet (what training uses: trajectories carry the text embeddings)."""
    _check_name(name)
    device = torch.device(device)
    torch.manual_seed(seed)
    if tiny:
        tiny_pipe = random_pipeline(name, tiny=True, seed=seed)
        unet, scale = tiny_pipe.unet, tiny_pipe.vae_scale_factor
    else:
        from rapm.models.shapes import build_unet

        with torch.device(device):
            unet, scale = build_unet(name), 8
    unet = _cast(unet, device, dtype).requires_grad_(False).eval()
    pipe = SimpleNamespace(unet=unet, scheduler=ddim_trailing_scheduler(), vae_scale_factor=scale)
    return Teacher(
        pipe=pipe,
        type=name,
        dtype=dtype,
        device=device,
        source=f"random {name} UNet{' (tiny)' if tiny else ''}",
        location="memory",
    )


def conditioning_shapes(unet) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the conditioning the UNet takes: 77 × cross-attention width; SDXL-type
    (``text_time``) also the pooled embedding and the six time ids."""
    c = unet.config
    shapes = {"prompt_embeds": (77, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        shapes["pooled_embeds"] = (c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,)
        shapes["add_time_ids"] = (6,)
    return shapes


def random_batch(teacher: Teacher, num_steps: int, batch_size: int = 1, *, seed: int = 0):
    """A :class:`rapm.objective.Batch` of random stored trajectories of the teacher's latent size, on its device."""
    from rapm.objective import Batch

    unet = teacher.unet
    c, side = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(
        **{
            k: torch.randn((batch_size, *s), generator=g).to(teacher.device)
            for k, s in conditioning_shapes(unet).items()
        }
    )
    coarse = torch.randn((batch_size, num_steps + 1, c, side, side), generator=g).to(teacher.device)
    delta = torch.randn((batch_size, num_steps, c, side, side), generator=g).to(teacher.device)
    return Batch(coarse=coarse, delta=delta, cond=cond, indices=list(range(batch_size)))


# --- RAPM set-up and updates ---------------------------------------------------------------------


@dataclass
class RAPMSetup:
    """A teacher UNet with the student LoRA, its discriminator heads, the objective and both optimisers."""

    teacher: Teacher
    disc: Any
    rapm: Any
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    cfg: dict
    num_steps: int

    @property
    def unet(self):
        return self.teacher.unet

    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)


def rapm_setup(
    teacher: Teacher,
    train: Mapping[str, Any] | None = None,
    *,
    num_steps: int = 4,
    steps_per_slot: int = 10,
    seed: int = 0,
) -> RAPMSetup:
    """What :class:`rapm.train.Trainer` builds around the teacher: LoRA, heads, :class:`rapm.objective.RAPM`, AdamW.

    ``train``: keys of the ``train`` config section (validated against the schema, defaults filled),
    e.g. ``{"mixed_precision": "bf16", "gradient_checkpointing": True}``. The grids are N = ``num_steps``
    coarse slots with Δ one fine step of M = ``steps_per_slot``.
    """
    from rapm.config import validate
    from rapm.discriminator import Discriminator
    from rapm.lora import add_student_lora, enable_gradient_checkpointing, lora_parameters
    from rapm.objective import RAPM, optimizers
    from rapm.schedule import coarse_timesteps, delta_timesteps

    cfg = validate({"train": dict(train or {})}, partial=True)["train"]
    unet = teacher.unet
    torch.manual_seed(seed)
    add_student_lora(unet, cfg["lora"])
    disc = Discriminator(unet, cfg["discriminator"]).to(teacher.device)
    if cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(unet)
    unet.train()  # as the trainer: only matters for checkpointing
    objective = RAPM(teacher, disc, coarse_timesteps(num_steps), delta_timesteps(num_steps, steps_per_slot), cfg)
    o = cfg["optim"]
    opt_g, opt_d = optimizers(o, lora_parameters(unet), disc.parameters())
    return RAPMSetup(teacher, disc, objective, opt_g, opt_d, cfg, num_steps)


def _clip_and_step(opt: torch.optim.Optimizer, params, clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def update(setup: RAPMSetup, kind: str, batch, iteration: int = 0) -> dict[str, float]:
    """One discriminator (``kind="d"``) or student (``"g"``) update as the trainer makes it: the iteration's
    noise, the loss and its backward, gradient clipping, the AdamW step. Returns ``{"loss", "grad_norm"}``."""
    from rapm.lora import lora_parameters

    noise = setup.rapm.draw_noise(int(setup.cfg["seed"]), iteration, len(batch.indices), batch.coarse.shape[2:])
    clip = float(setup.cfg["optim"]["grad_clip"])
    (setup.opt_d if kind == "d" else setup.opt_g).zero_grad(set_to_none=True)  # the other update's leftovers
    if kind == "d":
        loss = setup.rapm.discriminator_loss(batch, noise)["loss"]
        loss.backward()
        norm = _clip_and_step(setup.opt_d, list(setup.disc.parameters()), clip)
    elif kind == "g":
        loss = setup.rapm.generator_backward(batch, noise)["loss"]
        norm = _clip_and_step(setup.opt_g, lora_parameters(setup.unet), clip)
    else:
        raise ValueError(f"unknown update kind {kind!r}; use 'd' or 'g'")
    return {"loss": float(loss.detach()), "grad_norm": norm}


@contextlib.contextmanager
def exact_float32():
    """TF32 off for matmuls and cuDNN convolutions inside (a float32 reference that is float32)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
