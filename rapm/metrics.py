"""The pinned evaluation protocol's metrics: Fréchet distance (clean-fid), CLIP score (open_clip).

Feature extractors map uint8 images (N, H, W, 3) to float64 features (N, D):

- ``inception`` - clean-fid's Inception-V3 (mode "clean": PIL bicubic resize to 299, then the
  TorchScript Inception of StyleGAN2-ADA), the FID of the SD profiles. clean-fid downloads the weights
  to ``/tmp/inception-2015-12-05.pt`` when missing; offline that fails, so we look first and say where
  to put the file (``evaluation.fid.inception_weights`` names another location);
- ``toyclip`` - the toy evaluator CLIP's image embedding (:mod:`rapm.toy.clipmodel`). Fréchet distances in
  these features are labelled "toy features, not Inception": they are not comparable to any
  published FID.

Reference statistics (mean, covariance) are computed once per protocol and cached as ``.npz``;
:func:`frechet_distance` is clean-fid's, checked in the tests against an independent scipy computation.
CLIP score = 100 × mean cosine similarity of each image with its caption (optionally prefixed, DMD2's
"A photo depicts "), images centre-cropped by the model's own preprocessing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from rapm.errors import RapmError

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_DEFAULT_DIR = "/tmp"  # where clean-fid itself looks (cleanfid.features.feature_extractor)
TOY_CLIP = "rapm-toyclip"


class MetricsError(RapmError):
    """A metric cannot be computed as the protocol asks."""


# --- Fréchet distance -------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (N, D), float64, covariance with N − 1 as clean-fid computes it."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise MetricsError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½): clean-fid's implementation.

    A distance is ≥ 0; identical statistics can come out at −1e-8 from the matrix square root's
    rounding, which is returned as 0.
    """
    from cleanfid.fid import frechet_distance as _fd

    return max(0.0, float(_fd(np.asarray(mu1), np.asarray(sigma1), np.asarray(mu2), np.asarray(sigma2))))


# --- image preparation ------------------------------------------------------------------------------


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then PIL bicubic resize to ``size`` (the protocol's reference images)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([center_crop_resize(im, size) for im in images])


# --- feature extractors -----------------------------------------------------------------------------


def inception_path(weights: str | None) -> Path:
    """The Inception weights file, which must exist: ``weights`` or clean-fid's default location."""
    path = Path(weights) if weights else Path(CLEANFID_DEFAULT_DIR) / INCEPTION_FILE
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise MetricsError(
            f"FID needs the Inception weights {INCEPTION_FILE}, not found at {path}. Download {INCEPTION_URL} on a "
            f"machine with network access and copy it to {path} (or set evaluation.fid.inception_weights to the file)"
        )
    if path.name != INCEPTION_FILE:
        raise MetricsError(f"{path}: clean-fid loads the Inception weights only under the name {INCEPTION_FILE}")
    return path


def feature_extractor(
    name: str,
    *,
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 64,
    model: torch.nn.Module | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """``f(uint8 images (N, H, W, 3)) -> float64 (N, D)`` for ``inception`` or ``toyclip``
    (``model``: the shipped toy CLIP, already loaded; None loads it)."""
    if name == "toyclip":
        from rapm.toy.clipmodel import image_features, load_toy_clip

        model = model if model is not None else load_toy_clip(device)[0]
        return lambda images: image_features(images, model)
    if name == "inception":
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = inception_path(inception_weights)
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()
        resize = build_resizer("clean")

        @torch.no_grad()
        def features(images: np.ndarray) -> np.ndarray:
            out = []
            for start in range(0, len(images), batch_size):
                batch = np.stack(
                    [resize(im) for im in images[start : start + batch_size]]
                )  # float32 (B, 299, 299, 3), 0..255
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
                out.append(model(x).cpu().numpy().astype(np.float64))
            return np.concatenate(out)

        return features
    raise ValueError(f"unknown FID feature extractor {name!r}; choose inception or toyclip")


# --- CLIP score -------------------------------------------------------------------------------------


def load_clip(model: str, pretrained: str | None, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` of open_clip: the shipped toy CLIP, a local weights file, or a
    named pretrained tag (which open_clip downloads; offline it fails, and we say how to fix it)."""
    import open_clip

    if model == TOY_CLIP:
        from rapm.toy.clipmodel import load_toy_clip

        return load_toy_clip(device, pretrained)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    except Exception as err:  # noqa: BLE001 - re-raised with the model named
        raise MetricsError(
            f"open_clip could not load {model!r} with pretrained={pretrained!r}: {err}. Offline, "
            "download the weights elsewhere and set evaluation.clip.pretrained to the local file"
        ) from err
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


@torch.no_grad()
def clip_score(
    images: np.ndarray,
    captions: Sequence[str],
    clip,
    *,
    prefix: str = "",
    batch_size: int = 64,
    image_embeddings: np.ndarray | None = None,
) -> float:
    """100 × mean cosine similarity of image i and ``prefix + caption i`` (``clip`` from :func:`load_clip`).

    ``image_embeddings``: the images' normalised embeddings by this CLIP, if already computed (the toy's
    FD features are); used only where the first and the last batch equal a fresh encoding bit for bit,
    otherwise every image is encoded here."""
    from PIL import Image

    model, preprocess, tokenizer = clip
    if len(images) != len(captions):
        raise MetricsError(f"clip_score: {len(images)} images but {len(captions)} captions")
    device = next(model.parameters()).device

    def encode(start: int) -> torch.Tensor:
        ims = torch.stack([preprocess(Image.fromarray(im)) for im in images[start : start + batch_size]]).to(device)
        return model.encode_image(ims, normalize=True).float()

    given = _checked_embeddings(image_embeddings, len(images), batch_size, encode)
    sims = []
    for start in range(0, len(images), batch_size):
        txt = tokenizer([prefix + c for c in captions[start : start + batch_size]]).to(device)
        a = given[start : start + batch_size].to(device) if given is not None else encode(start)
        b = model.encode_text(txt, normalize=True).float()
        sims.append((a * b).sum(dim=1).cpu())
    return float(100.0 * torch.cat(sims).mean())


def _checked_embeddings(embeddings: np.ndarray | None, n: int, batch_size: int, encode) -> torch.Tensor | None:
    """``embeddings`` as float32 when they are what ``encode`` gives for the first and the last batch, else None."""
    if embeddings is None or n == 0 or len(embeddings) != n:
        return None
    given = torch.from_numpy(np.asarray(embeddings)).float()
    for start in sorted({0, (n - 1) // batch_size * batch_size}):
        fresh = encode(start).cpu()
        if fresh.shape != given[start : start + batch_size].shape or not torch.equal(
            fresh, given[start : start + batch_size]
        ):
            return None
    return given


def reference_protocol(eval_cfg: Mapping) -> dict:
    """The part of the protocol the FID reference statistics depend on (not the CLIP score's keys)."""
    return {k: v for k, v in protocol_summary(eval_cfg).items() if not k.startswith("clip_")}


def protocol_summary(eval_cfg: Mapping) -> dict:
    """The protocol keys as they go into every metrics file and table footnote."""
    fid, clip = eval_cfg["fid"], eval_cfg["clip"]
    return {
        "fid_features": fid["features"],
        "fid_resolutions": list(fid["resolutions"]),
        "fid_code": "clean-fid frechet_distance"
        + (
            " (mode clean, Inception-V3)"
            if fid["features"] == "inception"
            else " on toy CLIP image features (not Inception)"
        ),
        "clip_model": clip["model"],
        "clip_pretrained": clip["pretrained"],
        "clip_prefix": clip["prefix"],
    }
