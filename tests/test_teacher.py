"""rapm.teacher and rapm.models.tiny: one loading path for SD1.5 and SDXL, checked against the pipelines.

The oracle is the loaded diffusers pipeline itself (its DDIM trailing scheduler, its own prompt
encoding, CFG and VAE decode): sampling with rapm.schedule + rapm.teacher must give the same
latents and images for the same prompt, initial latents, guidance and step count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rapm
from rapm import teacher as teacher_mod
from rapm.conditioning import Conditioning, encode_prompts, unconditional
from rapm.config import load_config
from rapm.schedule import coarse_timesteps, ddim_sample, delta_timesteps, fine_timesteps
from rapm.teacher import (
    TEACHER_DEFAULTS,
    TeacherLoadError,
    decode_latents,
    detect_type,
    encode_images,
    load_teacher,
    unet_eps,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle above a blue square", "a green triangle"]


@pytest.fixture(params=["sd15", "sdxl"])
def teacher(request):
    return request.getfixturevalue(f"{request.param.replace('15', '')}_teacher")


def latents(teacher, batch, seed=0):
    return torch.randn(batch, *teacher.latent_shape(), generator=torch.Generator().manual_seed(seed))


def capture_unet_inputs(unet):
    """Record the keyword arguments of every UNet forward (a pre-hook; returns the list and the handle)."""
    calls = []
    handle = unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls, handle


# --- tiny pipelines --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_tiny_pipelines_round_trip_as_safetensors(name, request):
    pipe, path = request.getfixturevalue(f"tiny_{name}"), request.getfixturevalue(f"tiny_{name}_dir")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    weights = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.safetensors"))
    assert "unet/diffusion_pytorch_model.safetensors" in weights and not list(path.rglob("*.bin"))
    reloaded = type(pipe).from_pretrained(path, **({"safety_checker": None} if name == "sd" else {}))
    for component in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if name == "sdxl" else ()):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(reloaded, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert reloaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


def test_tiny_sdxl_unet_is_sdxl_shaped(tiny_sdxl):
    unet = tiny_sdxl.unet.config
    assert unet.addition_embed_type == "text_time"
    assert (
        unet.cross_attention_dim
        == tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size
    )
    assert (
        unet.projection_class_embeddings_input_dim
        == 6 * unet.addition_time_embed_dim + tiny_sdxl.text_encoder_2.config.projection_dim
    )


def test_tiny_builders_are_seeded():
    from rapm.models import build_tiny_pipeline

    a, b, c = (build_tiny_pipeline("sd15", seed=s).unet for s in (0, 0, 1))
    w = "conv_in.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    with pytest.raises(ValueError, match="unknown tiny pipeline 'sd3'"):
        build_tiny_pipeline("sd3")


# --- loading ---------------------------------------------------------------------------------------


def test_load_teacher_sets_ddim_trailing_and_freezes(teacher):
    from diffusers import DDIMScheduler

    sched = teacher.scheduler
    assert type(sched) is DDIMScheduler
    assert sched.config.timestep_spacing == "trailing"
    assert sched.config.set_alpha_to_one is False and sched.config.clip_sample is False
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    assert teacher.latent_shape() == (4, 8, 8) and teacher.resolution == 16
    meta = json.loads(json.dumps(teacher.metadata()))
    assert meta["type"] == teacher.type and meta["scheduler"]["timestep_spacing"] == "trailing"
    if teacher.type == "sd15":
        assert teacher.pipe.safety_checker is None
    else:
        assert teacher.pipe.watermark is None


def test_type_detection():
    assert detect_type({"_class_name": "StableDiffusionPipeline", "unet": [1]}) == "sd15"
    assert detect_type({"_class_name": "StableDiffusionXLPipeline"}) == "sdxl"
    other = {"_class_name": "SomeSDXLVariant", "unet": ["diffusers", "UNet2DConditionModel"]}
    assert detect_type({**other, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) == "sdxl"
    assert detect_type({**other, "text_encoder_2": [None, None], "text_encoder": ["x", "y"]}) == "sd15"
    assert detect_type({"_class_name": "StableDiffusion3Pipeline", "transformer": ["x", "y"]}) is None


def test_type_stated_in_config(tiny_sdxl_dir):
    assert load_teacher({"path": str(tiny_sdxl_dir), "type": "sdxl", "device": "cpu"}).type == "sdxl"
    with pytest.raises(TeacherLoadError, match="teacher.type is sd15 but the pipeline is sdxl"):
        load_teacher({"path": str(tiny_sdxl_dir), "type": "sd15", "device": "cpu"})


def test_packaged_teacher_path(tiny_sd_dir, monkeypatch):
    # rapm:<name> is rapm/assets/<name> of the installed package (the toy teacher: rapm:tinysd)
    assert teacher_mod.ASSET_ROOT == Path(rapm.__file__).resolve().parent / "assets"
    monkeypatch.setattr(teacher_mod, "ASSET_ROOT", tiny_sd_dir.parent)
    loaded = load_teacher({"path": f"rapm:{tiny_sd_dir.name}", "device": "cpu"})
    assert loaded.type == "sd15" and loaded.location == str(tiny_sd_dir)
    with pytest.raises(
        TeacherLoadError, match=r"no pipeline directory .*nosuchmodel.*python -m rapm toy train-teacher"
    ):
        load_teacher({"path": "rapm:nosuchmodel"})


def test_default_config_section_is_what_load_teacher_takes():
    cfg = load_config([ROOT / "config" / "config.yaml"])["teacher"]
    assert set(cfg) <= set(TEACHER_DEFAULTS)
    assert cfg["path"] == "rapm:tinysd" and cfg["dtype"] == "float32" and cfg["device"] == "auto"


def test_missing_directory(tmp_path):
    with pytest.raises(TeacherLoadError, match=r"directory .*nowhere/at/all does not exist"):
        load_teacher({"path": str(tmp_path / "nowhere" / "at" / "all")})


def test_directory_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TeacherLoadError, match=r"is not a diffusers pipeline directory: it has no model_index.json"):
        load_teacher({"path": str(tmp_path)})
    with pytest.raises(TeacherLoadError, match=r"is a file, not a diffusers pipeline directory.*from_single_file"):
        load_teacher({"path": str(tmp_path / "model.safetensors")})


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(TeacherLoadError) as err:
        load_teacher({"path": "someone/stable-diffusion-v9", "revision": "abc123"})
    msg = str(err.value)
    assert "'someone/stable-diffusion-v9'" in msg and "model_index.json" in msg and "revision abc123" in msg
    assert "offline mode (HF_HUB_OFFLINE) is on" in msg
    assert "set teacher.path to it" in msg and "hf download someone/stable-diffusion-v9 --local-dir DIR" in msg


def test_bad_settings_fail_before_loading(tiny_sd_dir):
    with pytest.raises(ValueError, match=r"unknown teacher key\(s\) \['dtpye'\]"):
        load_teacher({"path": str(tiny_sd_dir), "dtpye": "float32"})
    with pytest.raises(ValueError, match="unknown teacher.dtype 'float8'"):
        load_teacher({"path": str(tiny_sd_dir), "dtype": "float8"})
    with pytest.raises(TeacherLoadError, match="float16 on the CPU"):
        load_teacher({"path": str(tiny_sd_dir), "dtype": "float16", "device": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(TeacherLoadError, match="no CUDA device"):
            load_teacher({"path": str(tiny_sd_dir), "device": "cuda"})


# --- conditioning ----------------------------------------------------------------------------------


def test_conditioning_is_what_the_pipeline_feeds_its_unet(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS), unconditional(teacher)
    calls, handle = capture_unet_inputs(teacher.unet)
    try:
        with torch.no_grad():
            teacher.pipe(
                PROMPTS, num_inference_steps=1, guidance_scale=5.0, latents=latents(teacher, 2), output_type="latent"
            )
    finally:
        handle.remove()
    ((_, fed),) = calls
    assert torch.equal(
        fed["encoder_hidden_states"], torch.cat([uncond.prompt_embeds.expand(2, -1, -1), cond.prompt_embeds])
    )
    if teacher.type == "sdxl":
        added = fed["added_cond_kwargs"]
        assert torch.equal(added["text_embeds"], torch.cat([uncond.pooled_embeds.expand(2, -1), cond.pooled_embeds]))
        assert torch.equal(added["time_ids"], torch.cat([cond.add_time_ids, cond.add_time_ids]))
        assert cond.add_time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop (0, 0), target size
        assert (
            uncond.prompt_embeds.abs().sum() == 0 and uncond.pooled_embeds.abs().sum() == 0
        )  # force_zeros_for_empty_prompt
        assert encode_prompts(teacher, PROMPTS[:1], resolution=32).add_time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    else:
        assert cond.pooled_embeds is None and uncond.prompt_embeds.abs().sum() > 0  # SD1.5: the encoded ""


def test_conditioning_helpers(sdxl_teacher):
    cond = encode_prompts(sdxl_teacher, PROMPTS)
    assert Conditioning.from_tensors(cond.tensors()).tensors().keys() == cond.tensors().keys()
    one = encode_prompts(sdxl_teacher, PROMPTS[:1])
    assert torch.equal(one.prompt_embeds, cond.prompt_embeds[:1])  # rows do not depend on the batch
    assert len(one.expand(3)) == 3 and len(Conditioning.cat([one, cond])) == 3
    with pytest.raises(ValueError, match="cannot expand"):
        cond.expand(3)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encode_prompts(sdxl_teacher, [])


# --- the denoiser ----------------------------------------------------------------------------------


def test_guided_eps_is_one_batched_forward(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS), unconditional(teacher)
    z = latents(teacher, 2, seed=1)
    t = torch.tensor([749, 249])
    with torch.no_grad():
        calls, handle = capture_unet_inputs(teacher.unet)
        guided = unet_eps(teacher, z, t, cond, guidance=7.5)
        handle.remove()
        plain = unet_eps(teacher, z, t, cond)  # w = 1: the conditional prediction, one forward
        ids = {"add_time_ids": cond.add_time_ids} if teacher.type == "sdxl" else {}
        alone = unet_eps(teacher, z, t, Conditioning(**{**uncond.expand(2).tensors(), **ids}))
        kwargs = cond.unet_kwargs()
        direct = teacher.unet(z, t, **kwargs).sample
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 4  # [uncond, cond] in one forward of batch 2B
    assert torch.equal(plain, direct)
    # a batch of 4 vs two batches of 2 differ by float rounding (~1e-6), amplified by w = 7.5
    assert (guided - (alone + 7.5 * (plain - alone))).abs().max().item() < 5e-5
    assert (unet_eps(teacher, z, t, cond, guidance=0.0) - alone).abs().max().item() < 1e-5


# --- sampling equals the pipeline ------------------------------------------------------------------


@pytest.mark.parametrize("num_steps, guidance", [(4, 7.5), (2, 1.0), (1, 3.0)])
def test_ddim_sample_equals_the_pipeline(teacher, num_steps, guidance):
    # Same prompt, initial latents, guidance and steps: our final state (latent and decoded image)
    # equals the pipeline's own output. Measured difference 0.0 on CPU float32; tolerance 1e-5.
    prompt = PROMPTS[0]
    z = latents(teacher, 1, seed=num_steps)
    cond = encode_prompts(teacher, [prompt])
    with torch.no_grad():
        ours, _ = ddim_sample(
            lambda x, t: unet_eps(teacher, x, t, cond, guidance), z, coarse_timesteps(num_steps), teacher.alphas_cumprod
        )
        image = decode_latents(teacher, ours)
        ref_latent = teacher.pipe(
            prompt, num_inference_steps=num_steps, guidance_scale=guidance, latents=z.clone(), output_type="latent"
        ).images
        ref_image = teacher.pipe(
            prompt, num_inference_steps=num_steps, guidance_scale=guidance, latents=z.clone(), output_type="pt"
        ).images
    assert (ours - ref_latent).abs().max().item() < 1e-5
    assert image.shape == ref_image.shape == (1, 3, 16, 16)
    assert (image - ref_image).abs().max().item() < 1e-5
    assert 0 <= image.min() and image.max() <= 1


def test_sdxl_end_to_end_from_saved_directory(tiny_sdxl_dir):
    # load -> encode (pooled + time ids) -> one guided eps -> fine DDIM with coarse and delta states -> decode
    teacher = load_teacher({"path": str(tiny_sdxl_dir), "type": "auto", "dtype": "float32", "device": "cpu"})
    assert teacher.type == "sdxl" and type(teacher.pipe).__name__ == "StableDiffusionXLPipeline"
    cond = encode_prompts(teacher, PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77, 64) and cond.pooled_embeds.shape == (2, 32)
    assert cond.add_time_ids.shape == (2, 6)
    z = latents(teacher, 2, seed=7)
    with torch.no_grad():
        eps = unet_eps(teacher, z, 999, cond, guidance=5.0)
        assert eps.shape == z.shape and torch.isfinite(eps).all()
        keep = coarse_timesteps(2) + delta_timesteps(2, 2)
        final, kept = ddim_sample(
            lambda x, t: unet_eps(teacher, x, t, cond, 5.0), z, fine_timesteps(2, 2), teacher.alphas_cumprod, keep=keep
        )
        images = decode_latents(teacher, final)
    assert sorted(kept) == sorted(set(keep)) and torch.equal(kept[0], final)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    # Canary: depends on the seeded random init of the tiny models (torch/diffusers/transformers versions).
    assert abs(eps.sum().item() - EPS_SUM_SDXL) < 1e-3
    assert abs(images.sum().item() - IMAGE_SUM_SDXL) < 1e-3


EPS_SUM_SDXL = 17.4940
IMAGE_SUM_SDXL = 642.9728


# --- VAE -------------------------------------------------------------------------------------------


def test_vae_encode_decode_scaling(tiny_sd_dir):
    teacher = load_teacher({"path": str(tiny_sd_dir), "device": "cpu"})  # a private copy: its VAE config is edited
    vae, sf = teacher.vae, teacher.vae.config.scaling_factor
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lat = encode_images(teacher, images)
    with torch.no_grad():
        raw = vae.encode(images * 2 - 1).latent_dist.mode()
        assert torch.allclose(lat, raw * sf)
        plain = decode_latents(teacher, lat)
        assert torch.allclose(plain, (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1), atol=1e-6)
    sampled = encode_images(teacher, images, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == lat.shape and not torch.equal(sampled, lat)
    # a VAE config with latents_mean/std (handled as in the SDXL pipeline): normalised latents, same images
    mean, std = (
        torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1),
        torch.tensor([2.0, 1.0, 0.5, 1.5]).view(1, 4, 1, 1),
    )
    vae.register_to_config(latents_mean=mean.flatten().tolist(), latents_std=std.flatten().tolist())
    lat_norm = encode_images(teacher, images)
    assert torch.allclose(lat_norm, (raw - mean) * sf / std, atol=1e-6)
    assert (decode_latents(teacher, lat_norm) - plain).abs().max().item() < 1e-5


def _half(teacher):
    """A float16 copy of a loaded float32 teacher, on the CPU (load_teacher refuses float16 there)."""
    import dataclasses

    for module in teacher.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            torch.nn.Module.to(module, torch.float16)
    return dataclasses.replace(teacher, dtype=torch.float16, _uncond=None)


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated")  # raised inside the SDXL pipeline's own decode
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_sdxl_float16_decodes_in_float32_and_matches_the_pipeline(tiny_sdxl_dir, device):
    if device == "cuda":
        teacher = load_teacher({"path": str(tiny_sdxl_dir), "dtype": "float16", "device": "cuda"})
    else:
        teacher = _half(load_teacher({"path": str(tiny_sdxl_dir), "dtype": "float32", "device": "cpu"}))
    assert teacher.unet.dtype == teacher.vae.dtype == torch.float16 and teacher.vae.config.force_upcast
    cond = encode_prompts(teacher, PROMPTS[:1])
    assert cond.prompt_embeds.dtype == torch.float16
    z = latents(teacher, 1).to(teacher.device)
    with torch.no_grad():
        ours, _ = ddim_sample(
            lambda x, t: unet_eps(teacher, x, t, cond, 5.0), z, coarse_timesteps(4), teacher.alphas_cumprod
        )
        assert ours.dtype == torch.float32  # states stay in float32; only the UNet runs in float16
        image = decode_latents(teacher, ours)
        assert teacher.vae.dtype == torch.float16  # upcast only for the decode, as the SDXL pipeline does
        ref = teacher.pipe(
            PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, latents=z.half(), output_type="latent"
        ).images
        ref_image = decode_latents(teacher, ref)
        pipe_image = teacher.pipe(
            PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, latents=z.half(), output_type="pt"
        ).images
    # the pipeline keeps its states in float16: relative agreement ~1e-3 on latents of size ~50
    assert (ours - ref.float()).abs().max().item() < 5e-3 * ref.abs().max().item()
    assert (ref_image - pipe_image.float()).abs().max().item() < 1e-3  # our decode = the pipeline's decode
    assert (image - pipe_image.float()).abs().max().item() < 1e-2
