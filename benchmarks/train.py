"""Benchmark of one RAPM training iteration (rapm.objective / rapm.train); prints its figures.

    python benchmarks/train.py                                   # CPU, the toy teacher (rapm:tinysd, else a tiny random SD)
    python benchmarks/train.py --model sd15 sdxl --device cuda --mixed-precision bf16 --gradient-checkpointing

For each model: the discriminator (D) and student (G) updates of ``schedule: alternate`` on random
trajectories of the model's latent size, batch size 1 (``--batch-size``), N = 4. Per update, the wall time
is split into

- data       building the batch and the iteration's noise (load_batch + draw_noise; a store read on disk adds
             the zarr read, ~1 ms per trajectory, see benchmarks/trajectories.py),
- student    forward passes of the student (roll-out; in the D step also the relative-target step),
- backbone   forward passes of the frozen UNet as discriminator feature extractor,
- heads      the discriminator heads (forward),
- backward   back-propagation and the optimiser step (the rest of the update).

UNet evaluations per update (calls and rows) are counted by a forward hook. Two baselines are measured
in the same run:

- ``bare``: the SAME update code (rapm.objective.RAPM, same rows, same calls, same batch and noise) on
  a second copy of the model that carries NO adapter: teacher mode is then a no-op and every pass is a
  plain UNet pass (the same bare figure serves every ``--merged`` setting). Where the update back-propagates (the G step) the bare run back-propagates through
  the same passes (its first conv's weight is made trainable so the backward runs through the whole
  network, as the LoRA's does); there is no optimiser step. ``ratio`` = update time / bare time is the
  cost of the adapter machinery (peft wrappers or the merge of W + BA and its full-size weight gradients,
  teacher-mode switches, optimiser, clipping); 1.0 would be the cost of the network passes alone.
  ``--merged`` picks ``train.lora.merged`` (auto: merged weights for float32 UNets up to 50M parameters,
  i.e. the toy; peft's adapter branch for SD1.5/SDXL); ``--merged false auto`` measures both in one run.
- ``unet forward``: one plain forward of the UNet at batch 1; ``x forward`` says how many forwards one
  update costs.

Peak memory is the process's peak RSS on the CPU and CUDA max allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from rapm.conditioning import Conditioning
from rapm.config import validate
from rapm.discriminator import Discriminator
from rapm.lora import add_student_lora, enable_gradient_checkpointing, lora_parameters
from rapm.objective import RAPM, Batch, optimizers
from rapm.schedule import coarse_timesteps, delta_timesteps
from rapm.teacher import Teacher, load_teacher


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_teacher(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Teacher, dict]:
    """The model and its conditioning shapes: ``toy`` (TinySD, or a tiny random SD when not shipped), ``sd15``, ``sdxl``."""
    if name == "toy":
        from rapm.toy.tinysd import ASSET_DIR

        if (ASSET_DIR / "model_index.json").is_file():
            teacher = load_teacher({"path": "rapm:tinysd", "dtype": "float32", "device": str(device)})
        else:
            import tempfile

            from rapm.models.tiny import tiny_sd_pipeline

            d = tempfile.mkdtemp()
            tiny_sd_pipeline(seed=0).save_pretrained(d)
            teacher = load_teacher({"path": d, "dtype": "float32", "device": str(device)})
        c = teacher.unet.config
        return teacher, {"prompt_embeds": (77, c.cross_attention_dim)}
    from rapm.models.shapes import MODELS, build_unet
    from rapm.models.tiny import _scheduler

    unet = build_unet(name).to(device, dtype).requires_grad_(False)
    pipe = SimpleNamespace(unet=unet, scheduler=_scheduler(), vae_scale_factor=8)
    teacher = Teacher(pipe=pipe, type=name, dtype=dtype, device=device, source=f"random {name}", location="memory")
    return teacher, MODELS[name][2]


def random_batch(teacher, cond_shapes, n: int, batch_size: int, device) -> Batch:
    c, side = teacher.unet.config.in_channels, teacher.unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(**{k: torch.randn((batch_size, *s), generator=g).to(device) for k, s in cond_shapes.items()})
    return Batch(
        coarse=torch.randn((batch_size, n + 1, c, side, side), generator=g).to(device),
        delta=torch.randn((batch_size, n, c, side, side), generator=g).to(device),
        cond=cond,
        indices=list(range(batch_size)),
    )


class Timers:
    """Wraps methods of an object so their (synchronised) wall time accumulates under a name."""

    def __init__(self, device):
        self.device, self.total = device, {}

    def wrap(self, obj, method: str, name: str):
        real = getattr(obj, method)

        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0
            return out

        setattr(obj, method, timed)

    def take(self) -> dict:
        out, self.total = self.total, {}
        return out


def bare_update_ms(name: str, args, cfg) -> dict:
    """Median ms of the D and G updates' passes on a copy of the model without any adapter (see module doc)."""
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    teacher, cond_shapes = make_teacher(name, device, dtype)
    unet = teacher.unet
    torch.manual_seed(0)
    if cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        unet.train()
    disc = Discriminator(unet, cfg["discriminator"]).to(device)
    unet.conv_in.weight.requires_grad_(True)  # so the G step's backward runs through every pass
    rapm = RAPM(teacher, disc, coarse_timesteps(4), delta_timesteps(4, 10), cfg)
    times = {"d": [], "g": []}
    for it in range(args.warmup + args.repeats):
        for kind in ("d", "g"):
            batch = random_batch(teacher, cond_shapes, 4, args.batch_size, device)
            noise = rapm.draw_noise(0, it, args.batch_size, batch.coarse.shape[2:])
            sync(device)
            t0 = time.perf_counter()
            if kind == "d":
                rapm.discriminator_loss(batch, noise)["loss"].backward()
            else:
                rapm.generator_backward(batch, noise)
            sync(device)
            if it >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
            unet.zero_grad(set_to_none=True)
            disc.zero_grad(set_to_none=True)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_model(name: str, merged: bool | str, args) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    teacher, cond_shapes = make_teacher(name, device, dtype)
    cfg = validate(
        {
            "train": {
                "mixed_precision": args.mixed_precision,
                "gradient_checkpointing": args.gradient_checkpointing,
                "batch_size": args.batch_size,
                "lora": {"merged": merged},
            }
        },
        partial=True,
    )["train"]
    torch.manual_seed(0)
    unet = teacher.unet
    add_student_lora(unet, cfg["lora"])
    if cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(unet)
        unet.train()
    disc = Discriminator(unet, cfg["discriminator"]).to(device)
    n = 4
    rapm = RAPM(teacher, disc, coarse_timesteps(n), delta_timesteps(n, 10), cfg)
    opt_g, opt_d = optimizers(cfg["optim"], lora_parameters(unet), disc.parameters())  # the trainer's AdamW
    calls = {"n": 0, "rows": 0}

    def count(module, a):
        calls["n"] += 1
        calls["rows"] += int(a[0].shape[0]) if a else 0

    unet.register_forward_pre_hook(count)
    timers = Timers(device)
    timers.wrap(rapm, "student_step", "student")
    timers.wrap(rapm, "_features", "backbone")
    timers.wrap(rapm, "_logits", "heads")
    batch0 = random_batch(teacher, cond_shapes, n, args.batch_size, device)

    # baseline: one plain UNet forward at batch 1 (teacher mode, no grad)
    from rapm.lora import teacher_mode
    from rapm.teacher import unet_eps

    def forward():
        with torch.no_grad(), teacher_mode(unet), rapm.autocast():
            unet_eps(
                teacher, batch0.coarse[:1, 0], 999, Conditioning(**{k: v[:1] for k, v in batch0.cond.tensors().items()})
            )

    for _ in range(2):
        forward()
    fwd = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        forward()
        sync(device)
        fwd.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows = {"d": [], "g": []}
    for it in range(args.warmup + args.repeats):
        for kind in ("d", "g"):
            sync(device)
            t0 = time.perf_counter()
            batch = random_batch(teacher, cond_shapes, n, args.batch_size, device)
            noise = rapm.draw_noise(0, it, args.batch_size, batch.coarse.shape[2:])
            sync(device)
            t_data = time.perf_counter() - t0
            calls["n"] = calls["rows"] = 0
            timers.take()
            t1 = time.perf_counter()
            if kind == "d":
                loss = rapm.discriminator_loss(batch, noise)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            else:
                rapm.generator_backward(batch, noise)
                torch.nn.utils.clip_grad_norm_(lora_parameters(unet), 1.0)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
            sync(device)
            t_update = time.perf_counter() - t1
            parts = timers.take()
            parts["backward"] = t_update - sum(parts.values())
            parts["data"] = t_data
            if it >= args.warmup:
                rows[kind].append(
                    {
                        **parts,
                        "total": t_data + t_update,
                        "update": t_update,
                        "unet_calls": calls["n"],
                        "unet_rows": calls["rows"],
                    }
                )
    out = {
        "model": name,
        "lora_forward": "merged" if rapm.merged else "peft",
        "merged_setting": merged,
        "device": str(device),
        "dtype": args.dtype,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_size": args.batch_size,
        "latent": list(batch0.coarse.shape[2:]),
        "unet_forward_ms": 1e3 * statistics.median(fwd),
    }
    for kind, recs in rows.items():
        med = {k: 1e3 * statistics.median(r[k] for r in recs) for k in recs[0] if k not in ("unet_calls", "unet_rows")}
        out[kind] = {
            **{f"{k}_ms": round(v, 2) for k, v in med.items()},
            "unet_calls": recs[0]["unet_calls"],
            "unet_rows": recs[0]["unet_rows"],
            "x_forward": round(med["total"] / out["unet_forward_ms"], 2),
        }
    if not args.no_bare:
        bare = bare_update_ms(name, args, cfg)
        for kind in ("d", "g"):
            out[kind]["bare_ms"] = round(bare[kind], 2)
            out[kind]["ratio"] = round(out[kind]["update_ms"] / bare[kind], 3)
        out["ratio"] = round((out["d"]["update_ms"] + out["g"]["update_ms"]) / (bare["d"] + bare["g"]), 3)
    per_iteration = (out["d"]["total_ms"] + out["g"]["total_ms"]) / 2
    out["iterations_per_s"] = round(1e3 / per_iteration, 3)
    out["seconds_per_iteration"] = round(per_iteration / 1e3, 4)
    from rapm.io import peak_rss_mb

    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", nargs="+", default=["toy"], choices=["toy", "sd15", "sdxl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="UNet weights")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--merged",
        nargs="+",
        default=["auto"],
        choices=["auto", "true", "false"],
        help="train.lora.merged setting(s) to measure, each against the same bare baseline (default: auto)",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-UNet baseline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [{"true": True, "false": False}.get(m, m) for m in args.merged]
    results = [bench_model(m, merged, args) for m in args.model for merged in settings]
    for r in results:
        print(
            f"\n{r['model']} on {r['device']}, LoRA forward {r['lora_forward']} (train.lora.merged: {r['merged_setting']}) "
            f"(latent {r['latent']}, batch {r['batch_size']}, {r['dtype']}, "
            f"autocast {r['mixed_precision']}, checkpointing {r['gradient_checkpointing']}): "
            f"one UNet forward {r['unet_forward_ms']:.2f} ms"
        )
        print(
            f"{'update':<8}{'total':>9}{'data':>8}{'student':>9}{'backbone':>10}{'heads':>8}{'backward':>10}"
            f"{'UNet calls':>12}{'rows':>6}{'x forward':>11}{'bare':>9}{'ratio':>7}"
        )
        for kind in ("d", "g"):
            x = r[kind]
            print(
                f"{kind:<8}{x['total_ms']:>9.1f}{x['data_ms']:>8.1f}{x.get('student_ms', 0):>9.1f}{x.get('backbone_ms', 0):>10.1f}"
                f"{x.get('heads_ms', 0):>8.1f}{x['backward_ms']:>10.1f}{x['unet_calls']:>12}{x['unet_rows']:>6}"
                f"{x['x_forward']:>11.1f}{x.get('bare_ms', float('nan')):>9.1f}{x.get('ratio', float('nan')):>7.2f}"
            )
        if "ratio" in r:
            print(
                f"update time / bare passes (D + G): {r['ratio']:.3f}   (bare: the same passes on a UNet without adapters)"
            )
        print(
            f"iterations/s {r['iterations_per_s']}  s/iteration {r['seconds_per_iteration']}  peak RSS {r['peak_rss_mb']} MB"
            + (f"  peak GPU {r['peak_gpu_mb']} MB" if r["peak_gpu_mb"] else "")
            + "  (times in ms, medians)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
