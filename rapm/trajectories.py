"""Teacher trajectories (docs/method.md §1): a sharded, resumable zarr store, its shards and its gather step.

For training prompt j (row j of ``results/prompts/train.csv``) the teacher runs guided DDIM on the fine
grid of N·M steps from the initial noise z̃_N drawn with its own seed; we keep the coarse states and the
Δ-states (the first fine state after each coarse boundary), and the conditioning, so training never
runs the text encoders or the teacher.

The store's layout, attributes and reader are in :mod:`rapm.store`; this module computes it: ``init``
pre-allocates it, ``compute`` fills one shard, ``gather`` verifies it and marks it complete. What they
record (the checked prompts, the attributes, a shard's summary, the manifest) is built in
:mod:`rapm.trajrecords`; the arrays are allocated and written by :mod:`rapm.storewrite`.

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
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rapm.cliargs import add_config_args, add_threads_arg, set_threads, stage_config, stopped
from rapm.io import write_json, write_summary
from rapm.progress import Progress
from rapm.schedule import ddim_sample, trajectory_grids
from rapm.shards import shard_range
from rapm.store import (
    COND_ARRAYS,
    FINGERPRINT,
    TrajectoryStoreError,
    attr,
    check_attrs,
    chunk_problems,
    expected_attrs,
    import_zarr,
    jsonable,
    store_path,
    verify_store,
)
from rapm.storewrite import allocate, write_rows
from rapm.trajrecords import build_attrs, gather_manifest, read_prompts, shard_summary

log = logging.getLogger(__name__)


# --- small helpers -------------------------------------------------------------------------------


def initial_noise(seed_j: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """z̃_N of one trajectory, (1, C, H, W) float32 on the CPU: what diffusers' pipelines draw for batch 1
    with ``generator=torch.Generator().manual_seed(seed_j)`` (``randn_tensor`` on a CPU generator)."""
    return torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed_j), dtype=torch.float32)


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
        kept, differs = _keep_or_remove(zarr, path, attrs, key)
        if kept is not None:
            return kept
        action = "reset"
    allocate(zarr, path, attrs, frame)
    log.info(
        "%s %s: %d trajectories of %s, N=%d, M=%d, w=%s",
        action,
        path,
        attrs["num_trajectories"],
        attrs["teacher"]["path"],
        attrs["num_steps"],
        attrs["steps_per_slot"],
        attrs["guidance"],
    )
    return {"action": action, "store": str(path), "key": key, "done": 0, "differs": differs, "attrs": attrs}


def _keep_or_remove(zarr, path: Path, attrs: Mapping, key: str | None) -> tuple[dict | None, list[str]]:
    """The existing store at ``path``: kept (returns what :func:`init_store` returns) when its fingerprint
    matches ``attrs``, else deleted (returns None and the differing attributes)."""
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
        return {"action": "kept", "store": str(path), "key": key, "done": done, "attrs": old}, differs
    log.warning("re-creating %s: attribute(s) %s differ from the request", path, ", ".join(differs))
    shutil.rmtree(path)
    return None, differs


# --- compute -------------------------------------------------------------------------------------


@torch.no_grad()
def run_batch(teacher, prompts: Sequence[str], seeds: Sequence[int], attrs: Mapping, alphas_cumprod=None):
    """Teacher trajectories of one batch: conditioning, then guided DDIM on the fine grid keeping the coarse and
    Δ-states (method.md §1). Returns numpy float32 arrays by store name."""
    from rapm.conditioning import encode_prompts
    from rapm.teacher import unet_eps

    fine, coarse, delta = trajectory_grids(attrs["num_steps"], attrs["steps_per_slot"], teacher.num_train_timesteps)
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
    t_start = time.perf_counter()
    path, group, attrs, teacher = _open_store(directory, teacher_cfg, traj_cfg, teacher)
    J, S, B = attrs["num_trajectories"], int(traj_cfg["shards"]), int(traj_cfg["batch_size"])
    start, stop = shard_range(J, S, shard, math.lcm(B, attrs["trajectories_per_chunk"]))
    done = _done_flags(group, path, attrs, start, stop)
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
    t_compute = time.perf_counter()
    bar = Progress(todo, f"trajectories shard {shard}/{S}", unit="traj", every_s=None if progress else float("inf"))
    computed = _compute_batches(teacher, group, attrs, done, (start, stop), B, max_trajectories, bar)
    now = time.perf_counter()
    wall, compute_s = now - t_start, now - t_compute
    summary = shard_summary(
        attrs, path, shard, S, (start, stop), int(done.sum()), computed, B, teacher.device, wall, compute_s
    )
    log.info(
        "shard %d/%d: computed %d trajectories in %.1f s (%.1f s with loading; %d remaining), peak RSS %.0f MB",
        shard,
        S,
        len(computed),
        compute_s,
        wall,
        summary["remaining"],
        summary["peak_rss_mb"],
    )
    return summary


def _open_store(directory: str | Path, teacher_cfg: Mapping, traj_cfg: Mapping, teacher=None):
    """(path, group, attrs, teacher) of the store in ``directory``, opened for writing after checking its
    attributes against the config and the teacher (loaded unless given)."""
    from rapm.teacher import load_teacher

    zarr = import_zarr()
    path = store_path(directory)
    if not (path / "zarr.json").is_file():
        raise TrajectoryStoreError(f"{path}: no trajectory store; run `rapm trajectories init` first")
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group.attrs)
    teacher = teacher if teacher is not None else load_teacher(teacher_cfg)
    check_attrs(attrs, expected_attrs(teacher_cfg, traj_cfg, teacher), f"trajectory store {path}")
    return path, group, attrs, teacher


def _done_flags(group, path: Path, attrs: Mapping, start: int, stop: int) -> np.ndarray:
    """The done flags of trajectories [start, stop), cleared for every chunk that lost data (to recompute it)."""
    done = np.asarray(group["done"][start:stop]).astype(bool)
    chunk = attrs["trajectories_per_chunk"]
    for k, lines in chunk_problems(path, attrs, start, stop).items():  # repair: recompute what lost its chunks
        rows = slice(k * chunk - start, (k + 1) * chunk - start)
        if done[rows].any():
            log.warning("recomputing trajectories %d..%d: %s", k * chunk, min((k + 1) * chunk, stop) - 1, lines[0])
            done[rows] = False
    return done


def _compute_batches(
    teacher, group, attrs: Mapping, done: np.ndarray, span: tuple[int, int], B: int, max_trajectories, bar
) -> list[int]:
    """Run every global batch of ``span`` = [start, stop) that holds a trajectory not ``done`` and write its missing
    rows (:func:`rapm.storewrite.write_rows`); returns the trajectories written, stopping after ``max_trajectories``."""
    start, stop = span
    prompts, seeds = group["prompt"][start:stop], np.asarray(group["seed"][start:stop])
    arrays = {name: group[name] for name in ("coarse", "delta", *COND_ARRAYS) if name in group}
    abar = teacher.alphas_cumprod.to(teacher.device)  # on the device: no host copy per DDIM step
    computed: list[int] = []
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
        write_rows(group, arrays, out, idx, b0)
        computed += idx
        bar.update(len(idx))
    return computed


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
    manifest = write_summary(out, "trajectories-gather", gather_manifest(path, group, report, summaries))
    log.info(
        "gathered %s: %d trajectories verified, %.1f MB",
        path,
        report["attrs"]["num_trajectories"],
        manifest["bytes_on_disk"] / 1e6,
    )
    return manifest


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
    summary = compute_shard(
        args.dir, cfg["teacher"], cfg["trajectories"], args.shard, max_trajectories=args.max_trajectories
    )
    if summary["remaining"]:
        return stopped(f"shard {args.shard} stopped with {summary['remaining']} trajectories left", "summary")
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
