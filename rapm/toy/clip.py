"""The toy evaluator CLIP: a small open_clip model trained contrastively on toy image-caption pairs.

It is an open_clip *custom model config* (``rapm-toyclip.json``, registered with
``open_clip.add_model_config``) plus a safetensors file, loaded with the same call that loads
ViT-g-14 for SD: ``open_clip.create_model_and_transforms(MODEL_NAME, pretrained=<file>)``.
Its image embeddings are also the toy FID features (:func:`image_features`,
:func:`cleanfid_extractor`).

Training (:func:`train_toy_clip`) is symmetric InfoNCE (Radford et al. 2021, eq. in Fig. 3)
on fresh train-split scenes rendered on the fly, plus NegCLIP-style hard negatives
(Yuksekgonul et al. 2023): per image, captions of the same scene with one attribute changed
are added as extra text columns of the image->text loss. Sample ``k`` (global index
``step * batch_size + i``) is a function of ``(seed, k)`` only.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rapm.cliargs import add_config_args, stage_config
from rapm.io import (
    library_versions,
    load_optimizer_tensors,
    optimizer_tensors,
    peak_rss_mb,
    save_safetensors,
    write_json,
)
from rapm.toy.render import render_batch
from rapm.toy.scene import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ToyObject,
    caption,
    check_holdout_pairs,
    sample_scene,
    scene_for,
    toy_settings,
)

log = logging.getLogger(__name__)

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
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "swap")  # kinds of one-attribute edits


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


# --- one-attribute edits (hard negatives and the attribute-discrimination check) ----------


def perturb(scene: Scene, kind: str, rng: np.random.Generator, forbidden_pairs=()) -> Scene | None:
    """``scene`` with exactly one attribute changed (``kind`` in ATTRIBUTES); None if impossible.

    ``swap`` exchanges the colours of the two objects (a binding error). ``forbidden_pairs``
    ("colour shape" tuples) may not appear in the result.
    """
    objs = list(scene.objects)

    def pick(options, current):
        options = [o for o in options if o != current]
        return options[int(rng.integers(len(options)))]

    if kind == "background":
        return Scene(scene.objects, pick(list(BACKGROUNDS), scene.background))
    if kind == "swap":
        if len(objs) < 2 or objs[0].colour == objs[1].colour:
            return None
        a, b = objs
        objs = [ToyObject(b.colour, a.shape, a.size, a.position), ToyObject(a.colour, b.shape, b.size, b.position)]
    else:
        k = int(rng.integers(len(objs)))
        o = objs[k]
        if kind == "colour":
            o = ToyObject(pick(list(COLOURS), o.colour), o.shape, o.size, o.position)
        elif kind == "shape":
            o = ToyObject(o.colour, pick(SHAPES, o.shape), o.size, o.position)
        elif kind == "size":
            o = ToyObject(o.colour, o.shape, pick(SIZES, o.size), o.position)
        elif kind == "position":
            taken = {x.position for x in objs}
            o = ToyObject(o.colour, o.shape, o.size, pick([p for p in POSITIONS if p not in taken], None))
        else:
            raise ValueError(f"unknown attribute kind {kind!r}; expected one of {', '.join(ATTRIBUTES)}")
        objs[k] = o
    if any((o.colour, o.shape) in set(forbidden_pairs) for o in objs):
        return None
    return Scene(tuple(objs), scene.background)


def hard_negative(scene: Scene, rng: np.random.Generator, forbidden_pairs=()) -> Scene:
    """A one-attribute edit of ``scene`` of a uniformly drawn kind (redrawn until valid)."""
    while True:
        neg = perturb(scene, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng, forbidden_pairs)
        if neg is not None:
            return neg


# --- data ---------------------------------------------------------------------------------


def training_sample(seed: int, k: int, toy: Mapping, holdout: tuple, negatives: int):
    """Sample ``k``: (scene, render seed, hard-negative scenes); a function of (seed, k) only."""
    rng = np.random.default_rng([int(seed), 0x70C11B, int(k)])
    scene = sample_scene(
        rng, max_objects=int(toy["max_objects"]), holdout_pairs=[" ".join(p) for p in holdout], split="train"
    )
    render_seed = int(rng.integers(2**31))
    return scene, render_seed, [hard_negative(scene, rng, holdout) for _ in range(negatives)]


def val_batch(toy_cfg: Mapping, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """The first ``n`` images of the toy val split exactly as the dataset defines them (seed = image id)."""
    cfg = toy_settings(toy_cfg)
    scenes = [scene_for(cfg, "val", i) for i in range(n)]
    return render_batch(scenes, int(cfg["image_size"]), list(range(n))), [caption(s) for s in scenes], scenes


# --- evaluation ---------------------------------------------------------------------------


def evaluate(model, tokenizer, images: np.ndarray, scenes: Sequence[Scene], seed: int = 0) -> dict:
    """Retrieval top-1 within the batch and one-attribute discrimination accuracy.

    A retrieved caption counts as correct when its text equals the true caption (distinct
    scenes can share a caption). Discrimination: per image and attribute kind, the true
    caption must score higher than the caption with that one attribute changed.
    """
    model.eval()
    caps = [caption(s) for s in scenes]
    fi, ft = encode_images(images, model), encode_texts(caps, model, tokenizer)
    sim = fi @ ft.T
    caps_arr = np.asarray(caps)
    i2t = float(np.mean(caps_arr[sim.argmax(dim=1).numpy()] == caps_arr))
    t2i = float(np.mean(caps_arr[sim.argmax(dim=0).numpy()] == caps_arr))
    pos = sim.diag()
    rng = np.random.default_rng([seed, 0xA77])
    out = {
        "n": len(caps),
        "i2t_top1": i2t,
        "t2i_top1": t2i,
        "clip_score_matched": float(100 * pos.mean()),
        "clip_score_shuffled": float(100 * sim.roll(1, dims=1).diag().mean()),
    }
    wins = []
    for kind in ATTRIBUTES:
        idx, neg = [], []
        for i, s in enumerate(scenes):
            p = perturb(s, kind, rng)
            if p is not None:
                idx.append(i)
                neg.append(caption(p))
        if not idx:
            continue
        win = (pos[idx] > (fi[idx] * encode_texts(neg, model, tokenizer)).sum(dim=1)).numpy()
        out[f"attr_{kind}"] = float(win.mean())
        wins.append(win)
    out["attr_all"] = float(np.concatenate(wins).mean())
    return out


# --- training -----------------------------------------------------------------------------


def _lr(step: int, cfg: Mapping) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    t = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * t))


def _save_weights(model, seen_tokens: torch.Tensor, path: Path, metadata: dict) -> None:
    """fp16 safetensors; token-embedding rows never looked up in training are stored as zeros. Written by
    :func:`rapm.io.save_safetensors` (deterministic bytes, atomic, mode from the umask)."""

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    emb = state["token_embedding.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[seen_tokens] = True
    emb[~keep] = 0
    save_safetensors(state, path, {k: json.dumps(v) for k, v in metadata.items()})


def train_toy_clip(
    clip_cfg: Mapping,
    toy_cfg: Mapping,
    out_dir: str | os.PathLike,
    threads: int = 1,
    log_every: int = 10,
    checkpoint_every: int = 50,
) -> dict:
    """Train the toy CLIP into ``out_dir``; rerunning the same command resumes from its checkpoint.

    Writes ``rapm-toyclip.json``, ``rapm-toyclip.safetensors`` (config in its metadata),
    ``train_log.jsonl`` and ``summary.json`` (metrics measured on the saved weights).
    """
    import open_clip
    from tqdm import tqdm

    t_start = time.time()
    torch.set_num_threads(int(threads))
    cfg, toy = dict(clip_cfg), toy_settings(toy_cfg)
    holdout = () if cfg["include_holdout_pairs"] else check_holdout_pairs(toy["holdout_pairs"])
    out = Path(out_dir)
    register_model_config(write_model_config(out))
    state_path, log_path = out / "train_state.safetensors", out / "train_log.jsonl"

    # 1. Model and optimiser: decay on matrices only (not embeddings, gains, biases, logit scale).
    torch.manual_seed(int(cfg["seed"]))
    model = open_clip.create_model(MODEL_NAME)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "class_" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n and "class_" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    seen = torch.zeros(MODEL_CFG["text_cfg"]["vocab_size"], dtype=torch.bool)
    start = 0
    if state_path.is_file():  # 2. resume
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(state_path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("config") != json.dumps(cfg, sort_keys=True):
            raise ValueError(f"{state_path} was written with a different toy_clip config; delete it to start over")
        tensors = load_file(state_path)
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_tensors("optimizer", opt, tensors)
        seen, start = tensors["seen_tokens"], int(meta["step"])
        log.info("resuming from %s at step %d", state_path, start)
    elif log_path.exists():
        log_path.unlink()

    size, bsz, nneg = int(toy["image_size"]), int(cfg["batch_size"]), int(cfg["hard_negatives"])
    labels = torch.arange(bsz)
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="toy CLIP", mininterval=5)
    for step in bar:
        # 3. Batch: B fresh train-split scenes, their renders, B x nneg one-attribute edits.
        samples = [training_sample(cfg["seed"], step * bsz + i, toy, holdout, nneg) for i in range(bsz)]
        images = render_batch([s[0] for s in samples], size, [s[1] for s in samples])
        texts = [caption(s[0]) for s in samples] + [caption(n) for s in samples for n in s[2]]
        tokens = tokenizer(texts)
        seen[tokens.unique()] = True

        # 4. Symmetric InfoNCE; the hard negatives are extra columns of the image->text logits only.
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        img, txt, scale = model(to_model_input(images, model), tokens)
        logits = scale * img @ txt.T  # (B, B * (1 + nneg))
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :bsz].T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

        if (step + 1) % log_every == 0 or step + 1 == cfg["steps"]:
            rec = {
                "step": step + 1,
                "loss": round(loss.item(), 5),
                "lr": _lr(step, cfg),
                "logit_scale": round(scale.item(), 3),
                "batch_i2t_top1": float((logits[:, :bsz].argmax(1) == labels).float().mean()),
                "elapsed_s": round(time.time() - t_start, 1),
            }
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['batch_i2t_top1']:.2f}")
            log.info("step %d loss %.4f batch i2t %.3f", step + 1, rec["loss"], rec["batch_i2t_top1"])
        if (step + 1) % checkpoint_every == 0 and step + 1 < cfg["steps"]:  # 5. atomic checkpoint
            state = {f"model.{k}": v for k, v in model.state_dict().items()}
            state.update(optimizer_tensors("optimizer", opt), seen_tokens=seen)
            save_safetensors(state, state_path, {"step": str(step + 1), "config": json.dumps(cfg, sort_keys=True)})

    # 6. Save fp16 weights, then measure everything on the saved file through open_clip's loader.
    weights = out / WEIGHTS_NAME
    meta = {"model_name": MODEL_NAME, "model_cfg": MODEL_CFG, "toy_clip": cfg, "toy": {k: toy[k] for k in sorted(toy)}}
    _save_weights(model, seen.nonzero().flatten(), weights, meta)
    train_s = time.time() - t_start
    loaded, _, tok = load_toy_clip("cpu", weights)
    val_images, _, val_scenes = val_batch(toy, int(cfg["eval_images"]))
    metrics = {"val": evaluate(loaded, tok, val_images, val_scenes, seed=int(cfg["seed"]))}
    # held-out train-distribution scenes: sample ids past everything training drew
    extra = [
        training_sample(cfg["seed"], cfg["steps"] * bsz + i, toy, holdout, 0) for i in range(int(cfg["eval_images"]))
    ]
    metrics["train_distribution"] = evaluate(
        loaded,
        tok,
        render_batch([e[0] for e in extra], size, [e[1] for e in extra]),
        [e[0] for e in extra],
        seed=int(cfg["seed"]),
    )
    summary = {
        "model_name": MODEL_NAME,
        "weights": weights.name,
        "weights_bytes": weights.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "toy_clip": cfg,
        "toy": meta["toy"],
        "threads": threads,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "versions": library_versions(("torch", "open_clip", "numpy")),
        "metrics": metrics,
    }
    write_json(out / "summary.json", summary, sort_keys=False)
    state_path.unlink(missing_ok=True)
    log.info(
        "toy CLIP: val i2t top-1 %.3f, attribute discrimination %.3f; wrote %s",
        metrics["val"]["i2t_top1"],
        metrics["val"]["attr_all"],
        weights,
    )
    return summary


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm toy train-clip`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument(
        "--out-dir", required=True, help="where rapm-toyclip.{json,safetensors}, train_log.jsonl, summary.json go"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data.toy", "toy_clip")

    train_toy_clip(cfg["toy_clip"], cfg["data"]["toy"], out_dir=args.out_dir, threads=args.threads)
    return 0
