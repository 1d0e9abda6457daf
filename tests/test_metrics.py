"""rapm.metrics / rapm.evaluate: Fréchet distance against scipy, CLIP score, the protocol's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from rapm import metrics as M


def scipy_frechet(mu1, s1, mu2, s2):
    """The textbook formula with scipy's matrix square root (an independent computation)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_of_known_gaussians():
    # diagonal covariances: d = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, by hand
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)
    # full covariances: clean-fid's implementation against scipy's sqrtm
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = x @ x.T + np.eye(8), y @ y.T + 0.5 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(scipy_frechet(m1, s1, m2, s2), rel=1e-6)
    assert M.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_stats_match_numpy_and_refuse_one_sample():
    f = np.random.default_rng(1).normal(size=(50, 4))
    mu, sigma = M.gaussian_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.T))
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.gaussian_stats(f[:1])


def test_missing_inception_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(M.MetricsError) as err:
        M.inception_path(str(tmp_path / "nowhere" / M.INCEPTION_FILE))
    text = str(err.value)
    assert str(tmp_path / "nowhere" / M.INCEPTION_FILE) in text and M.INCEPTION_URL in text
    with pytest.raises(M.MetricsError, match="inception_weights"):
        M.feature_extractor("inception", inception_weights=str(tmp_path))
    with pytest.raises(ValueError, match="unknown FID feature extractor 'vgg'"):
        M.feature_extractor("vgg")


def test_center_crop_resize():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 255  # the centre 40x40 square is white, the side bands black
    out = M.center_crop_resize(image, 20)
    assert out.shape == (20, 20, 3) and out.min() == 255


@pytest.fixture(scope="module")
def toy_renders():
    from rapm.toy.captions import reference_image
    from rapm.toy.scene import caption, split_scenes

    toy = {
        "seed": 0,
        "image_size": 32,
        "num_train_images": 10,
        "num_val_images": 40,
        "max_objects": 2,
        "holdout_pairs": ["red triangle"],
    }
    captions = [caption(s) for s in split_scenes(toy, "val", range(40))]
    return np.stack([reference_image(c, i, 32) for i, c in enumerate(captions)]), captions


def test_clip_score_scale_and_prefix(toy_renders):
    import torch

    images, captions = toy_renders
    clip = M.load_clip(M.TOY_CLIP, None)
    score = M.clip_score(images, captions, clip)
    # 100 x mean cosine, computed by hand from open_clip's own encoders
    model, preprocess, tokenizer = clip
    from PIL import Image

    with torch.no_grad():
        a = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]), normalize=True)
        b = model.encode_text(tokenizer(captions), normalize=True)
    assert score == pytest.approx(100 * float((a * b).sum(1).mean()), rel=1e-5)
    assert 0 < score <= 100
    assert M.clip_score(images, captions[::-1], clip) < score  # mismatched captions score lower
    assert M.clip_score(images, captions, clip, prefix="A photo depicts ") != pytest.approx(score)
    with pytest.raises(M.MetricsError, match="40 images but 39 captions"):
        M.clip_score(images, captions[:-1], clip)


def test_named_clip_tag_offline_fails_with_advice():
    with pytest.raises(M.MetricsError, match="evaluation.clip.pretrained to the local file"):
        M.load_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_toy_features_separate_real_from_shuffled_colours(toy_renders):
    images, _ = toy_renders
    extract = M.feature_extractor("toyclip")
    a, b = M.gaussian_stats(extract(images[:20])), M.gaussian_stats(extract(images[20:]))
    shuffled = M.gaussian_stats(extract(images[20:, :, :, ::-1].copy()))  # RGB -> BGR: other colours
    assert M.frechet_distance(*a, *b) < M.frechet_distance(*a, *shuffled)


def test_clip_score_takes_the_fd_features_when_they_are_its_embeddings(toy_renders):
    """The toy's FD features are the shipped toy CLIP's image embeddings: given to clip_score they give
    the same score bit for bit; embeddings that are not this CLIP's are checked and not used."""
    images, captions = toy_renders
    clip = M.load_clip(M.TOY_CLIP, None)
    feats = M.feature_extractor("toyclip", model=clip[0])(images)
    score = M.clip_score(images, captions, clip, batch_size=16)
    assert M.clip_score(images, captions, clip, batch_size=16, image_embeddings=feats) == score
    wrong = feats.copy()
    wrong[-1] = wrong[0]  # the last batch differs from a fresh encoding
    assert M.clip_score(images, captions, clip, batch_size=16, image_embeddings=wrong) == score
    assert M.clip_score(images, captions, clip, batch_size=16, image_embeddings=feats[:, :7]) == score
    assert M.clip_score(images, captions, clip, batch_size=16, image_embeddings=np.zeros_like(feats)) == score
