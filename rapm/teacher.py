"""The teacher: ONE code path that loads an SD1.5 or SDXL diffusers pipeline and runs it.

``load_teacher(cfg["teacher"])`` serves the toy teacher (``rapm:tinysd``), a local SD1.5/SDXL
directory and a hub id alike; only the model directory differs (house style, "For this project").
Around the loaded pipeline this module offers exactly what the RAPM stages need:

- the text conditioning the pipeline itself would feed its UNet: :mod:`rapm.conditioning`
  (:func:`~rapm.conditioning.encode_prompts`, :func:`~rapm.conditioning.unconditional`);
- :func:`unet_eps`: ε(z, t, c) with classifier-free guidance ε_w = ε_∅ + w (ε_c − ε_∅), conditional and
  unconditional in one batched forward (method.md, "Notation"), converted to ε whatever the
  model's ``prediction_type``;
- :func:`decode_latents` / :func:`encode_images` (from :mod:`rapm.vae`): the VAE, with the scaling
  factor (and SDXL's fp16 ``force_upcast``) handled as the pipelines do.

The scheduler is replaced by diffusers' DDIM with ``timestep_spacing="trailing"``,
``set_alpha_to_one=False``, ``clip_sample=False``: the inference sampler of method.md, whose
mathematics lives in :mod:`rapm.schedule` (``tests/test_teacher.py`` checks that sampling with these
functions reproduces the pipeline's own output).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from rapm.conditioning import Conditioning, unconditional
from rapm.config import section_defaults
from rapm.errors import RapmError
from rapm.schedule import alphas_cumprod_from_scheduler, cfg, check_prediction_type, to_epsilon
from rapm.vae import decode_latents, encode_images  # noqa: F401 - re-exported: the teacher's VAE

#: ``teacher.path`` prefix naming a pipeline directory shipped inside the package (``rapm/assets/<name>``).
ASSET_PREFIX = "rapm:"
ASSET_ROOT = Path(__file__).resolve().parent / "assets"

#: the ``teacher`` section's keys and defaults (from the schema, the one source of defaults)
TEACHER_DEFAULTS: dict[str, Any] = section_defaults("teacher")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: diffusers pipeline class → teacher type
PIPELINE_CLASSES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


class TeacherLoadError(RapmError, OSError):
    """The configured teacher cannot be found or is not a usable SD1.5/SDXL diffusers pipeline."""


# --- data types ----------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A loaded teacher: the diffusers pipeline (DDIM trailing scheduler) and how it was loaded."""

    pipe: Any
    type: str  # "sd15" | "sdxl"
    dtype: torch.dtype
    device: torch.device
    source: str  # teacher.path as configured
    location: str  # the directory or hub id it resolved to
    _uncond: Conditioning | None = field(default=None, repr=False)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t of the teacher's training schedule (float32, CPU)."""
        return alphas_cumprod_from_scheduler(self.scheduler)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def resolution(self) -> int:
        """The pipeline's default image side in pixels (UNet sample size × VAE factor)."""
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of one latent for square images of ``resolution`` pixels (default: :attr:`resolution`)."""
        side = (resolution or self.resolution) // self.pipe.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description, stored next to everything the teacher produces."""
        return {
            "path": self.source,
            "location": self.location,
            "type": self.type,
            "pipeline_class": type(self.pipe).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "resolution": self.resolution,
            "scheduler": {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")},
        }


# --- loading -------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_teacher_path(path: str) -> tuple[str, bool]:
    """``teacher.path`` → (local directory or hub id, is_local).

    ``rapm:<name>`` is the directory ``rapm/assets/<name>`` of the installed package (the toy teacher
    is ``rapm:tinysd``). An existing path is local; a non-existent ``owner/name`` is taken as a hub id;
    anything else is an error naming the directory.
    """
    if path.startswith(ASSET_PREFIX):
        name = path[len(ASSET_PREFIX) :]
        directory = ASSET_ROOT / name
        if not name or "/" in name or not directory.is_dir():
            shipped = sorted(p.name for p in ASSET_ROOT.glob("*") if (p / "model_index.json").is_file())
            raise TeacherLoadError(
                f"teacher.path {path!r}: no pipeline directory {directory} in the installed package "
                f"(shipped: {', '.join(shipped) or 'none'}). The toy teacher rapm:tinysd is made by "
                "`python -m rapm toy train-teacher`; or set teacher.path to a local pipeline directory."
            )
        return str(directory), True
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise TeacherLoadError(
                f"teacher.path {path!r} is a file, not a diffusers pipeline directory. A single-file checkpoint "
                "must be converted first, e.g. StableDiffusionPipeline.from_single_file(file).save_pretrained(dir)."
            )
        return str(local), True
    if _HUB_ID.match(path):
        return path, False
    raise TeacherLoadError(f"teacher.path: directory {local} does not exist (working directory: {Path.cwd()})")


def _read_model_index(location: str, is_local: bool, revision: str | None) -> dict:
    """model_index.json of a pipeline directory or hub repository, with errors that say what to do."""
    if is_local:
        index = Path(location) / "model_index.json"
        if not index.is_file():
            raise TeacherLoadError(
                f"{location} is not a diffusers pipeline directory: it has no model_index.json. Expected the "
                "layout DiffusionPipeline.save_pretrained writes (model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/)."
            )
        import json

        return json.loads(index.read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HfHubHTTPError

    offline = _hub_offline()
    try:
        return dict(DiffusionPipeline.load_config(location, revision=revision, local_files_only=offline))
    except (OSError, HfHubHTTPError, ValueError) as err:
        why = "offline mode (HF_HUB_OFFLINE) is on" if offline else "the hub could not be reached or has no such model"
        first_line = (str(err).splitlines() or [""])[0][:300]
        raise TeacherLoadError(
            f"teacher.path {location!r}: no local directory of that name, and it is not in the Hugging Face cache "
            f"as a hub model (looked for model_index.json, revision {revision or 'main'}); {why}. "
            f"Download the pipeline where there is network, e.g. `hf download {location} --local-dir DIR` "
            "(or DiffusionPipeline.from_pretrained(...).save_pretrained(DIR)), copy DIR here and set "
            f"teacher.path to it. Underlying error: {type(err).__name__}: {first_line}"
        ) from err


def detect_type(model_index: Mapping[str, Any]) -> str | None:
    """ "sd15" or "sdxl" from a model_index.json (class name, else the presence of text_encoder_2)."""
    cls = model_index.get("_class_name", "")
    if cls in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[cls]
    if "unet" not in model_index:
        return None
    second = model_index.get("text_encoder_2")
    if isinstance(second, (list, tuple)) and second and second[0] is not None:
        return "sdxl"
    if "text_encoder" in model_index:
        return "sd15"
    return None


def _resolve_device(device: str) -> torch.device:
    from rapm.device import DeviceError, resolve_device

    try:
        return resolve_device(device, key="teacher.device")
    except DeviceError as err:
        raise TeacherLoadError(str(err)) from None


def _dtype_keyword() -> str:
    """``dtype`` on diffusers versions that renamed it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - present since the rename
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _teacher_settings(teacher_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``teacher`` section over the schema's defaults; unknown keys, dtypes and types refused."""
    cfg = section_defaults("teacher")
    unknown = set(teacher_cfg or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown teacher key(s) {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(teacher_cfg or {})
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"unknown teacher.dtype {cfg['dtype']!r}; choose one of {sorted(DTYPES)}")
    if cfg["type"] not in ("auto", "sd15", "sdxl"):
        raise ValueError(f"unknown teacher.type {cfg['type']!r}; choose auto, sd15 or sdxl")
    return cfg


def _from_pretrained(location: str, is_local: bool, kind: str, dtype: torch.dtype, cfg: Mapping[str, Any]):
    """The diffusers pipeline of ``kind`` at ``location``, safety checker and watermarker off."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {_dtype_keyword(): dtype, "revision": cfg["revision"], "variant": cfg["variant"]}
    if is_local or _hub_offline():
        kwargs["local_files_only"] = True
    if kind == "sd15":
        pipeline_cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipeline_cls = StableDiffusionXLPipeline
        kwargs.update(add_watermarker=False)
    try:
        pipe = pipeline_cls.from_pretrained(location, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the location and cause
        raise TeacherLoadError(f"{location}: loading it as {pipeline_cls.__name__} failed: {err}") from err
    return pipe


def load_teacher(teacher_cfg: Mapping[str, Any] | None = None) -> Teacher:
    """Load the teacher described by the ``teacher`` config section (keys: see ``TEACHER_DEFAULTS``).

    Local directory, hub id or ``rapm:<asset>``; ``StableDiffusionPipeline`` or
    ``StableDiffusionXLPipeline`` by ``type`` (``auto``: from model_index.json); safety checker and
    watermarker off; weights in ``dtype`` on ``device`` (``auto``: cuda when available), frozen, in
    eval mode; scheduler replaced by DDIM trailing (method.md, "Notation").
    """
    cfg = _teacher_settings(teacher_cfg)
    dtype, device = DTYPES[cfg["dtype"]], _resolve_device(str(cfg["device"]))
    if dtype == torch.float16 and device.type == "cpu":
        raise TeacherLoadError("teacher.dtype float16 on the CPU is unsupported (slow, inexact); use float32 there")

    location, is_local = resolve_teacher_path(str(cfg["path"]))
    model_index = _read_model_index(location, is_local, cfg["revision"])
    detected = detect_type(model_index)
    kind = detected if cfg["type"] == "auto" else cfg["type"]
    if kind is None:
        raise TeacherLoadError(
            f"{location}: cannot tell the pipeline type from model_index.json (_class_name "
            f"{model_index.get('_class_name')!r}); only UNet-based SD1.5/SDXL pipelines are supported. If it is "
            "one, set teacher.type to sd15 or sdxl."
        )
    if detected is not None and kind != detected:
        raise TeacherLoadError(f"{location}: teacher.type is {kind} but the pipeline is {detected} (model_index.json)")

    from diffusers import DDIMScheduler

    pipe = _from_pretrained(location, is_local, kind, dtype, cfg)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    check_prediction_type(pipe.scheduler.config.prediction_type)
    if pipe.scheduler.config.thresholding:
        raise TeacherLoadError(f"{location}: the scheduler config asks for thresholding, which RAPM's DDIM does not do")
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise TeacherLoadError(f"{location}: the UNet takes a guidance embedding (an LCM-style model), not a teacher")
    pipe.to(device)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return Teacher(pipe=pipe, type=kind, dtype=dtype, device=device, source=str(cfg["path"]), location=location)


# --- the denoiser --------------------------------------------------------------------------------


def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The UNet's weight dtype, read from its first conv. diffusers' ``unet.dtype`` walks every module
    on each call (a LoRA multiplies them: 1 ms on the toy, twice per UNet call, a fifth of a D update)."""
    return unet.conv_in.weight.dtype


def _forward(teacher: Teacher, z: Tensor, t: int | Tensor, cond: Conditioning) -> Tensor:
    unet = teacher.unet
    if isinstance(t, Tensor):
        t = t.to(z.device)
    dtype = unet_dtype(unet)
    out = unet(z.to(dtype), t, **cond.to(z.device, dtype).unet_kwargs(), return_dict=False)[0]
    return out.to(z.dtype)


def unet_eps(
    teacher: Teacher,
    z: Tensor,
    t: int | Tensor,
    cond: Conditioning,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> Tensor:
    """ε(z, t, c) of the teacher's UNet (with whatever adapter is enabled on it), with guidance w.

    w = 1: one conditional forward (as the pipelines do for w ≤ 1). Otherwise ε_w = ε_∅ + w (ε_c − ε_∅),
    the unconditional and conditional halves in ONE batched forward ([∅, c], the pipelines' order);
    ``uncond`` defaults to :func:`unconditional`. The output is converted to ε from the model's
    ``prediction_type``. ``t``: an int or a (B,) tensor; a batch-1 ``cond`` is broadcast. States keep
    their dtype (the UNet runs in its own). Gradients flow when enabled (the student is this UNet plus
    LoRA); wrap teacher-only calls in ``torch.no_grad()``.
    """
    batch = len(z)
    cond = cond.expand(batch)
    if guidance == 1.0:
        out = _forward(teacher, z, t, cond)
    else:
        uncond = (uncond if uncond is not None else unconditional(teacher)).expand(batch)
        if cond.add_time_ids is not None:  # SDXL: the pipeline reuses the conditional time ids
            uncond = dataclasses.replace(uncond, add_time_ids=cond.add_time_ids)
        both = Conditioning.cat([uncond.to(z.device), cond.to(z.device)])
        t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 else t
        out_uncond, out_cond = _forward(teacher, torch.cat([z, z]), t2, both).chunk(2)
        out = cfg(out_uncond, out_cond, guidance)
    return to_epsilon(out, z, t, teacher.alphas_cumprod, teacher.prediction_type)
