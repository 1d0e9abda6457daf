"""Benchmark of the teacher-trajectory stage (rapm.trajectories); prints its figures.

    python benchmarks/trajectories.py                  # CPU, toy teacher: rapm:tinysd if shipped, else a tiny random SD
    python benchmarks/trajectories.py --device cuda --dtype float16 --measure-full sd15 sdxl   # on a GPU

1. Throughput: ``compute_shard`` (text encoding, guided DDIM on the fine grid, zarr writes, done flags) on
   J prompts, in trajectories per second, against the raw UNet forward throughput at the same batch size
   measured in the same run: N·M forwards of 2B rows (CFG batch) per B trajectories, nothing else. The two
   are measured alternately, ``--repeats`` times, and the medians compared (the machine may be shared).
2. Bytes per trajectory: the gathered store on disk, and the arrays alone.
3. Projections for 1000 SD1.5 (4×64×64 latents, 77×768 embeddings) and SDXL (4×128×128, 77×2048 + pooled
   1280 + 6 time ids) trajectories. Storage: exact, from the layout (float32, uncompressed, 4-byte CRC
   per chunk, one trajectory per chunk). Time = (1000 / B) · N·M · t_step / ratio, where ratio is the
   pipeline/raw ratio measured in 1. and t_step the time of one UNet forward of 2B rows at the model's
   size. t_step is measured on the real architecture (random weights, its published config) with
   ``--measure-full``; otherwise it is scaled from the tiny UNet's measured step by the ratio of forward
   FLOPs (counted with torch's FlopCounterMode on the meta device), which assumes the same achieved
   FLOP/s as the tiny model: a pessimistic bound on a GPU (large kernels run far closer to peak).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rapm import store as TS
from rapm import trajectories as T
from rapm.conditioning import encode_prompts
from rapm.models.shapes import MODELS, SD15_UNET, SDXL_UNET  # noqa: F401 - the published UNet configs
from rapm.teacher import ASSET_ROOT, load_teacher

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_prompts(directory: Path, count: int) -> tuple[Path, Path]:
    rows = [
        f"{j},{j},{j},a {COLOURS[j % 6]} {SHAPES[j // 6 % 3]} above a {COLOURS[(j // 18 + 1) % 6]} "
        f"{SHAPES[j % 3]},x.jpg\n"
        for j in range(count)
    ]
    data = ("prompt_id,image_id,caption_id,caption,file_name\n" + "".join(rows)).encode()
    (directory / "train.csv").write_bytes(data)
    (directory / "manifest.json").write_text(
        json.dumps({"outputs": {"train.csv": {"sha256": hashlib.sha256(data).hexdigest()}}})
    )
    return directory / "train.csv", directory / "manifest.json"


def unet_inputs(unet, rows: int, latent, cond_shapes, device, dtype):
    z = torch.randn(rows, *latent, device=device, dtype=dtype)
    kwargs = {"encoder_hidden_states": torch.randn(rows, *cond_shapes["prompt_embeds"], device=device, dtype=dtype)}
    if "pooled_embeds" in cond_shapes:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, *cond_shapes["pooled_embeds"], device=device, dtype=dtype),
            "time_ids": torch.randn(rows, 6, device=device, dtype=dtype),
        }
    return z, kwargs


@torch.no_grad()
def time_raw_unet(unet, batches: list[int], steps: int, latent, cond_shapes, device, dtype) -> float:
    """Seconds for ``steps`` forwards of 2b rows for every batch size b in ``batches`` (what the stage must run)."""
    inputs = {b: unet_inputs(unet, 2 * b, latent, cond_shapes, device, dtype) for b in set(batches)}
    sync(device)
    start = time.perf_counter()
    for b in batches:
        z, kwargs = inputs[b]
        for t in range(steps):
            unet(z, 999 - t, **kwargs, return_dict=False)
    sync(device)
    return time.perf_counter() - start


def forward_flops(unet_config: dict, rows: int, latent, cond_shapes) -> float:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        z, kwargs = unet_inputs(unet, rows, latent, cond_shapes, "meta", torch.float32)
        with FlopCounterMode(display=False) as counter:
            unet(z, torch.full((rows,), 999), **kwargs)
    return float(counter.get_total_flops())


@torch.no_grad()
def measure_full_step(unet_config: dict, rows: int, latent, cond_shapes, device, dtype, repeats: int = 5) -> float:
    """Seconds of one forward of the real architecture (random weights) with ``rows`` rows."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
    z, kwargs = unet_inputs(unet, rows, latent, cond_shapes, device, dtype)
    for _ in range(2):
        unet(z, 999, **kwargs, return_dict=False)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet(z, 999, **kwargs, return_dict=False)
        sync(device)
        times.append(time.perf_counter() - start)
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def projected_bytes(N: int, latent, cond_shapes, prompt_bytes: float) -> int:
    """Bytes of one trajectory in the store layout: float32 arrays, a 4-byte CRC32C per chunk (one per array)."""
    floats = (2 * N + 1) * latent[0] * latent[1] * latent[2] + sum(torch.Size(s).numel() for s in cond_shapes.values())
    arrays = 2 + len(cond_shapes) + 4  # coarse, delta, conditioning, seed, prompt_id, prompt, done
    return int(4 * floats + 8 + 8 + 1 + prompt_bytes + 4 * arrays)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument(
        "--teacher", default=None, help="pipeline directory (default: rapm:tinysd if shipped, else a tiny random SD)"
    )
    p.add_argument("--trajectories", type=int, default=32, help="J")
    p.add_argument("--batch-size", type=int, default=8, help="B")
    p.add_argument("--num-steps", type=int, default=4, help="N")
    p.add_argument("--steps-per-slot", type=int, default=10, help="M")
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=3, help="alternating pipeline/raw measurements; medians are compared")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no spin-waiting on a shared machine)")
    p.add_argument(
        "--measure-full",
        nargs="*",
        default=[],
        choices=sorted(MODELS),
        help="time one forward of these real-size UNets (random weights) instead of FLOP scaling",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    N, M, B, J = args.num_steps, args.steps_per_slot, args.batch_size, args.trajectories

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.teacher:
            path = args.teacher
        elif (ASSET_ROOT / "tinysd" / "model_index.json").is_file():
            path = "rapm:tinysd"
        else:
            from rapm.models.tiny import tiny_sd_pipeline

            path = str(tmp / "tiny-sd")
            tiny_sd_pipeline(0).save_pretrained(path)
        teacher_cfg = {"path": path, "dtype": args.dtype, "device": args.device}
        teacher = load_teacher(teacher_cfg)
        cfg = dict(
            num_steps=N,
            steps_per_slot=M,
            guidance=args.guidance,
            num_trajectories=None,
            seed=0,
            resolution=None,
            shards=1,
            batch_size=B,
            trajectories_per_chunk=1,
        )
        prompts = write_prompts(tmp, J)
        latent = teacher.latent_shape()
        cond_shapes = {k: tuple(v.shape[1:]) for k, v in encode_prompts(teacher, ["x"]).tensors().items()}
        batches = [min(B, J - b0) for b0 in range(0, J, B)]

        # warm-up (allocator, kernels), then alternate pipeline and raw UNet runs
        T.run_batch(teacher, ["warm up"] * B, list(range(B)), {**cfg, "latent_shape": list(latent)})
        time_raw_unet(teacher.unet, batches[:1], 2, latent, cond_shapes, device, dtype)
        pipe_s, raw_s, manifest = [], [], None
        for r in range(args.repeats):
            d = tmp / f"run{r}"
            T.init_store(d, teacher_cfg, cfg, *prompts, key="bench", teacher=teacher)
            summary = T.compute_shard(d, teacher_cfg, cfg, 0, teacher=teacher, progress=False)
            pipe_s.append(summary["compute_s"])
            raw_s.append(time_raw_unet(teacher.unet, batches, N * M, latent, cond_shapes, device, dtype))
            if r == 0:
                manifest = T.gather(d, [], d / "manifest.json")
        pipe, raw = statistics.median(pipe_s), statistics.median(raw_s)
        ratio = raw / pipe
        store_bytes = manifest["bytes_on_disk"]
        array_bytes = sum(f.stat().st_size for f in TS.store_path(tmp / "run0").rglob("c/**/*") if f.is_file())
        prompt_bytes = sum(len(line) for line in prompts[0].read_text().splitlines()[1:]) / J / 2
        tiny_step = raw / (len(batches) * N * M)  # seconds per forward of 2B rows (full batches dominate)
        tiny_flops = forward_flops(dict(teacher.unet.config), 2 * B, latent, cond_shapes)

    print(
        f"teacher: {path} ({teacher.type}, {sum(p.numel() for p in teacher.unet.parameters()) / 1e6:.2f}M UNet params, "
        f"latents {tuple(latent)}), device {device}, {args.dtype}, {torch.get_num_threads()} CPU thread(s)"
    )
    print(
        f"grid N={N}, M={M} ({N * M} guided steps), w={args.guidance}, J={J} trajectories, batch size B={B} "
        f"(UNet rows {2 * B}), {args.repeats} alternating repeats"
    )
    print(
        f"pipeline (compute_shard):  {J / pipe:8.2f} trajectories/s   (median {pipe:.3f} s; runs {[round(x, 3) for x in pipe_s]})"
    )
    print(
        f"raw UNet forward, same B:  {J / raw:8.2f} trajectories/s   (median {raw:.3f} s; runs {[round(x, 3) for x in raw_s]})"
    )
    print(f"ratio pipeline / raw UNet: {ratio:8.3f}   (target >= 0.85)")
    print(
        f"bytes per trajectory: {store_bytes / J:,.0f} on disk incl. metadata ({array_bytes / J:,.0f} in chunks; "
        f"projected by the layout formula: {projected_bytes(N, latent, cond_shapes, prompt_bytes):,})"
    )

    figures = {
        "device": str(device),
        "dtype": args.dtype,
        "teacher": path,
        "N": N,
        "M": M,
        "B": B,
        "J": J,
        "pipeline_traj_per_s": J / pipe,
        "raw_traj_per_s": J / raw,
        "ratio": ratio,
        "bytes_per_trajectory_disk": store_bytes / J,
        "bytes_per_trajectory_chunks": array_bytes / J,
        "projections": {},
    }
    print(
        f"projection for 1000 trajectories (N={N}, M={M}, B={B}, on {device} {args.dtype}; time includes the "
        f"measured pipeline overhead 1/ratio):"
    )
    for name, (unet_config, big_latent, big_cond) in MODELS.items():
        size = 1000 * projected_bytes(N, big_latent, big_cond, prompt_bytes)
        if name in args.measure_full:
            step, how = measure_full_step(unet_config, 2 * B, big_latent, big_cond, device, dtype), "measured"
        else:
            scale = forward_flops(unet_config, 2 * B, big_latent, big_cond) / tiny_flops
            step, how = tiny_step * scale, f"tiny step x {scale:,.0f} (FLOP ratio)"
        hours = 1000 / B * N * M * step / ratio / 3600
        figures["projections"][name] = {"bytes": size, "step_s": step, "step_source": how, "hours": hours}
        print(
            f"  {name}: storage {size / 1e9:.2f} GB; UNet step ({2 * B} rows) {step:.3f} s [{how}]; time {hours:.2f} h"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
