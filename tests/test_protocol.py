"""Tests of rapm.protocol: what each profile's evaluation measures, decided in one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rapm.config import load_config
from rapm.metrics import MetricsError
from rapm.protocol import Protocol, fd_label
from rapm.toy.captions import reference_image

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a small red triangle at the top left on a white background",
    "a large blue circle at the bottom on a gray background",
]


def protocol(*files: str, overrides=()) -> Protocol:
    return Protocol.from_config(load_config([ROOT / "config" / f for f in files], list(overrides)))


def test_toy_protocol_uses_toy_clip_renders_and_the_reader():
    p = protocol("config.yaml")
    assert (p.features, p.fd_label, p.renders, p.reader_accuracy) == ("toyclip", "FD (toy CLIP features)", True, True)
    prompts = pd.DataFrame({"caption": CAPTIONS, "image_id": [3, 7]})
    images = p.reference_images(prompts)
    assert images.dtype == np.uint8 and images.shape == (2, p.render_size, p.render_size, 3)
    assert np.array_equal(images[1], reference_image(CAPTIONS[1], 7, p.render_size))
    assert "toy CLIP" in p.table_notes()[0] and "accuracy" in p.table_notes()[0]
    assert "separate block" in p.published_heading


def test_reader_scores_follow_the_key_and_are_exact_on_renders():
    p = protocol("config.yaml")
    images = p.reference_images(pd.DataFrame({"caption": CAPTIONS, "image_id": [0, 1]}))
    scores = p.reader_scores(images, CAPTIONS)
    assert set(scores) >= {"all", "colour", "shape", "position"} and all(len(v) == 2 for v in scores.values())
    assert p.reader_accuracy_of(images, CAPTIONS) == {k: float(v.mean()) for k, v in scores.items()}
    wrong = p.reader_accuracy_of(images[::-1], CAPTIONS)  # each render read against the other caption
    assert wrong["colour"] < scores["colour"].mean()
    off = protocol("config.yaml", overrides=["evaluation.reader_accuracy=false"])
    assert off.reader_scores(images, CAPTIONS) is None and off.reader_accuracy_of(images, CAPTIONS) is None
    assert "accuracy" not in off.table_notes()[0]


def test_sd_protocol_uses_inception_and_coco_images(tmp_path):
    p = protocol("config.yaml", "sd15.yaml")
    assert (p.fd_label, p.renders, p.reader_accuracy) == ("FID", False, False)
    assert p.table_notes() == [] and p.published_heading == "Published reference rows:"
    prompts = pd.DataFrame({"caption": CAPTIONS, "file_name": ["a.jpg", "b.jpg"]})
    with pytest.raises(MetricsError, match="evaluation.reference.images_dir is not set"):
        p.reference_images(prompts)
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.jpg")
    p = protocol("config.yaml", "sd15.yaml", overrides=[f"evaluation.reference.images_dir={tmp_path}"])
    with pytest.raises(MetricsError, match=r"b\.jpg: reference image .* not found"):
        p.reference_images(prompts)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "b.jpg")
    assert p.reference_images(prompts).shape == (2, max(p.resolutions), max(p.resolutions), 3)


def test_fd_label():
    assert fd_label("inception") == "FID" and fd_label("toyclip") == "FD (toy CLIP features)"


def test_the_toy_fd_features_reuse_the_loaded_clip_model():
    """FD features by the shipped toy CLIP, CLIP score by the same weights: one model, loaded once."""
    from rapm.metrics import load_clip

    p = protocol("config.yaml")
    clip = load_clip(p.clip_model, p.clip_pretrained)
    images = p.reference_images(pd.DataFrame({"caption": CAPTIONS, "image_id": [0, 1]}))
    shared, fresh = p.extractor(clip)(images), p.extractor()(images)
    assert np.array_equal(shared, fresh)
    clip[0].visual.proj.data = clip[0].visual.proj.data.flip(1)  # the extractor computes with the model it was given
    assert not np.allclose(p.extractor(clip)(images), fresh) and np.array_equal(p.extractor()(images), fresh)
    assert np.allclose(p.extractor(load_clip(p.clip_model, p.clip_pretrained))(images), fresh)
