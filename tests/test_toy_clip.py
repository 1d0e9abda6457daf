"""The toy evaluator CLIP: shipped weights load through open_clip, scores and features behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rapm.toy import clip as tc
from rapm.toy.scene import Scene, ToyObject, caption

TOY = {
    "seed": 0,
    "image_size": 32,
    "num_train_images": 100,
    "num_val_images": 100,
    "max_objects": 2,
    "holdout_pairs": ["red triangle", "green circle", "blue square", "yellow triangle"],
}


@pytest.fixture(scope="module")
def shipped():
    return tc.load_toy_clip("cpu")


@pytest.fixture(scope="module")
def val64():
    return tc.val_batch(TOY, 64)


def test_shipped_model_loads_through_open_clip_api():
    import open_clip
    from safetensors import safe_open

    weights = tc.ASSET_DIR / tc.WEIGHTS_NAME
    assert json.loads((tc.ASSET_DIR / f"{tc.MODEL_NAME}.json").read_text()) == tc.MODEL_CFG
    open_clip.add_model_config(tc.ASSET_DIR / f"{tc.MODEL_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(tc.MODEL_NAME, pretrained=str(weights))
    assert tuple(model.visual.image_size) == (32, 32)
    assert model.token_embedding.weight.shape == (49408, 64)
    assert weights.stat().st_size < 10_000_000
    with safe_open(str(weights), "pt") as f:  # the config travels with the weights
        meta = f.metadata()
    assert json.loads(meta["model_cfg"]) == tc.MODEL_CFG
    assert json.loads(meta["model_name"]) == tc.MODEL_NAME
    # same numbers as the package loader
    ref, _, _ = tc.load_toy_clip("cpu")
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_preprocess_matches_tensor_path(shipped, val64):
    from PIL import Image

    model, preprocess, _ = shipped
    images = val64[0][:8]
    via_pil = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(tc.to_model_input(images, model), via_pil, atol=1e-5, rtol=0)


def test_image_features_shape_determinism_and_layouts(shipped, val64):
    model = shipped[0]
    images = val64[0][:16]
    a = tc.image_features(images, model)
    assert a.shape == (16, tc.MODEL_CFG["embed_dim"]) and a.dtype == np.float64
    np.testing.assert_array_equal(a, tc.image_features(images, model))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # what clean-fid passes
    np.testing.assert_allclose(tc.image_features(nchw, model), a, atol=1e-6)
    np.testing.assert_allclose(tc.cleanfid_extractor(model)(nchw).numpy(), a, atol=1e-6)
    big = torch.nn.functional.interpolate(nchw, size=(64, 64), mode="nearest")  # other sizes are resized
    assert np.mean(np.sum(tc.image_features(big, model) * a, axis=1)) > 0.9
    with pytest.raises(ValueError, match="expected images"):
        tc.image_features(np.zeros((2, 32, 32), np.uint8), model)
    # pinned numbers: a refactor that changes the preprocessing or the weights fails here
    gray = np.full((1, 32, 32, 3), 128, np.uint8)
    np.testing.assert_allclose(tc.image_features(gray, model)[0, :3], PINNED_GRAY, atol=1e-4)


def test_clip_score_matching_beats_mismatched(shipped, val64):
    model, _, tok = shipped
    images, caps, _ = val64
    matched = tc.clip_score(images, caps, model, tok)
    shuffled = tc.clip_score(images, caps[1:] + caps[:1], model, tok)
    assert matched > shuffled + 30.0, (matched, shuffled)
    assert tc.clip_score(images, caps) == pytest.approx(matched, abs=1e-4)  # default = shipped model
    with pytest.raises(ValueError):
        tc.clip_score(images, caps[:-1], model, tok)


def test_retrieval_and_attribute_discrimination_on_val(shipped, val64):
    model, _, tok = shipped
    images, _, scenes = val64
    m = tc.evaluate(model, tok, images, scenes)
    assert m["i2t_top1"] >= 0.70, m
    assert m["attr_all"] >= 0.85, m
    for kind in ("colour", "shape", "size", "position", "background"):
        assert m[f"attr_{kind}"] >= 0.75, (kind, m)


def test_perturb_changes_exactly_one_attribute():
    rng = np.random.default_rng(0)
    one = Scene((ToyObject("red", "circle", "small", "top left"),), "gray")
    two = Scene(
        (ToyObject("red", "circle", "small", "top left"), ToyObject("blue", "square", "large", "center")), "black"
    )
    assert tc.perturb(one, "swap", rng) is None
    swapped = tc.perturb(two, "swap", rng)
    assert caption(swapped) == (
        "a small blue circle at the top left and a large red square at the center on a black background"
    )
    for kind in ("colour", "shape", "size", "position"):
        for _ in range(20):
            p = tc.perturb(two, kind, rng)
            assert p != two and p.background == two.background and len(p.objects) == 2
            if kind == "position":  # one object moved to a free cell
                assert len({o.position for o in p.objects} - {o.position for o in two.objects}) == 1
            else:  # same cells, same order; exactly one object differs, in `kind` only
                diffs = [(a, b) for a, b in zip(two.objects, p.objects) if a != b]
                assert len(diffs) == 1
                a, b = diffs[0]
                assert [f for f in ("colour", "shape", "size", "position") if getattr(a, f) != getattr(b, f)] == [kind]
    assert tc.perturb(two, "background", rng).background != "black"
    with pytest.raises(ValueError, match="unknown attribute"):
        tc.perturb(two, "texture", rng)
    for _ in range(50):  # held-out pairs never appear in training negatives
        neg = tc.hard_negative(one, rng, forbidden_pairs=(("red", "triangle"), ("green", "circle")))
        assert all((o.colour, o.shape) not in {("red", "triangle"), ("green", "circle")} for o in neg.objects)


def test_training_is_seeded_and_resumes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = {
        "seed": 3,
        "steps": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 1,
        "weight_decay": 0.1,
        "hard_negatives": 1,
        "include_holdout_pairs": False,
        "eval_images": 8,
    }
    summary = tc.train_toy_clip(cfg, TOY, tmp_path / "a", log_every=1, checkpoint_every=1)
    assert summary["metrics"]["val"]["n"] == 8 and not (tmp_path / "a" / "train_state.safetensors").exists()
    assert [json.loads(l)["step"] for l in open(tmp_path / "a" / "train_log.jsonl")] == [1, 2]

    real_lr = tc._lr

    def crash_at_step_1(step, c):
        if step == 1:
            raise KeyboardInterrupt
        return real_lr(step, c)

    monkeypatch.setattr(tc, "_lr", crash_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        tc.train_toy_clip(cfg, TOY, tmp_path / "b", log_every=1, checkpoint_every=1)
    assert (tmp_path / "b" / "train_state.safetensors").exists()
    monkeypatch.setattr(tc, "_lr", real_lr)
    tc.train_toy_clip(cfg, TOY, tmp_path / "b", log_every=1, checkpoint_every=1)  # same command again: resumes
    a, b = load_file(tmp_path / "a" / tc.WEIGHTS_NAME), load_file(tmp_path / "b" / tc.WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    emb = a["token_embedding.weight"]
    assert 10 < int((emb.abs().sum(1) > 0).sum()) < 100  # only the toy vocabulary's rows are kept


def test_cli_parses_train_clip():
    from rapm.cli import build_parser, requested
    from rapm.toy import clip

    argv = ["toy", "train-clip", "--config", "config/config.yaml", "--out-dir", "x"]
    args = build_parser(requested(argv)).parse_args(argv)
    assert args.func is clip.command and args.threads == 1  # the stage module owns its command


PINNED_GRAY = [-0.08291143, 0.12454713, -0.08660951]  # image_features of a flat gray 32x32 image, shipped weights
