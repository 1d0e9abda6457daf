"""TinySD, the embedded toy teacher: the training CLI (tiny budget, resume), the shipped pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rapm.toy import tinysd

pytestmark = pytest.mark.usefixtures("single_thread")

TOY = {"seed": 0, "image_size": 32, "num_train_images": 100, "num_val_images": 20, "max_objects": 2,
       "holdout_pairs": ["red triangle"]}


def tiny_budget(steps=3):
    return {"data": {"toy": TOY}, "toy_teacher": {
        "seed": 0, "device": "cpu", "num_threads": 1, "warmup_steps": 1, "lr_final_fraction": 0.1, "log_every": 1,
        "checkpoint_every": 2,
        "vae": {"steps": steps, "batch_size": 4, "lr": 1e-3, "kl_weight": 1e-6},
        "diffusion": {"steps": steps, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "caption_dropout": 0.1,
                      "snr_gamma": 5.0, "ema_decay": 0.9, "grad_clip": 1.0},
        "eval": {"num_prompts": 4, "steps": 4, "guidance": 6.0, "seed": 0, "batch_size": 4, "grid_images": 4}}}


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


def test_training_is_deterministic_given_the_seed(tmp_path):
    from rapm.toy.train_teacher import train_teacher

    train_teacher(tiny_budget(2), tmp_path / "a", tmp_path / "a.state")
    train_teacher(tiny_budget(2), tmp_path / "b", tmp_path / "b.state")
    a, b = tinysd.load_pipeline(tmp_path / "a").unet.state_dict(), tinysd.load_pipeline(tmp_path / "b").unet.state_dict()
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
    images = sample_prompts(teacher.pipe, ["a large red circle at the center on a white background"] * 2,
                            steps=10, guidance=6.0, seed=0, batch_size=2)
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
