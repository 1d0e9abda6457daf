"""The toy evaluator CLIP's training (``rapm toy train-clip``) and the checks of a trained one.

The model itself (its open_clip config, loader, embeddings, CLIP score and FID features) is
:mod:`rapm.toy.clipmodel`; its names are importable from here too.

Training (:func:`train_toy_clip`) is symmetric InfoNCE (Radford et al. 2021, eq. in Fig. 3)
on fresh train-split scenes rendered on the fly, plus NegCLIP-style hard negatives
(Yuksekgonul et al. 2023): per image, captions of the same scene with one attribute changed
are added as extra text columns of the image->text loss. Sample ``k`` (global index
``step * batch_size + i``) is a function of ``(seed, k)`` only.
"""

from __future__ import annotations

import argparse
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
from rapm.toy.clipmodel import (  # noqa: F401 - the toy CLIP's public API, re-exported
    ASSET_DIR,
    MODEL_CFG,
    MODEL_NAME,
    WEIGHTS_NAME,
    cleanfid_extractor,
    clip_score,
    encode_images,
    encode_texts,
    image_features,
    keep_size,
    load_toy_clip,
    register_model_config,
    to_model_input,
    write_model_config,
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

ATTRIBUTES = ("colour", "shape", "size", "position", "background", "swap")  # kinds of one-attribute edits


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


def _model_and_optimizer(cfg: Mapping):
    """The seeded open_clip model in train mode, its AdamW and the tokenizer; decay on matrices only (not
    embeddings, gains, biases, logit scale)."""
    import open_clip

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
    return model, opt, open_clip.get_tokenizer(MODEL_NAME)


def _resume(state_path: Path, log_path: Path, cfg: Mapping, model, opt) -> tuple[torch.Tensor, int]:
    """(tokens seen, first step): from the checkpoint when there is one (model and optimiser loaded in place),
    else nothing seen at step 0 (and a stale ``train_log.jsonl`` removed)."""
    seen = torch.zeros(MODEL_CFG["text_cfg"]["vocab_size"], dtype=torch.bool)
    start = 0
    if state_path.is_file():
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
    return seen, start


def _batch(cfg: Mapping, step: int, toy: Mapping, holdout: tuple, tokenizer):
    """Renders of batch ``step`` (B fresh train-split scenes) and the tokens of their captions, then of their
    B x ``hard_negatives`` one-attribute edits."""
    bsz, nneg = int(cfg["batch_size"]), int(cfg["hard_negatives"])
    samples = [training_sample(cfg["seed"], step * bsz + i, toy, holdout, nneg) for i in range(bsz)]
    images = render_batch([s[0] for s in samples], int(toy["image_size"]), [s[1] for s in samples])
    texts = [caption(s[0]) for s in samples] + [caption(n) for s in samples for n in s[2]]
    return images, tokenizer(texts)


def _log_step(bar, log_path: Path, step: int, cfg: Mapping, loss, scale, logits, labels, t_start: float) -> None:
    """One ``train_log.jsonl`` record (loss, lr, logit scale, in-batch image->text accuracy), also shown and logged."""
    bsz = len(labels)
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


def _finish(model, seen, cfg: Mapping, toy: Mapping, holdout: tuple, out: Path, t_start: float, threads: int) -> dict:
    """Save the fp16 weights, then measure everything on the saved file through open_clip's loader; write
    ``summary.json``, drop the checkpoint; the summary."""
    size, bsz = int(toy["image_size"]), int(cfg["batch_size"])
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
    (out / "train_state.safetensors").unlink(missing_ok=True)
    log.info(
        "toy CLIP: val i2t top-1 %.3f, attribute discrimination %.3f; wrote %s",
        metrics["val"]["i2t_top1"],
        metrics["val"]["attr_all"],
        weights,
    )
    return summary


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
    from tqdm import tqdm

    t_start = time.time()
    torch.set_num_threads(int(threads))
    cfg, toy = dict(clip_cfg), toy_settings(toy_cfg)
    holdout = () if cfg["include_holdout_pairs"] else check_holdout_pairs(toy["holdout_pairs"])
    out = Path(out_dir)
    register_model_config(write_model_config(out))
    state_path, log_path = out / "train_state.safetensors", out / "train_log.jsonl"

    model, opt, tokenizer = _model_and_optimizer(cfg)  # 1. model and optimiser
    seen, start = _resume(state_path, log_path, cfg, model, opt)  # 2. resume

    bsz = int(cfg["batch_size"])
    labels = torch.arange(bsz)
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="toy CLIP", mininterval=5)
    for step in bar:
        # 3. Batch: B fresh train-split scenes, their renders, B x nneg one-attribute edits.
        images, tokens = _batch(cfg, step, toy, holdout, tokenizer)
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
            _log_step(bar, log_path, step, cfg, loss, scale, logits, labels, t_start)
        if (step + 1) % checkpoint_every == 0 and step + 1 < cfg["steps"]:  # 5. atomic checkpoint
            state = {f"model.{k}": v for k, v in model.state_dict().items()}
            state.update(optimizer_tensors("optimizer", opt), seen_tokens=seen)
            save_safetensors(state, state_path, {"step": str(step + 1), "config": json.dumps(cfg, sort_keys=True)})
    return _finish(model, seen, cfg, toy, holdout, out, t_start, threads)  # 6. save, then measure the saved file


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
