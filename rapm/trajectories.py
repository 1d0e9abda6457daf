"""Teacher trajectories (docs/method.md §1): a sharded, resumable zarr store, its gather step and reader.

For training prompt j (row j of ``results/prompts/train.csv``) the teacher runs guided DDIM on the fine
grid of N·M steps from the initial noise z̃_N drawn with its own seed; we keep the coarse states and the
Δ-states (the first fine state after each coarse boundary), and the conditioning, so training never
runs the text encoders or the teacher.

The store's layout, attributes and reader are in :mod:`rapm.store`; this module computes it: ``init``
pre-allocates it, ``compute`` fills one shard, ``gather`` verifies it and marks it complete.

Determinism. Trajectory j's noise comes from its own generator (seed + j), so it is bitwise the same
for every shard count and batch size, as are the text embeddings. The UNet is not bitwise
batch-invariant (CPU: a batch of 8 and 8 batches of 1 differ by ~1e-5, convolutions and GEMMs pick
kernels by batch size; H100: ~1e-3 relative, cuDNN convolutions run in TF32 by default), so
trajectories are computed in fixed global batches [k·B, (k+1)·B) of ``batch_size`` B: shards own whole
batches and chunks, a batch's done flags are written after all its rows, and a batch with any missing
row (a repaired chunk) is run whole, only its missing rows being written. The arrays are then bitwise
identical for any shard count and across kill-and-resume, for a given B, device and thread count
(tested on CPU; also seen on an H100). Another B changes the states at rounding level, amplified by
guidance along the trajectory (``tests/test_trajectories.py`` measures both).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from rapm.cliargs import add_config_args, add_threads_arg, set_threads, stage_config
from rapm.io import LIBRARIES, library_versions, resource_fields, sha256_file, write_summary
from rapm.progress import Progress
from rapm.schedule import coarse_timesteps, ddim_sample, delta_timesteps, fine_timesteps
from rapm.shards import item_seed, shard_range
from rapm.store import (
    COND_ARRAYS,
    FINGERPRINT,
    FORMAT,
    FORMAT_VERSION,
    STORE_NAME,
    TrajectoryStoreError,
    array_specs,
    attr,
    check_attrs,
    chunk_problems,
    expected_attrs,
    import_zarr,
    jsonable,
    store_path,
    verify_store,
    weights_sha256,
)

log = logging.getLogger(__name__)


# --- small helpers -------------------------------------------------------------------------------


def initial_noise(seed_j: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """z̃_N of one trajectory, (1, C, H, W) float32 on the CPU: what diffusers' pipelines draw for batch 1
    with ``generator=torch.Generator().manual_seed(seed_j)`` (``randn_tensor`` on a CPU generator)."""
    return torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed_j), dtype=torch.float32)


def _grids(num_steps: int, steps_per_slot: int, num_train_timesteps: int) -> tuple[list[int], list[int], list[int]]:
    return (
        fine_timesteps(num_steps, steps_per_slot, num_train_timesteps),
        coarse_timesteps(num_steps, num_train_timesteps),
        delta_timesteps(num_steps, steps_per_slot, num_train_timesteps),
    )


def read_prompts(train_csv: str | Path, manifest: str | Path, num_trajectories: int | None):
    """The first J rows of train.csv after checking it against the prompt-set manifest; and its hashes."""
    import pandas as pd

    train_csv, manifest = Path(train_csv), Path(manifest)
    for path in (train_csv, manifest):
        if not path.is_file():
            raise TrajectoryStoreError(f"{path}: not found (the data stage, rule make_prompt_sets, writes it)")
    info = json.loads(manifest.read_text(encoding="utf-8"))
    expected = info.get("outputs", {}).get("train.csv", {}).get("sha256")
    found = sha256_file(train_csv)
    if expected != found:
        raise TrajectoryStoreError(
            f"{train_csv}: SHA-256 {found} differs from {manifest} ({expected}); rerun the data stage"
        )
    frame = pd.read_csv(train_csv, dtype={"caption": str}, keep_default_na=False)
    missing = {"prompt_id", "caption"} - set(frame.columns)
    if missing:
        raise TrajectoryStoreError(f"{train_csv}: missing column(s) {sorted(missing)}")
    if num_trajectories is not None:
        if num_trajectories > len(frame):
            raise TrajectoryStoreError(
                f"trajectories.num_trajectories = {num_trajectories}, but {train_csv} has only "
                f"{len(frame)} prompts (prompts.num_train)"
            )
        frame = frame.iloc[:num_trajectories]
    hashes = {"train_csv_sha256": found, "manifest_sha256": sha256_file(manifest), "rows": len(frame)}
    return frame.reset_index(drop=True), hashes


# --- attributes ----------------------------------------------------------------------------------


def build_attrs(
    teacher, traj_cfg: Mapping[str, Any], prompt_hashes: Mapping, cond_shapes: Mapping, key: str | None
) -> dict:
    meta = teacher.metadata()
    N, M = int(traj_cfg["num_steps"]), int(traj_cfg["steps_per_slot"])
    fine, coarse, delta = _grids(N, M, teacher.num_train_timesteps)
    digests = weights_sha256(teacher)
    return jsonable(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": key,
            "teacher": {
                **{k: meta[k] for k in ("path", "location", "type", "pipeline_class", "dtype")},
                "weights_sha256": digests["all"],
                "component_sha256": digests,
            },
            "scheduler": meta["scheduler"],
            "num_steps": N,
            "steps_per_slot": M,
            "guidance": float(traj_cfg["guidance"]),
            "seed": int(traj_cfg["seed"]),
            "resolution": traj_cfg.get("resolution"),
            "image_size": traj_cfg.get("resolution") or teacher.resolution,
            "num_trajectories": int(prompt_hashes["rows"]),
            "trajectories_per_chunk": int(traj_cfg["trajectories_per_chunk"]),
            "batch_size": int(traj_cfg["batch_size"]),
            "coarse_timesteps": coarse,
            "delta_timesteps": delta,
            "fine_timesteps": fine,
            "latent_shape": list(teacher.latent_shape(traj_cfg.get("resolution"))),
            "conditioning_shapes": {k: list(v) for k, v in cond_shapes.items()},
            "state_dtype": "float32",
            "prompts": dict(prompt_hashes),
            "versions": library_versions(LIBRARIES),
            "complete": False,
        }
    )


# --- init ----------------------------------------------------------------------------------------


def init_store(
    directory: str | Path,
    teacher_cfg: Mapping,
    traj_cfg: Mapping,
    train_csv: str | Path,
    manifest: str | Path,
    *,
    key: str | None = None,
    teacher=None,
) -> dict[str, Any]:
    """Create the pre-allocated store (full shapes; seeds and prompts written), or keep a matching one.

    A store whose content-defining attributes (:data:`FINGERPRINT`) equal the new ones is kept with its
    finished trajectories (this is what makes the shards resumable across reruns); one that differs
    (another prompt set, retrained teacher weights, ...) is deleted and re-created. Returns what was done.
    """
    from rapm.conditioning import encode_prompts
    from rapm.teacher import load_teacher

    zarr = import_zarr()
    from zarr.codecs import Crc32cCodec

    path = store_path(directory)
    frame, hashes = read_prompts(train_csv, manifest, traj_cfg.get("num_trajectories"))
    teacher = teacher if teacher is not None else load_teacher(teacher_cfg)
    resolution = traj_cfg.get("resolution")
    if resolution is not None and resolution % teacher.pipe.vae_scale_factor:
        raise TrajectoryStoreError(
            f"trajectories.resolution {resolution} is not a multiple of the VAE factor {teacher.pipe.vae_scale_factor}"
        )
    probe = encode_prompts(teacher, [str(frame["caption"].iloc[0])], resolution=resolution)
    attrs = build_attrs(teacher, traj_cfg, hashes, {k: tuple(v.shape[1:]) for k, v in probe.tensors().items()}, key)

    action, differs = "created", []
    if path.exists():
        try:
            old = dict(zarr.open_group(path, mode="r").attrs)
        except Exception:  # noqa: BLE001 - an unreadable store is re-created
            old = {}
        differs = [k for k in FINGERPRINT if jsonable(attr(old, k)) != jsonable(attr(attrs, k))]
        if not differs:
            done = int(np.asarray(zarr.open_group(path, mode="r")["done"][:]).sum())
            if old.get("batch_size") != attrs["batch_size"] and done:
                log.warning(
                    "store %s holds %d trajectories computed with batch_size %s; the rest use %s (differences "
                    "at float rounding level, see the module docstring)",
                    path,
                    done,
                    old.get("batch_size"),
                    attrs["batch_size"],
                )
            log.info(
                "keeping %s: it matches the request and holds %d of %d trajectories",
                path,
                done,
                attrs["num_trajectories"],
            )
            return {"action": "kept", "store": str(path), "key": key, "done": done, "attrs": old}
        log.warning("re-creating %s: attribute(s) %s differ from the request", path, ", ".join(differs))
        shutil.rmtree(path)
        action = "reset"

    group = zarr.open_group(path, mode="w")
    chunk = attrs["trajectories_per_chunk"]
    arrays = {}
    for name, (shape, dtype) in array_specs(attrs).items():  # unwritten rows read as NaN / -1 / not done
        fill = {"float32": np.nan, "int64": -1, "uint8": 0}.get(dtype)
        arrays[name] = group.create_array(
            name,
            shape=shape,
            chunks=(chunk, *shape[1:]),
            dtype=dtype,
            fill_value=fill,
            compressors=[Crc32cCodec()],
            config={"write_empty_chunks": True},
        )
    J = attrs["num_trajectories"]
    arrays["seed"][:] = np.array([item_seed(attrs["seed"], j) for j in range(J)], dtype=np.int64)
    arrays["prompt_id"][:] = frame["prompt_id"].to_numpy(dtype=np.int64)
    arrays["prompt"][:] = np.array(frame["caption"].astype(str).tolist(), dtype=object)
    group.attrs.update(attrs)
    log.info(
        "%s %s: %d trajectories of %s, N=%d, M=%d, w=%s",
        action,
        path,
        J,
        attrs["teacher"]["path"],
        attrs["num_steps"],
        attrs["steps_per_slot"],
        attrs["guidance"],
    )
    return {"action": action, "store": str(path), "key": key, "done": 0, "differs": differs, "attrs": attrs}


# --- compute -------------------------------------------------------------------------------------


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Contiguous runs of sorted ``indices`` as (start, stop, offset into indices)."""
    offset = 0
    while offset < len(indices):
        end = offset + 1
        while end < len(indices) and indices[end] == indices[end - 1] + 1:
            end += 1
        yield indices[offset], indices[end - 1] + 1, offset
        offset = end


@torch.no_grad()
def run_batch(teacher, prompts: Sequence[str], seeds: Sequence[int], attrs: Mapping, alphas_cumprod=None):
    """Teacher trajectories of one batch: conditioning, then guided DDIM on the fine grid keeping the coarse and
    Δ-states (method.md §1). Returns numpy float32 arrays by store name."""
    from rapm.conditioning import encode_prompts
    from rapm.teacher import unet_eps

    fine, coarse, delta = _grids(attrs["num_steps"], attrs["steps_per_slot"], teacher.num_train_timesteps)
    cond = encode_prompts(teacher, list(prompts), resolution=attrs["resolution"])
    z = torch.cat([initial_noise(s, attrs["latent_shape"]) for s in seeds]).to(teacher.device)
    abar = teacher.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    w = attrs["guidance"]
    _, kept = ddim_sample(lambda x, t: unet_eps(teacher, x, t, cond, w), z, fine, abar, keep=coarse + delta)
    out = {
        "coarse": torch.stack([kept[t] for t in coarse], 1),
        "delta": torch.stack([kept[t] for t in delta], 1),
        **cond.tensors(),
    }
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def compute_shard(
    directory: str | Path,
    teacher_cfg: Mapping,
    traj_cfg: Mapping,
    shard: int,
    *,
    teacher=None,
    max_trajectories: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the missing trajectories of one shard; returns its summary (``remaining`` > 0 when stopped early).

    Writes only whole batches inside its own range: a batch's rows, then its done flags. Killed at any
    point, the next run recomputes exactly the batches whose flags are unset. ``max_trajectories``
    stops after that many trajectories (checked between batches).
    """
    from rapm.teacher import load_teacher

    zarr = import_zarr()
    t_start = time.perf_counter()
    path = store_path(directory)
    if not (path / "zarr.json").is_file():
        raise TrajectoryStoreError(f"{path}: no trajectory store; run `rapm trajectories init` first")
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group.attrs)
    teacher = teacher if teacher is not None else load_teacher(teacher_cfg)
    check_attrs(attrs, expected_attrs(teacher_cfg, traj_cfg, teacher), f"trajectory store {path}")

    J, S, B = attrs["num_trajectories"], int(traj_cfg["shards"]), int(traj_cfg["batch_size"])
    start, stop = shard_range(J, S, shard, math.lcm(B, attrs["trajectories_per_chunk"]))
    done = np.asarray(group["done"][start:stop]).astype(bool)
    chunk = attrs["trajectories_per_chunk"]
    for k, lines in chunk_problems(path, attrs, start, stop).items():  # repair: recompute what lost its chunks
        rows = slice(k * chunk - start, (k + 1) * chunk - start)
        if done[rows].any():
            log.warning("recomputing trajectories %d..%d: %s", k * chunk, min((k + 1) * chunk, stop) - 1, lines[0])
            done[rows] = False
    prompts, seeds = group["prompt"][start:stop], np.asarray(group["seed"][start:stop])
    arrays = {name: group[name] for name in ("coarse", "delta", *COND_ARRAYS) if name in group}
    abar = teacher.alphas_cumprod.to(teacher.device)  # on the device: no host copy per DDIM step
    todo = int((~done).sum())
    log.info(
        "shard %d/%d: trajectories [%d, %d), %d done, %d to compute, batch size %d, device %s",
        shard,
        S,
        start,
        stop,
        int(done.sum()),
        todo,
        B,
        teacher.device,
    )
    computed: list[int] = []
    t_compute = time.perf_counter()
    bar = Progress(todo, f"trajectories shard {shard}/{S}", unit="traj", every_s=None if progress else float("inf"))
    for b0 in range(start, stop, B):  # global batches [kB, (k+1)B): the same whatever the shard count
        if max_trajectories is not None and len(computed) >= max_trajectories:
            break
        batch = list(range(b0, min(b0 + B, stop)))
        idx = [j for j in batch if not done[j - start]]
        if not idx:
            continue
        # The whole batch runs even when some of it is done (a repaired chunk): its composition fixes the bits.
        out = run_batch(
            teacher, [str(prompts[j - start]) for j in batch], [int(seeds[j - start]) for j in batch], attrs, abar
        )
        for a, b, _ in _runs(idx):
            for name, arr in arrays.items():
                arr[a:b] = out[name][a - b0 : b - b0]
        for a, b, _ in _runs(idx):  # flags last: a batch counts only once all its rows are on disk
            group["done"][a:b] = 1
        computed += idx
        bar.update(len(idx))
    remaining = int(stop - start - done.sum() - len(computed))
    now = time.perf_counter()
    wall, compute_s = now - t_start, now - t_compute
    summary = {
        "format": FORMAT,
        "key": attrs.get("key"),
        "store": str(path),
        "shard": shard,
        "num_shards": S,
        "range": [start, stop],
        "trajectories": stop - start,
        "already_done": int(done.sum()),
        "computed": len(computed),
        "computed_runs": [[a, b] for a, b, _ in _runs(computed)],
        "remaining": remaining,
        "batch_size": B,
        "device": str(teacher.device),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 3),
        "compute_s": round(compute_s, 3),
        "trajectories_per_s": round(len(computed) / compute_s, 4) if computed else None,
        **resource_fields(teacher.device),
        "teacher_weights_sha256": attrs["teacher"]["weights_sha256"],
        "versions": library_versions(LIBRARIES),
    }
    log.info(
        "shard %d/%d: computed %d trajectories in %.1f s (%.1f s with loading; %d remaining), peak RSS %.0f MB",
        shard,
        S,
        len(computed),
        compute_s,
        wall,
        remaining,
        summary["peak_rss_mb"],
    )
    return summary


# --- verification and gather ---------------------------------------------------------------------


def gather(directory: str | Path, shard_summaries: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Verify the whole store (every chunk read), mark it complete, consolidate its metadata, write ``out``."""
    zarr = import_zarr()
    path = store_path(directory)
    summaries = [json.loads(Path(p).read_text(encoding="utf-8")) for p in shard_summaries]
    for p in path.rglob("*.partial"):  # temporary files of a killed writer; the chunks themselves are atomic
        p.unlink()
    report = verify_store(directory, full=True)
    group = zarr.open_group(path, mode="r+")
    group.attrs.update({"complete": True, "content_sha256": report["sha256"]})
    zarr.consolidate_metadata(path)
    attrs = report["attrs"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": attrs.get("key"),
        "store": STORE_NAME,
        "num_trajectories": attrs["num_trajectories"],
        "teacher": attrs["teacher"],
        "num_steps": attrs["num_steps"],
        "steps_per_slot": attrs["steps_per_slot"],
        "guidance": attrs["guidance"],
        "seed": attrs["seed"],
        "prompts": attrs["prompts"],
        "arrays": {
            n: {
                "shape": list(group[n].shape),
                "dtype": "str" if n == "prompt" else str(group[n].dtype),
                "sha256": report["sha256"][n],
            }
            for n in report["sha256"]
        },
        "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "shards": [
            {
                k: s.get(k)
                for k in (
                    "shard",
                    "num_shards",
                    "range",
                    "computed",
                    "already_done",
                    "batch_size",
                    "device",
                    "wall_s",
                    "compute_s",
                    "peak_rss_mb",
                )
            }
            for s in summaries
        ],
        "versions": attrs["versions"],
    }
    manifest = write_summary(out, "trajectories-gather", manifest)
    log.info(
        "gathered %s: %d trajectories verified, %.1f MB",
        path,
        attrs["num_trajectories"],
        manifest["bytes_on_disk"] / 1e6,
    )
    return manifest


# --- reader --------------------------------------------------------------------------------------


# --- command line (registered in rapm.cli) --------------------------------------------------


def init_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm trajectories init`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument(
        "--dir", required=True, help="trajectory directory results/trajectories/<key> (store.zarr goes inside)"
    )
    p.add_argument("--prompts", required=True, help="train.csv of the data stage")
    p.add_argument(
        "--manifest", required=True, help="manifest.json of the data stage (train.csv is checked against it)"
    )
    p.add_argument("--out", required=True, help="init.json: what was done (created, kept or reset)")
    add_threads_arg(p)


def init_command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories")
    set_threads(args.threads)
    from pathlib import Path

    from rapm.io import write_json

    info = init_store(
        args.dir, cfg["teacher"], cfg["trajectories"], args.prompts, args.manifest, key=Path(args.dir).name
    )
    write_json(args.out, info)
    return 0


def compute_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm trajectories compute`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--dir", required=True, help="trajectory directory made by `init`")
    p.add_argument("--shard", type=int, required=True, help="shard index in [0, trajectories.shards)")
    p.add_argument("--summary", required=True, help="the shard's summary JSON, written once the shard is complete")
    p.add_argument(
        "--max-trajectories",
        type=int,
        default=None,
        help="stop after this many trajectories (exit code 75, no summary; rerun to resume)",
    )
    add_threads_arg(p)


def compute_command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories")
    set_threads(args.threads)
    from rapm.io import write_summary

    summary = compute_shard(
        args.dir, cfg["teacher"], cfg["trajectories"], args.shard, max_trajectories=args.max_trajectories
    )
    if summary["remaining"]:
        print(
            f"rapm: shard {args.shard} stopped with {summary['remaining']} trajectories left; run the same "
            "command again to resume (no summary written)",
            file=sys.stderr,
        )
        return 75
    write_summary(args.summary, "trajectories-shard", summary)
    return 0


def gather_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm trajectories gather`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--dir", required=True, help="trajectory directory")
    p.add_argument(
        "--summaries", nargs="*", default=[], help="the shards' summary JSON files (recorded in the manifest)"
    )
    p.add_argument("--out", required=True, help="manifest.json to write")


def gather_command(args: argparse.Namespace) -> int:
    stage_config(args, "teacher", "trajectories")

    gather(args.dir, args.summaries, args.out)
    return 0
