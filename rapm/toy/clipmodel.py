"""The toy evaluator CLIP as the metrics use it: its open_clip model config, loader, embeddings and scores.

It is an open_clip *custom model config* (``rapm-toyclip.json``, registered with
``open_clip.add_model_config``) plus a safetensors file, loaded with the same call that loads
ViT-g-14 for SD: ``open_clip.create_model_and_transforms(MODEL_NAME, pretrained=<file>)``.
Its image embeddings are also the toy FID features (:func:`image_features`,
:func:`cleanfid_extractor`). Training it is :mod:`rapm.toy.clip` (``rapm toy train-clip``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rapm.io import write_json

MODEL_NAME = "rapm-toyclip"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "toyclip"
WEIGHTS_NAME = f"{MODEL_NAME}.safetensors"

# open_clip model config: ViT with 4x4 patches on 32x32 images (64 tokens + class token) and a
# 3-layer text transformer. The text width is 64 because the token embedding (49,408 x width)
# dominates the parameter count; captions are at most 24 tokens, so 32 positions suffice.
MODEL_CFG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


# --- model config, loading ----------------------------------------------------------------


def write_model_config(out_dir: str | os.PathLike) -> Path:
    """Write ``rapm-toyclip.json`` (the open_clip model config) into ``out_dir``."""
    path = Path(out_dir) / f"{MODEL_NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, MODEL_CFG, sort_keys=False)
    return path


def register_model_config(config_file: str | os.PathLike | None = None) -> str:
    """Register the toy model config with open_clip (idempotent); return the model name."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        path = Path(config_file) if config_file is not None else ASSET_DIR / f"{MODEL_NAME}.json"
        if json.loads(path.read_text(encoding="utf-8")) != MODEL_CFG:
            raise ValueError(f"{path}: model config differs from rapm.toy.clip.MODEL_CFG")
        open_clip.add_model_config(path)
    if open_clip.get_model_config(MODEL_NAME) != MODEL_CFG:
        raise ValueError(f"open_clip already holds a different {MODEL_NAME!r} config")
    return MODEL_NAME


def load_toy_clip(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None):
    """``(model, preprocess, tokenizer)`` through open_clip's normal API; ``model`` is in eval mode.

    ``weights`` defaults to the safetensors file shipped in ``rapm/assets/toyclip``.
    """
    import open_clip

    name = register_model_config()
    weights = Path(weights) if weights is not None else ASSET_DIR / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"toy CLIP weights not found: {weights}")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple:
    return load_toy_clip("cpu")


# --- features and scores ------------------------------------------------------------------


def to_model_input(images, model) -> torch.Tensor:
    """uint8/float images, (N,H,W,3) or (N,3,H,W), values in [0,255] -> normalised float (N,3,S,S).

    Matches open_clip's ``preprocess`` for SxS inputs (ToTensor then Normalize); other sizes are
    resized with antialiased bicubic interpolation (as clean-fid's default resize to 299 needs).
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.ndim != 4 or (x.shape[1] == 3) == (x.shape[-1] == 3):
        raise ValueError(f"expected images (N,H,W,3) or (N,3,H,W), got shape {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 255.0
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).to(next(model.parameters()).device)


@torch.no_grad()
def encode_images(images, model=None, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) as a float32 CPU tensor."""
    model = model if model is not None else _shipped()[0]
    out = [
        model.encode_image(to_model_input(images[i : i + batch_size], model), normalize=True).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.visual.output_dim)


@torch.no_grad()
def encode_texts(texts: Sequence[str], model=None, tokenizer=None, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings (N, D) as a float32 CPU tensor."""
    if model is None:
        model, _, tokenizer = _shipped()
    device = next(model.parameters()).device
    out = [
        model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def image_features(images, model=None) -> np.ndarray:
    """Toy FID features: the CLIP image embedding, float64 (N, D), deterministic.

    Accepts uint8 (N,H,W,3) renders or float (N,3,H,W) in [0,255] as clean-fid passes them.
    """
    return encode_images(images, model).numpy().astype(np.float64)


def cleanfid_extractor(model=None):
    """``custom_feat_extractor`` for ``cleanfid.fid.compute_fid`` (clean-fid wants a tensor back).

    Pass ``custom_fn_resize=keep_size`` too: clean-fid otherwise upsamples the images to 299x299
    first (they are then resized back to 32x32 here, a needless blur).
    """
    model = model if model is not None else _shipped()[0]
    return lambda batch: encode_images(batch, model)


def keep_size(image: np.ndarray) -> np.ndarray:
    """Identity ``custom_fn_resize`` for clean-fid: images stay at their rendered size."""
    return image


def clip_score(images, captions: Sequence[str], model=None, tokenizer=None) -> float:
    """CLIP score = 100 x mean cosine similarity of image i and caption i (no clipping at 0)."""
    if len(images) != len(captions):
        raise ValueError(f"clip_score: {len(images)} images but {len(captions)} captions")
    if model is None:
        model, _, tokenizer = _shipped()
    sims = (encode_images(images, model) * encode_texts(captions, model, tokenizer)).sum(dim=1)
    return float(100.0 * sims.mean())
