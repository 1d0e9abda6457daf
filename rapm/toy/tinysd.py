"""TinySD: the embedded toy teacher, a Stable-Diffusion-shaped latent diffusion model in miniature.

Same components and interfaces as SD1.5 (``AutoencoderKL`` + ``UNet2DConditionModel`` +
``CLIPTextModel`` with the real CLIP tokenizer + DDIM), so every stage of the pipeline runs on it
unchanged; only the sizes differ:

=============  =====================================================================
VAE            32x32 RGB <-> 4x8x8 latents (3 blocks, 32/64/64 channels, factor 4)
UNet           8x8 latents, 3 levels (32/64/128 channels), cross-attention at every level
text encoder   CLIP, 3 layers, width 64, 32 positions, vocabulary 49,408 (exact CLIP BPE);
               initialised from the text tower of the toy CLIP (as SD1.5's is OpenAI CLIP's)
scheduler      SD's scaled-linear betas, epsilon prediction, DDIM "trailing" spacing
=============  =====================================================================

Builders return freshly initialised modules from these configs (no download); the trained
weights ship in ``rapm/assets/tinysd`` (see :func:`shipped_path`) as float16 safetensors, about
21 MB with the tokenizer files, and load with ``StableDiffusionPipeline.from_pretrained(path)`` in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rapm.io import write_json

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tinysd"
IMAGE_SIZE = 32
LATENT_SIZE = 8

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],  # 2 downsamplers: 32x32 -> 8x8
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # replaced after VAE training by 1 / std of the training latents
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[32, 64, 128],  # 8x8, 4x4, 2x2
    layers_per_block=1,
    attention_head_dim=[2, 4, 8],  # diffusers' name for the number of heads: 16 channels per head
    cross_attention_dim=64,  # = text encoder width
    norm_num_groups=16,
)

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,  # the CLIP BPE vocabulary (rapm.tokenizer.VOCAB_SIZE)
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=32,  # toy captions are at most 24 tokens; the pipeline pads to this
    projection_dim=64,
    hidden_act="gelu",  # open_clip's text transformer uses exact GELU (no quick_gelu)
)  # = the text tower of rapm.toy.clipmodel.MODEL_CFG, so text_encoder_from_open_clip can copy it

SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="trailing",
    set_alpha_to_one=False,
    clip_sample=False,
    steps_offset=1,
)


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, "scaling_factor": float(scaling_factor)})


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_tokenizer():
    from rapm.tokenizer import clip_tokenizer

    return clip_tokenizer(model_max_length=TEXT_CONFIG["max_position_embeddings"])


def build_text_encoder(tokenizer=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer or build_tokenizer()
    config = CLIPTextConfig(
        **TEXT_CONFIG, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    return CLIPTextModel(config)


def text_encoder_from_open_clip(clip_model, tokenizer=None):
    """A ``CLIPTextModel`` holding the text tower of an open_clip model of the toy CLIP's shape.

    The mapping is the one between OpenAI's CLIP and transformers' port of it: token and position
    embeddings, per block ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``, the fused
    ``in_proj`` split into q/k/v, ``c_fc``/``c_proj`` -> ``fc1``/``fc2``, ``ln_final`` ->
    ``final_layer_norm``. Both are causal, so the hidden state of every token up to the
    end-of-text token is the same (the padding id differs: open_clip pads with 0, SD's tokenizer
    with the end-of-text token, which only changes the states after it).
    """
    sd = clip_model.state_dict()
    width, n_layers = TEXT_CONFIG["hidden_size"], TEXT_CONFIG["num_hidden_layers"]
    shapes = {
        "token_embedding.weight": (TEXT_CONFIG["vocab_size"], width),
        "positional_embedding": (TEXT_CONFIG["max_position_embeddings"], width),
    }
    for key, shape in shapes.items():
        if key not in sd or tuple(sd[key].shape) != shape:
            raise ValueError(
                f"open_clip model: {key} is {tuple(sd[key].shape) if key in sd else 'missing'}, "
                f"expected {shape} (TinySD's TEXT_CONFIG)"
            )
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(n_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
        for kind in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{kind}"] = part
    model = build_text_encoder(tokenizer)
    missing, unexpected = model.load_state_dict(
        {k.removeprefix("text_model."): v.detach().clone().float() for k, v in out.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return model


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_pipeline(vae=None, unet=None, text_encoder=None, tokenizer=None):
    """A ``StableDiffusionPipeline`` from the given (or fresh) components and a DDIM trailing scheduler."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tokenizer or build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else build_vae(),
        text_encoder=text_encoder if text_encoder is not None else build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet if unet is not None else build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_counts(pipe) -> dict[str, int]:
    """Parameters per trainable component (and their total)."""
    out = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("vae", "unet", "text_encoder")}
    out["total"] = sum(out.values())
    return out


def save_pipeline(pipe, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save ``pipe`` as safetensors in ``dtype`` (the modules are cast on copies, ``pipe`` is untouched).

    The text encoder's config records ``dtype: float32``: transformers 5 loads a model in the dtype
    its config names, so a plain ``from_pretrained(path)`` gives an all-float32 pipeline (diffusers
    models load in float32 by default) instead of a float16 text encoder beside a float32 UNet.
    """
    import copy

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = build_pipeline(
        *(copy.deepcopy(getattr(pipe, n)).to(dtype) for n in ("vae", "unet", "text_encoder")), tokenizer=pipe.tokenizer
    )
    out.save_pretrained(path, safe_serialization=True)
    from rapm.io import apply_umask_mode

    apply_umask_mode(path.rglob("*.safetensors"))  # safetensors' save_file leaves them 0600 whatever the umask
    for component in ("vae", "unet", "text_encoder"):  # a resumed run loads the VAE from its state dir,
        config_path = path / component / "config.json"  # and diffusers records that local path
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            write_json(config_path, config)
    config_path = path / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    write_json(config_path, config)
    return path


def load_pipeline(path: str | Path = ASSET_DIR, device: str | torch.device = "cpu"):
    """Load a saved TinySD pipeline in float32 (no network)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def shipped_path() -> Path:
    """The trained TinySD pipeline inside the package (``rapm/assets/tinysd``)."""
    return ASSET_DIR


def dir_size(path: str | Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
