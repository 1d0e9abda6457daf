"""Tiny random-weight Stable Diffusion pipelines, built from configs with no download.

Both builders return real diffusers pipelines (``StableDiffusionPipeline`` and
``StableDiffusionXLPipeline``) whose modules have the shapes of SD1.5 and SDXL shrunk to a few
hundred thousand parameters. They load, save (``save_pretrained``, safetensors) and run through
exactly the same code as the full-size teachers, so the tests of the teacher code path
(``rapm.teacher``) exercise the SD1.5 and SDXL branches on a CPU in seconds.

The text encoders use the exact CLIP vocabulary (``rapm.tokenizer.clip_tokenizer``); only the
hidden sizes are small. The scheduler is SD's training schedule (scaled_linear betas
0.00085 → 0.012, 1000 steps, epsilon prediction; see docs/method.md, "Notation").
"""

from __future__ import annotations

import torch

from rapm.tokenizer import VOCAB_SIZE, clip_tokenizer

#: SD's training noise schedule (method.md, "Notation"); what a real SD1.5/SDXL checkpoint ships.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


def _text_encoder(hidden_size: int, projection_dim: int | None = None):
    """A 2-layer CLIP text transformer over the full CLIP vocabulary (49,408 tokens).

    Two layers, because SDXL reads the penultimate hidden state. ``projection_dim`` set gives
    ``CLIPTextModelWithProjection`` (SDXL's second encoder, whose projected EOS embedding is the
    pooled text embedding).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=VOCAB_SIZE - 2,  # <|startoftext|>
        eos_token_id=VOCAB_SIZE - 1,  # <|endoftext|>; pooling takes the first EOS position
        pad_token_id=VOCAB_SIZE - 1,
        projection_dim=projection_dim or hidden_size,
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def _vae(sample_size: int, channels: tuple[int, ...]):
    """A tiny ``AutoencoderKL`` with 4 latent channels; images are ``sample_size * 2**(len(channels)-1)`` px."""
    from diffusers import AutoencoderKL

    scale = 2 ** (len(channels) - 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(channels),
        sample_size=sample_size * scale,
        scaling_factor=0.18215,
    ).eval()


def tiny_sd_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 8,
    unet_channels: tuple[int, int] = (32, 64),
    vae_channels: tuple[int, int] = (16, 16),
    text_dim: int = 32,
):
    """A random-weight SD1.5-shaped ``StableDiffusionPipeline`` (about 2.5M parameters).

    UNet2DConditionModel with one plain and one cross-attention level, ``sample_size`` × ``sample_size``
    latents of 4 channels; AutoencoderKL with ``len(vae_channels) - 1`` downsamplings; CLIPTextModel of
    width ``text_dim`` with the exact CLIP tokenizer. No safety checker. Weights depend only on ``seed``.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=unet_channels,
        layers_per_block=1,
        norm_num_groups=min(unet_channels) // 2,
        cross_attention_dim=text_dim,
        attention_head_dim=(4, 8),
    ).eval()
    vae = _vae(sample_size, vae_channels)
    text_encoder = _text_encoder(text_dim)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(model_max_length=77),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 8,
    unet_channels: tuple[int, int] = (32, 64),
    vae_channels: tuple[int, int] = (16, 16),
    text_dims: tuple[int, int] = (32, 32),
    projection_dim: int = 32,
    addition_time_embed_dim: int = 8,
):
    """A random-weight SDXL-shaped ``StableDiffusionXLPipeline``.

    Two text encoders as in SDXL (``CLIPTextModel`` and ``CLIPTextModelWithProjection``); the UNet's
    cross-attention width is the sum of their widths (SDXL concatenates their penultimate hidden
    states), and ``addition_embed_type="text_time"`` takes the pooled embedding (``projection_dim``)
    plus six time ids (original size, crop top-left, target size), each embedded with
    ``addition_time_embed_dim`` features: ``projection_class_embeddings_input_dim = 6 * 8 + 32``.
    ``force_zeros_for_empty_prompt=True`` as in SDXL base; no watermarker.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=unet_channels,
        layers_per_block=1,
        norm_num_groups=min(unet_channels) // 2,
        cross_attention_dim=sum(text_dims),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
    ).eval()
    vae = _vae(sample_size, vae_channels)
    text_encoder = _text_encoder(text_dims[0])
    text_encoder_2 = _text_encoder(text_dims[1], projection_dim=projection_dim)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(model_max_length=77),
        tokenizer_2=clip_tokenizer(model_max_length=77),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
