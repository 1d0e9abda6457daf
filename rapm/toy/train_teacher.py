"""Train TinySD, the embedded toy teacher (``python -m rapm toy train-teacher``).

Two phases, both on renders of scenes sampled on the fly from the toy TRAIN split (held-out
colour-shape pairs never appear):

1. VAE: x -> q(z|x) -> x_hat, loss = mean(w * (x_hat - x)^2) + kl_weight * KL(q(z|x) || N(0, I)),
   w = 1 + foreground_weight on object pixels (objects cover ~5% of a render; unweighted, small
   shapes blur into blobs). Afterwards the latent scaling factor is set to 1 / std of the training
   latents, as in SD.
2. UNet + text encoder jointly, epsilon prediction (DDPM, Ho et al. 2020):
   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,  loss = w(t) * ||eps_theta(z_t, t, c) - eps||^2,
   with min-SNR weights w(t) = min(SNR(t), gamma) / SNR(t) (Hang et al. 2023) and the caption
   replaced by "" with probability ``caption_dropout`` (classifier-free guidance, Ho & Salimans
   2022). The text encoder starts from the toy CLIP's text tower (``text_init: toyclip``, as SD's
   is a pretrained CLIP) and trains at ``text_lr``. With probability ``colour_dropout`` an object's
   colour word is left out of its caption, so its shape must be read from the shape word: the train
   split never shows a held-out pair, and without this the model learns e.g. "blue and not a
   triangle means circle" and draws the held-out "blue square" as a blue circle. The saved model
   is the EMA of the weights.

Batch ``k`` of a phase depends only on (seed, phase, k) (:mod:`rapm.toy.batches`), and the training state
(weights, EMA, optimiser, step) is saved atomically (safetensors) every ``checkpoint_every`` steps in the state
directory, so an interrupted run resumes where it stopped: run the same command again.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from rapm.cliargs import add_config_args, stage_config
from rapm.device import resolve_device
from rapm.io import library_versions, load_optimizer_tensors, optimizer_tensors, write_json
from rapm.toy.batches import PHASE_DIFFUSION, PHASE_VAE, caption_without_colours, foreground_mask, to_uint8, train_batch

log = logging.getLogger(__name__)


# --- state ----------------------------------------------------------------------------------------


def _save_state(path: Path, modules: dict, optimizer: torch.optim.Optimizer, step: int, losses: list) -> None:
    """The resumable state as safetensors (state dicts, AdamW state; step and losses in the metadata), atomically."""
    from rapm.io import save_safetensors

    tensors = {
        f"{name}.{k}": v.detach().cpu().clone().contiguous() for name, sd in modules.items() for k, v in sd.items()
    }
    tensors.update(optimizer_tensors("optimizer", optimizer))
    save_safetensors(tensors, path, {"step": str(step), "losses": json.dumps(losses)})


def _load_state(path: Path, optimizer: torch.optim.Optimizer, device) -> tuple[dict, int, list] | None:
    """(state dicts by module name, step, losses) of a state saved by :func:`_save_state`, loading the
    optimiser in place; None when there is none."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    load_optimizer_tensors(
        "optimizer", optimizer, {k: v.to(device) for k, v in tensors.items() if k.startswith("optimizer.")}
    )
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name, rest = key.split(".", 1)
        if name != "optimizer":
            modules.setdefault(name, {})[rest] = value.to(device)
    return modules, int(meta["step"]), json.loads(meta["losses"])


def _lr_factor(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Linear warm-up, then cosine decay from 1 to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


# --- phase 1: VAE -----------------------------------------------------------------------------------


def train_vae(toy_cfg: Mapping, tcfg: Mapping, state_dir: Path, device: torch.device) -> tuple[object, dict]:
    """Train (or resume, or load the finished) VAE; returns it with its scaling factor set, and stats."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from rapm.toy.tinysd import build_vae

    final_dir, ckpt_path = state_dir / "vae_final", state_dir / "vae.safetensors"
    vcfg, seed = tcfg["vae"], int(tcfg["seed"])
    if (final_dir / "stats.json").is_file():
        log.info("VAE: finished in %s, loading it", final_dir)
        return AutoencoderKL.from_pretrained(final_dir).to(device), json.loads((final_dir / "stats.json").read_text())

    torch.manual_seed(seed)
    vae = build_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=float(vcfg["lr"]), weight_decay=0.0)
    start, losses = 0, []
    if (state := _load_state(ckpt_path, opt, device)) is not None:
        modules, start, losses = state
        vae.load_state_dict(modules["model"])
        log.info("VAE: resuming at step %d", start)
    steps, bs = int(vcfg["steps"]), int(vcfg["batch_size"])
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="VAE", mininterval=5, file=sys.stderr)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = float(vcfg["lr"]) * _lr_factor(
                step, steps, int(tcfg["warmup_steps"]), float(tcfg["lr_final_fraction"])
            )
        scenes, _, x, _ = train_batch(toy_cfg, seed, PHASE_VAE, step, bs)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        weight = 1.0 + float(vcfg.get("foreground_weight", 0.0)) * foreground_mask(x, scenes)
        mse, kl = (weight * (rec - x).pow(2)).mean(), post.kl().mean()
        loss = mse + float(vcfg["kl_weight"]) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append([mse.item(), kl.item()])
        if (step + 1) % int(tcfg["log_every"]) == 0:
            m = np.mean(losses[-int(tcfg["log_every"]) :], axis=0)
            bar.set_postfix(mse=f"{m[0]:.5f}", kl=f"{m[1]:.1f}")
            log.info("VAE step %d/%d: mse %.5f kl %.1f", step + 1, steps, m[0], m[1])
        if (step + 1) % int(tcfg["checkpoint_every"]) == 0 and step + 1 < steps:
            _save_state(ckpt_path, {"model": vae.state_dict()}, opt, step + 1, losses)

    return vae, _finish_vae(vae, toy_cfg, tcfg, seed, steps, losses, final_dir, ckpt_path, device)


def _finish_vae(
    vae, toy_cfg: Mapping, tcfg: Mapping, seed: int, steps: int, losses: list, final_dir: Path, ckpt_path: Path, device
) -> dict:
    """Set the trained VAE's scaling factor, save it to ``final_dir`` with its stats, drop the checkpoint; the stats."""
    from rapm.toy.reader import accuracy

    # Scaling factor (SD: 0.18215 = 1 / std of its latents) and reconstruction quality, on fresh batches.
    vae.eval()
    zs, recs, scenes = [], [], []
    with torch.no_grad():
        for k in range(8):
            sc, _, x, _ = train_batch(toy_cfg, seed + 1, PHASE_VAE, k, 128)
            post = vae.encode(x.to(device)).latent_dist
            zs.append(post.sample())
            recs.append(to_uint8(vae.decode(post.mean).sample))
            scenes += sc
    std = torch.cat(zs).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    tail = np.mean(losses[-int(tcfg["log_every"]) :], axis=0)
    try:
        recon_acc = accuracy(np.concatenate(recs), scenes)
    except Exception as err:  # a diagnostic only: never lose a trained VAE to it
        log.warning("VAE: reading the reconstructions failed: %r", err)
        recon_acc = {"error": repr(err)}
    stats = {
        "steps": steps,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "final_mse": float(tail[0]),
        "final_kl": float(tail[1]),
        "reconstruction_reader_accuracy": recon_acc,
    }
    log.info("VAE done: latent std %.4f, reconstructions read as %s", std, stats["reconstruction_reader_accuracy"])
    vae.save_pretrained(final_dir, safe_serialization=True)
    write_json(final_dir / "stats.json", stats, sort_keys=False)
    ckpt_path.unlink(missing_ok=True)
    return stats


# --- phase 2: UNet + text encoder -------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """w(t) = min(SNR(t), gamma) / SNR(t) for epsilon prediction; 1 when gamma is None."""
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=float(gamma)) / snr


def _diffusion_models(dcfg: Mapping, seed: int, device: torch.device):
    """(tokenizer, unet, text_encoder, both as a ModuleList, its EMA copy, AdamW) at step 0 of phase 2."""
    from rapm.toy.tinysd import build_text_encoder, build_tokenizer, build_unet

    torch.manual_seed(seed + 1)
    tokenizer = build_tokenizer()
    unet = build_unet().to(device)
    if dcfg.get("text_init") == "toyclip":
        from rapm.toy.clipmodel import load_toy_clip
        from rapm.toy.tinysd import text_encoder_from_open_clip

        text_encoder = text_encoder_from_open_clip(load_toy_clip("cpu")[0], tokenizer).to(device)
    else:
        text_encoder = build_text_encoder(tokenizer).to(device)
    models = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(models).requires_grad_(False)
    text_scale = 1.0 if dcfg.get("text_lr") is None else float(dcfg["text_lr"]) / float(dcfg["lr"])
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if text_scale > 0:
        groups.append({"params": list(text_encoder.parameters()), "scale": text_scale})
    else:
        text_encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=float(dcfg["lr"]), weight_decay=float(dcfg["weight_decay"]))
    return tokenizer, unet, text_encoder, models, ema, opt


def _diffusion_batch(toy_cfg, seed, step, bs, drop, colour_drop, tokenizer, max_len, device):
    """Renders x of batch ``step`` and the token ids of their captions, "" with probability ``drop`` and each
    object's colour word left out with probability ``colour_drop`` (the batch's own generator)."""
    scenes, captions, x, rng = train_batch(toy_cfg, seed, PHASE_DIFFUSION, step, bs)
    captions = ["" if u < drop else c for u, c in zip(rng.random(bs), captions)]
    if colour_drop > 0:
        captions = [
            c and caption_without_colours(s, rng.random(len(s.objects)) < colour_drop) for s, c in zip(scenes, captions)
        ]
    ids = tokenizer(
        captions, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return x, ids


def _noised_latents(vae, sf: float, scheduler, x, gen: torch.Generator, bs: int, device):
    """(t, eps, z_t): z_0 = sf * a sample of q(z|x), t ~ U{0..T-1}, eps ~ N(0, I), drawn from ``gen`` in this order."""
    with torch.no_grad():
        post = vae.encode(x.to(device)).latent_dist
        z0 = sf * (post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device))
    t = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=gen).to(device)
    eps = torch.randn(z0.shape, generator=gen).to(device)
    return t, eps, scheduler.add_noise(z0, eps, t)


def train_diffusion(toy_cfg: Mapping, tcfg: Mapping, vae, state_dir: Path, device: torch.device):
    """Train (or resume) UNet + text encoder; returns (unet, text_encoder) with EMA weights, and stats."""
    from tqdm import tqdm

    from rapm.toy.tinysd import build_scheduler

    dcfg, seed = tcfg["diffusion"], int(tcfg["seed"])
    ckpt_path = state_dir / "diffusion.safetensors"
    tokenizer, unet, text_encoder, models, ema, opt = _diffusion_models(dcfg, seed, device)
    start, losses = 0, []
    if (state := _load_state(ckpt_path, opt, device)) is not None:
        modules, start, losses = state
        models.load_state_dict(modules["model"])
        ema.load_state_dict(modules["ema"])
        log.info("diffusion: resuming at step %d", start)

    scheduler = build_scheduler()
    abar = scheduler.alphas_cumprod.to(device)
    vae.requires_grad_(False).eval()
    sf = float(vae.config.scaling_factor)
    steps, bs, drop = int(dcfg["steps"]), int(dcfg["batch_size"]), float(dcfg["caption_dropout"])
    colour_drop = float(dcfg.get("colour_dropout", 0.0))
    max_len = tokenizer.model_max_length
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="UNet+text", mininterval=5, file=sys.stderr)
    models.train()
    for step in bar:
        lr = float(dcfg["lr"]) * _lr_factor(step, steps, int(tcfg["warmup_steps"]), float(tcfg["lr_final_fraction"]))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        # 1. data: renders x of train-split scenes, captions c ("" with probability `caption_dropout`)
        x, ids = _diffusion_batch(toy_cfg, seed, step, bs, drop, colour_drop, tokenizer, max_len, device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        # 2. z_0 = scale * sample of q(z|x); t ~ U{0..999}; eps ~ N(0, I); z_t = sqrt(abar_t) z_0 + sqrt(1-abar_t) eps
        t, eps, zt = _noised_latents(vae, sf, scheduler, x, gen, bs, device)
        # 3. eps_theta(z_t, t, c) and the min-SNR weighted epsilon loss
        pred = unet(zt, t, text_encoder(ids)[0]).sample
        w = min_snr_weights(abar, t, dcfg["snr_gamma"])
        loss = (w * (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], float(dcfg["grad_clip"]))
        opt.step()
        # 4. EMA with warm-up: decay = min(ema_decay, (1 + k) / (10 + k))
        _ema_update(ema, models, min(float(dcfg["ema_decay"]), (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % int(tcfg["log_every"]) == 0:
            m = float(np.mean(losses[-int(tcfg["log_every"]) :]))
            bar.set_postfix(loss=f"{m:.4f}", lr=f"{lr:.2e}")
            log.info("diffusion step %d/%d: loss %.4f lr %.2e", step + 1, steps, m, lr)
        if (step + 1) % int(tcfg["checkpoint_every"]) == 0 or step + 1 == steps:
            _save_state(ckpt_path, {"model": models.state_dict(), "ema": ema.state_dict()}, opt, step + 1, losses)
    tail = losses[-int(tcfg["log_every"]) :] if losses else [float("nan")]
    stats = {
        "steps": steps,
        "final_loss": float(np.mean(tail)),
        "loss_curve": [float(np.mean(losses[i : i + 100])) for i in range(0, len(losses), 100)],
    }
    return ema[0].eval(), ema[1].eval(), tokenizer, stats


# --- entry point ------------------------------------------------------------------------------------


def train_teacher(
    cfg: Mapping, out_dir: str | Path, state_dir: str | Path | None = None, command: str | None = None
) -> dict:
    """Train TinySD from ``cfg`` (sections data.toy and toy_teacher) and save the pipeline to ``out_dir``.

    ``state_dir`` (default ``<out_dir>.state``) keeps the resumable state; run again to resume.
    """
    from rapm.toy.scene import toy_settings
    from rapm.toy.tinysd import build_pipeline, dir_size, param_counts, save_pipeline

    t0 = time.time()
    toy_cfg, tcfg = toy_settings(cfg["data"]["toy"]), cfg["toy_teacher"]
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir else out_dir.with_name(out_dir.name + ".state")
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(tcfg["num_threads"]))
    device = resolve_device(str(tcfg["device"]), key="toy_teacher.device")
    log.info("TinySD training on %s, %d threads; state in %s", device, torch.get_num_threads(), state_dir)
    write_json(state_dir / "config.json", {"data.toy": toy_cfg, "toy_teacher": tcfg}, sort_keys=False)

    vae, vae_stats = train_vae(toy_cfg, tcfg, state_dir, device)
    unet, text_encoder, tokenizer, diff_stats = train_diffusion(toy_cfg, tcfg, vae, state_dir, device)

    pipe = build_pipeline(vae.cpu(), unet.cpu(), text_encoder.cpu(), tokenizer)
    save_pipeline(pipe, out_dir)
    wall = time.time() - t0
    summary = {
        "command": command,
        "seed": int(tcfg["seed"]),
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),  # this invocation only (a resumed run counts from its restart)
        "toy_data": toy_cfg,
        "toy_teacher": tcfg,
        "vae": vae_stats,
        "diffusion": diff_stats,
        "parameters": param_counts(pipe),
        "size_bytes": dir_size(out_dir),
        "versions": library_versions(("torch", "diffusers", "transformers", "numpy")),
    }
    write_json(out_dir / "training.json", summary, sort_keys=False)
    log.info("TinySD saved to %s (%.1f MB) in %.1f min", out_dir, summary["size_bytes"] / 1e6, wall / 60)
    return summary


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm toy train-teacher`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--out-dir", required=True, help="the pipeline directory to write (e.g. rapm/assets/tinysd)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="resumable training state (default: <out-dir>.state); keep it outside declared outputs",
    )


def command(args: argparse.Namespace) -> int:

    cfg = stage_config(args, "data.toy", "toy_teacher")
    train_teacher(
        cfg, out_dir=args.out_dir, state_dir=args.state_dir, command=" ".join(["python -m rapm"] + sys.argv[1:])
    )
    return 0
