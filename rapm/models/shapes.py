"""The published UNet, VAE and text-encoder configs of SD1.5 and SDXL, for random-weight models of the real sizes.

Used by the benchmarks (``benchmarks/trajectories.py``, ``benchmarks/train.py``, the random pipelines of
:mod:`rapm.benchmarking`) to measure speed and memory on SD-shaped models without downloading any weights.
"""

# The published UNet configs of SD1.5 (runwayml/stable-diffusion-v1-5) and SDXL base 1.0 (859.5M / 2567.5M params).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: The published AutoencoderKL of SD1.5 and SDXL (same architecture, 83.7M parameters).
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
VAE_CONFIGS = {
    "sd15": {**SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}
#: CLIP ViT-L/14's text tower (SD1.5's encoder, SDXL's first) and OpenCLIP ViT-bigG/14's (SDXL's second).
CLIP_L_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
OPENCLIP_BIGG_TEXT = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
MODELS = {  # unet config, latent (C, H, W), conditioning shapes per trajectory
    "sd15": (SD15_UNET, (4, 64, 64), {"prompt_embeds": (77, 768)}),
    "sdxl": (SDXL_UNET, (4, 128, 128), {"prompt_embeds": (77, 2048), "pooled_embeds": (1280,), "add_time_ids": (6,)}),
}


def build_unet(name: str):
    """A random-weight ``UNet2DConditionModel`` of the published ``name`` (sd15 or sdxl) config."""
    from diffusers import UNet2DConditionModel

    if name not in MODELS:
        raise ValueError(f"unknown model shape {name!r}; choose {', '.join(MODELS)}")
    return UNet2DConditionModel(**MODELS[name][0])
