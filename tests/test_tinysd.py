"""TinySD, the embedded toy teacher: the training CLI (tiny budget, resume), the shipped pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rapm.toy import tinysd

pytestmark = pytest.mark.usefixtures("single_thread")

TOY = {
    "seed": 0,
    "image_size": 32,
    "num_train_images": 100,
    "num_val_images": 20,
    "max_objects": 2,
    "holdout_pairs": ["red triangle"],
}


def tiny_budget(steps=3):
    return {
        "data": {"toy": TOY},
        "toy_teacher": {
            "seed": 0,
            "device": "cpu",
            "num_threads": 1,
            "warmup_steps": 1,
            "lr_final_fraction": 0.1,
            "log_every": 1,
            "checkpoint_every": 2,
            "vae": {"steps": steps, "batch_size": 4, "lr": 1e-3, "kl_weight": 1e-6},
            "diffusion": {
                "steps": steps,
                "batch_size": 4,
                "lr": 1e-3,
                "weight_decay": 0.0,
                "caption_dropout": 0.1,
                "snr_gamma": 5.0,
                "ema_decay": 0.9,
                "grad_clip": 1.0,
            },
            "eval": {"num_prompts": 4, "steps": 4, "guidance": 6.0, "seed": 0, "batch_size": 4, "grid_images": 4},
        },
    }


def test_train_teacher_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from rapm.toy.train_teacher import train_teacher

    summary = train_teacher(tiny_budget(), tmp_path / "out", tmp_path / "state", command="test")
    pipe = tinysd.load_pipeline(tmp_path / "out")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert summary["seed"] == 0 and summary["command"] == "test" and summary["wall_time_s"] >= 0
    assert json.loads((tmp_path / "out" / "training.json").read_text())["diffusion"]["steps"] == 3
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    # the same command again: the VAE is loaded, the diffusion phase is complete, same weights
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    train_teacher(tiny_budget(), tmp_path / "out", tmp_path / "state", command="test")
    again = tinysd.load_pipeline(tmp_path / "out").unet.state_dict()
    assert all(torch.equal(unet_before[k], again[k]) for k in unet_before)
    # the second run loaded the VAE from the state directory; that local path is not written out
    assert not any(
        "_name_or_path" in json.loads((tmp_path / "out" / c / "config.json").read_text())
        for c in ("vae", "unet", "text_encoder")
    )


def test_training_is_deterministic_given_the_seed(tmp_path):
    from rapm.toy.train_teacher import train_teacher

    train_teacher(tiny_budget(2), tmp_path / "a", tmp_path / "a.state")
    train_teacher(tiny_budget(2), tmp_path / "b", tmp_path / "b.state")
    a, b = (
        tinysd.load_pipeline(tmp_path / "a").unet.state_dict(),
        tinysd.load_pipeline(tmp_path / "b").unet.state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not (tinysd.ASSET_DIR / "model_index.json").is_file(), reason="TinySD not shipped")
def test_shipped_teacher_loads_offline_through_the_teacher_path_and_is_small():
    from rapm.teacher import load_teacher
    from rapm.toy.eval_teacher import sample_prompts

    teacher = load_teacher({"path": "rapm:tinysd", "type": "auto", "dtype": "float32", "device": "cpu"})
    assert teacher.type == "sd15" and teacher.latent_shape() == (4, 8, 8) and teacher.resolution == 32
    assert tinysd.dir_size(tinysd.ASSET_DIR) < 25e6
    record = json.loads((tinysd.ASSET_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m rapm toy train-teacher") and "wall_time_s" in record
    images = sample_prompts(
        teacher.pipe,
        ["a large red circle at the center on a white background"] * 2,
        steps=10,
        guidance=6.0,
        seed=0,
        batch_size=2,
    )
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A crash right after the mid-way diffusion checkpoint (safetensors), then the same command again."""
    from rapm.toy import train_teacher as tt

    tt.train_teacher(tiny_budget(4), tmp_path / "straight", tmp_path / "straight.state")
    real, calls = tt._save_state, []

    def crash_after_first_diffusion_save(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.name == "diffusion.safetensors":
            calls.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(tt, "_save_state", crash_after_first_diffusion_save)
    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher(tiny_budget(4), tmp_path / "resumed", tmp_path / "resumed.state")
    monkeypatch.setattr(tt, "_save_state", real)
    from safetensors import safe_open

    with safe_open(str(calls[0]), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    tt.train_teacher(tiny_budget(4), tmp_path / "resumed", tmp_path / "resumed.state")
    a = tinysd.load_pipeline(tmp_path / "straight").unet.state_dict()
    b = tinysd.load_pipeline(tmp_path / "resumed").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_from_toy_clip_equals_open_clips_text_tower():
    """Every hidden state up to the end-of-text token equals open_clip's own forward (after ln_final)."""
    from rapm.toy.clip import load_toy_clip

    model, _, oc_tokenizer = load_toy_clip()
    tokenizer = tinysd.build_tokenizer()
    encoder = tinysd.text_encoder_from_open_clip(model, tokenizer).eval()
    captions = [
        "a small red circle at the top left and a large blue square at the center on a gray background",
        "a large green triangle at the bottom on a white background",
        "",
    ]
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    oc_ids = oc_tokenizer(captions)
    with torch.no_grad():
        ours = encoder(ids).last_hidden_state
        x = model.token_embedding(oc_ids) + model.positional_embedding
        theirs = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    ends = (oc_ids == tokenizer.eos_token_id).int().argmax(1) + 1
    for b, n in enumerate(ends.tolist()):
        assert torch.equal(ids[b, :n], oc_ids[b, :n])
        torch.testing.assert_close(ours[b, :n], theirs[b, :n], atol=1e-5, rtol=1e-5)
    assert (theirs[0, : ends[0]].std(0) > 0.01).all()  # real, varied states, not a trivial match


def test_text_encoder_from_open_clip_refuses_another_shape():
    from rapm.toy.clip import MODEL_CFG

    cfg = {**MODEL_CFG, "text_cfg": {**MODEL_CFG["text_cfg"], "width": 32, "heads": 2}}
    from open_clip.model import CLIP

    other = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    with pytest.raises(ValueError, match="token_embedding.weight is \\(49408, 32\\)"):
        tinysd.text_encoder_from_open_clip(other)


def test_text_init_from_toy_clip_and_frozen_text_encoder(tmp_path):
    """text_init=toyclip starts from the toy CLIP's text tower; text_lr=0 keeps it there, the UNet trains."""
    from rapm.toy.clip import load_toy_clip
    from rapm.toy.train_teacher import train_teacher

    cfg = tiny_budget(2)
    cfg["toy_teacher"]["diffusion"].update(text_init="toyclip", text_lr=0.0, ema_decay=0.0)
    train_teacher(cfg, tmp_path / "frozen", tmp_path / "frozen.state")
    init = tinysd.text_encoder_from_open_clip(load_toy_clip()[0]).state_dict()
    frozen = tinysd.load_pipeline(tmp_path / "frozen")
    got = frozen.text_encoder.state_dict()
    # saved in float16: equal to the initial weights up to that rounding
    assert all(torch.equal(got[k], init[k].half().float()) for k in init if "position_ids" not in k)
    fresh = tinysd.build_unet().state_dict()
    assert any(not torch.equal(frozen.unet.state_dict()[k], fresh[k].half().float()) for k in fresh)

    cfg["toy_teacher"]["diffusion"]["text_lr"] = 1e-3
    train_teacher(cfg, tmp_path / "tuned", tmp_path / "tuned.state")
    tuned = tinysd.load_pipeline(tmp_path / "tuned").text_encoder.state_dict()
    assert any(not torch.equal(tuned[k], got[k]) for k in got)


def test_foreground_mask_marks_exactly_the_object_pixels():
    from rapm.toy.render import render
    from rapm.toy.scene import Scene, ToyObject
    from rapm.toy.train_teacher import foreground_mask

    scenes = [
        Scene((ToyObject("red", "circle", "large", "center"),), "white"),
        Scene(
            (ToyObject("blue", "square", "small", "top left"), ToyObject("green", "triangle", "large", "bottom")),
            "black",
        ),
    ]
    images = np.stack([render(s, 32, 0) for s in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    mask = foreground_mask(x, scenes)
    expected = np.stack([(images[0] != 255).any(-1), (images[1] != 0).any(-1)])
    assert mask.shape == (2, 1, 32, 32) and np.array_equal(mask[:, 0].numpy().astype(bool), expected)
    assert 40 < expected[0].sum() < 120  # a 9 px circle, anti-aliased


def test_caption_without_colours_leaves_out_exactly_the_chosen_colour_words():
    from rapm.toy.scene import Scene, ToyObject, caption
    from rapm.toy.train_teacher import caption_without_colours

    scene = Scene((ToyObject("red", "circle", "small", "top"), ToyObject("blue", "square", "large", "left")), "gray")
    assert caption_without_colours(scene, [False, False]) == caption(scene)
    assert caption_without_colours(scene, [True, False]) == (
        "a small circle at the top and a large blue square at the left on a gray background"
    )
    assert caption_without_colours(scene, [True, True]) == (
        "a small circle at the top and a large square at the left on a gray background"
    )
