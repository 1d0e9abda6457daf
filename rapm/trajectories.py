"""Teacher trajectories (docs/method.md §1): a sharded, resumable zarr store, its gather step and reader.

For training prompt j (row j of ``results/prompts/train.csv``) the teacher runs guided DDIM on the fine
grid of N·M steps from the initial noise z̃_N drawn with its own seed; we keep the coarse states and the
Δ-states (the first fine state after each coarse boundary), and the conditioning, so training never
runs the text encoders or the teacher. Layout of ``results/trajectories/<key>/`` (``key``:
:func:`rapm.workflow.trajectory_store_key`, a hash of the settings that change the arrays)::

    store.zarr/          zarr v3 group, attributes below; metadata consolidated by gather
      seed           (J,)               int64    trajectory j's noise seed = trajectories.seed + j
      prompt_id      (J,)               int64    prompt_id column of train.csv
      prompt         (J,)               str      the caption
      coarse         (J, N+1, C, H, W)  float32  z̃ at coarse_timesteps [t_N … t_0]; coarse[j, 0] = z̃_N, the noise
      delta          (J, N, C, H, W)    float32  z̃ at delta_timesteps [t_N − Δ … t_1 − Δ]
      prompt_embeds  (J, L, D)          float32  encoder hidden states (L = the tokenizer length: 77 for SD)
      pooled_embeds  (J, P)             float32  SDXL only: pooled text embedding
      add_time_ids   (J, 6)             float32  SDXL only: micro-conditioning time ids
      done           (J,)               uint8    1 once trajectory j's rows are written (written after them)
    init.json            what ``init`` did (created / kept / reset the store)
    shards/I-of-S.json   summary of shard I (trajectories computed, wall time, peak RSS)
    manifest.json        written by ``gather`` once every chunk is present and intact

Group attributes: ``format``/``format_version``, ``key``; ``teacher`` (path as configured, location, type,
pipeline class, dtype, ``weights_sha256`` over its models' state dicts and one per model);
``scheduler`` (its config); ``num_steps`` N, ``steps_per_slot`` M, ``guidance``, ``seed``,
``resolution``, ``num_trajectories`` J, ``trajectories_per_chunk``, ``batch_size``; the
``coarse``/``delta``/``fine_timesteps``; ``latent_shape``, ``conditioning_shapes``, ``state_dtype``;
``prompts`` (train.csv and manifest SHA-256); ``versions`` (python, torch, diffusers, transformers,
zarr, numpy, rapm); ``complete`` and ``content_sha256`` (per array) once gathered.

Every array is chunked along the trajectory axis only (``trajectories_per_chunk`` rows per chunk) and
stored uncompressed (latents do not compress) behind a CRC32C checksum per chunk, so a truncated or
corrupted chunk fails loudly instead of reading as garbage; a missing chunk is caught by listing.

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

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rapm.config import lookup
from rapm.errors import RapmError
from rapm.io import LIBRARIES, library_versions, peak_rss_mb, sha256_file, write_json
from rapm.progress import Progress
from rapm.schedule import coarse_timesteps, ddim_sample, delta_timesteps, fine_timesteps
from rapm.shards import item_seed, shard_range

log = logging.getLogger(__name__)

FORMAT = "rapm-trajectories"
FORMAT_VERSION = 1
STORE_NAME = "store.zarr"
COND_ARRAYS = ("prompt_embeds", "pooled_embeds", "add_time_ids")
#: Attributes that define the arrays' content: a store whose values differ holds other trajectories.
FINGERPRINT = (
    "format_version", "teacher.path", "teacher.type", "teacher.dtype", "teacher.weights_sha256", "scheduler",
    "num_steps", "steps_per_slot", "guidance", "seed", "resolution", "num_trajectories", "latent_shape",
    "conditioning_shapes", "trajectories_per_chunk", "prompts.train_csv_sha256",
)
_MISSING = object()


class TrajectoryStoreError(RapmError):
    """A trajectory store is missing, incomplete, damaged, or does not match the requested teacher/grid."""


# --- small helpers -------------------------------------------------------------------------------

def store_path(directory: str | Path) -> Path:
    """The zarr group inside a trajectory directory ``results/trajectories/<key>``."""
    return Path(directory) / STORE_NAME


def _zarr():
    import zarr

    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
    return zarr


def _attr(attrs: Mapping, dotted: str) -> Any:
    found, value = lookup(attrs, dotted)
    return value if found else _MISSING


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def weights_sha256(teacher) -> dict[str, str]:
    """SHA-256 of each pipeline model's state dict (names, dtypes, shapes, bytes) and of them all (``all``)."""
    digests = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(teacher.pipe, name, None)
        if module is None:
            continue
        h = hashlib.sha256()
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().contiguous().cpu().reshape(-1)
            h.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy())
        digests[name] = h.hexdigest()
    digests["all"] = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return digests


def initial_noise(seed_j: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """z̃_N of one trajectory, (1, C, H, W) float32 on the CPU: what diffusers' pipelines draw for batch 1
    with ``generator=torch.Generator().manual_seed(seed_j)`` (``randn_tensor`` on a CPU generator)."""
    return torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed_j), dtype=torch.float32)


def _grids(num_steps: int, steps_per_slot: int, num_train_timesteps: int) -> tuple[list[int], list[int], list[int]]:
    return (fine_timesteps(num_steps, steps_per_slot, num_train_timesteps),
            coarse_timesteps(num_steps, num_train_timesteps), delta_timesteps(num_steps, steps_per_slot, num_train_timesteps))


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
        raise TrajectoryStoreError(f"{train_csv}: SHA-256 {found} differs from {manifest} ({expected}); rerun the data stage")
    frame = pd.read_csv(train_csv, dtype={"caption": str}, keep_default_na=False)
    missing = {"prompt_id", "caption"} - set(frame.columns)
    if missing:
        raise TrajectoryStoreError(f"{train_csv}: missing column(s) {sorted(missing)}")
    if num_trajectories is not None:
        if num_trajectories > len(frame):
            raise TrajectoryStoreError(f"trajectories.num_trajectories = {num_trajectories}, but {train_csv} has only "
                                       f"{len(frame)} prompts (prompts.num_train)")
        frame = frame.iloc[:num_trajectories]
    hashes = {"train_csv_sha256": found, "manifest_sha256": sha256_file(manifest), "rows": len(frame)}
    return frame.reset_index(drop=True), hashes


# --- attributes ----------------------------------------------------------------------------------

def store_grid(traj_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``trajectories`` section of the STORE a config trains on: ``store_steps`` (null: ``num_steps``)
    coarse slots of ``num_steps · steps_per_slot / store_steps`` fine steps each, the same fine grid.

    A student with fewer steps trains on a coarser sub-grid of a store's grid: for N = 1 (M = 40) and
    N = 2 (M = 20), the 40-step trailing grid, its coarse states and its Δ-states (Δ = one fine step)
    are those of the N = 4, M = 10 store at every (4/N)-th slot, computed by the same teacher steps from
    the same noise, so ``store_steps: 4`` reads them from that store instead of recomputing them.
    """
    out = {k: v for k, v in traj_cfg.items() if k != "store_steps"}
    n, m = int(traj_cfg["num_steps"]), int(traj_cfg["steps_per_slot"])
    ns = traj_cfg.get("store_steps") or n
    if ns % n or (n * m) % ns:
        raise ValueError(f"trajectories.store_steps {ns} must be a multiple of num_steps {n} and divide "
                         f"num_steps x steps_per_slot = {n * m}")
    out["num_steps"], out["steps_per_slot"] = int(ns), n * m // int(ns)
    return out


def subgrid_indices(store_steps: int, num_steps: int) -> tuple[list[int], list[int]]:
    """Indices into a store's coarse (N_s + 1) and delta (N_s) axes of the sub-grid of ``num_steps`` slots."""
    if store_steps % num_steps:
        raise ValueError(f"a {num_steps}-step grid is not a sub-grid of the store's {store_steps} slots")
    stride = store_steps // num_steps
    return list(range(0, store_steps + 1, stride)), list(range(0, store_steps, stride))


def expected_attrs(teacher_cfg: Mapping[str, Any], traj_cfg: Mapping[str, Any], teacher=None) -> dict[str, Any]:
    """Attribute values (dotted names) a store must have for this ``teacher``/``trajectories`` config
    (the store's grid: :func:`store_grid`).

    With a loaded ``teacher``, its weights' hash is required too (a retrained teacher at the same path).
    """
    traj_cfg = store_grid(traj_cfg)
    expect: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "teacher.path": str(teacher_cfg["path"]),
        "teacher.dtype": teacher_cfg.get("dtype", "float32"),
        "num_steps": traj_cfg["num_steps"], "steps_per_slot": traj_cfg["steps_per_slot"],
        "guidance": float(traj_cfg["guidance"]), "seed": traj_cfg["seed"], "resolution": traj_cfg.get("resolution"),
        "trajectories_per_chunk": traj_cfg.get("trajectories_per_chunk", 1),
    }
    if teacher_cfg.get("type", "auto") != "auto":
        expect["teacher.type"] = teacher_cfg["type"]
    if traj_cfg.get("num_trajectories") is not None:
        expect["num_trajectories"] = traj_cfg["num_trajectories"]
    if teacher is not None:
        expect["teacher.weights_sha256"] = weights_sha256(teacher)["all"]
    return expect


def prompt_attrs(cfg: Mapping[str, Any], train_csv: str | Path | None = None) -> dict[str, Any]:
    """Attribute values a store must have for the prompt set of ``cfg`` (and the data stage's ``train_csv``).

    ``trajectories.num_trajectories: null`` means every training prompt: the store must then hold as
    many trajectories as ``train_csv`` has rows, or (without it) as ``prompts.num_train`` asks, when
    the config has a ``prompts`` section. With ``train_csv``, the store must have been computed from
    exactly that file (``prompts.train_csv_sha256``).
    """
    expect: dict[str, Any] = {}
    rows = None
    if train_csv is not None:
        import pandas as pd

        from rapm.io import sha256_file

        train_csv = Path(train_csv)
        if not train_csv.is_file():
            raise TrajectoryStoreError(f"{train_csv}: not found (the data stage, rule make_prompt_sets, writes it)")
        expect["prompts.train_csv_sha256"] = sha256_file(train_csv)
        rows = len(pd.read_csv(train_csv, dtype={"caption": str}, keep_default_na=False))
    if cfg["trajectories"].get("num_trajectories") is None:
        if rows is not None:
            expect["num_trajectories"] = rows
        elif isinstance(cfg.get("prompts"), Mapping) and cfg["prompts"].get("num_train") is not None:
            expect["num_trajectories"] = int(cfg["prompts"]["num_train"])
    return expect


def check_attrs(attrs: Mapping, expect: Mapping[str, Any], where: str) -> None:
    """Raise :class:`TrajectoryStoreError` naming every attribute whose stored value differs from ``expect``."""
    diffs = []
    for name, want in expect.items():
        have = _attr(attrs, name)
        if have is _MISSING:
            diffs.append(f"attribute {name!r} is absent (requested {want!r})")
        elif _jsonable(have) != _jsonable(want):
            diffs.append(f"attribute {name!r} differs (store: {have!r}, requested: {want!r})")
    if diffs:
        raise TrajectoryStoreError(f"{where} does not match the requested teacher/grid/prompt set: " + "; ".join(diffs))


def build_attrs(teacher, traj_cfg: Mapping[str, Any], prompt_hashes: Mapping, cond_shapes: Mapping, key: str | None) -> dict:
    meta = teacher.metadata()
    N, M = int(traj_cfg["num_steps"]), int(traj_cfg["steps_per_slot"])
    fine, coarse, delta = _grids(N, M, teacher.num_train_timesteps)
    digests = weights_sha256(teacher)
    return _jsonable({
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
        "teacher": {**{k: meta[k] for k in ("path", "location", "type", "pipeline_class", "dtype")},
                    "weights_sha256": digests["all"], "component_sha256": digests},
        "scheduler": meta["scheduler"],
        "num_steps": N, "steps_per_slot": M, "guidance": float(traj_cfg["guidance"]), "seed": int(traj_cfg["seed"]),
        "resolution": traj_cfg.get("resolution"), "image_size": traj_cfg.get("resolution") or teacher.resolution,
        "num_trajectories": int(prompt_hashes["rows"]), "trajectories_per_chunk": int(traj_cfg["trajectories_per_chunk"]),
        "batch_size": int(traj_cfg["batch_size"]),
        "coarse_timesteps": coarse, "delta_timesteps": delta, "fine_timesteps": fine,
        "latent_shape": list(teacher.latent_shape(traj_cfg.get("resolution"))),
        "conditioning_shapes": {k: list(v) for k, v in cond_shapes.items()},
        "state_dtype": "float32", "prompts": dict(prompt_hashes),
        "versions": library_versions(LIBRARIES), "complete": False,
    })


# --- init ----------------------------------------------------------------------------------------

def _array_specs(attrs: Mapping) -> dict[str, tuple[tuple[int, ...], Any]]:
    J, N = attrs["num_trajectories"], attrs["num_steps"]
    C, H, W = attrs["latent_shape"]
    specs: dict[str, tuple[tuple[int, ...], Any]] = {
        "seed": ((J,), "int64"), "prompt_id": ((J,), "int64"), "prompt": ((J,), str),
        "coarse": ((J, N + 1, C, H, W), "float32"), "delta": ((J, N, C, H, W), "float32"),
    }
    for name, shape in attrs["conditioning_shapes"].items():
        specs[name] = ((J, *shape), "float32")
    specs["done"] = ((J,), "uint8")
    return specs


def init_store(directory: str | Path, teacher_cfg: Mapping, traj_cfg: Mapping, train_csv: str | Path,
               manifest: str | Path, *, key: str | None = None, teacher=None) -> dict[str, Any]:
    """Create the pre-allocated store (full shapes; seeds and prompts written), or keep a matching one.

    A store whose content-defining attributes (:data:`FINGERPRINT`) equal the new ones is kept with its
    finished trajectories (this is what makes the shards resumable across reruns); one that differs
    (another prompt set, retrained teacher weights, ...) is deleted and re-created. Returns what was done.
    """
    from rapm.teacher import encode_prompts, load_teacher

    zarr = _zarr()
    from zarr.codecs import Crc32cCodec

    path = store_path(directory)
    frame, hashes = read_prompts(train_csv, manifest, traj_cfg.get("num_trajectories"))
    teacher = teacher if teacher is not None else load_teacher(teacher_cfg)
    resolution = traj_cfg.get("resolution")
    if resolution is not None and resolution % teacher.pipe.vae_scale_factor:
        raise TrajectoryStoreError(f"trajectories.resolution {resolution} is not a multiple of the VAE factor "
                                   f"{teacher.pipe.vae_scale_factor}")
    probe = encode_prompts(teacher, [str(frame["caption"].iloc[0])], resolution=resolution)
    attrs = build_attrs(teacher, traj_cfg, hashes, {k: tuple(v.shape[1:]) for k, v in probe.tensors().items()}, key)

    action, differs = "created", []
    if path.exists():
        try:
            old = dict(zarr.open_group(path, mode="r").attrs)
        except Exception:  # noqa: BLE001 - an unreadable store is re-created
            old = {}
        differs = [k for k in FINGERPRINT if _jsonable(_attr(old, k)) != _jsonable(_attr(attrs, k))]
        if not differs:
            done = int(np.asarray(zarr.open_group(path, mode="r")["done"][:]).sum())
            if old.get("batch_size") != attrs["batch_size"] and done:
                log.warning("store %s holds %d trajectories computed with batch_size %s; the rest use %s (differences "
                            "at float rounding level, see the module docstring)", path, done, old.get("batch_size"),
                            attrs["batch_size"])
            log.info("keeping %s: it matches the request and holds %d of %d trajectories", path, done, attrs["num_trajectories"])
            return {"action": "kept", "store": str(path), "key": key, "done": done, "attrs": old}
        log.warning("re-creating %s: attribute(s) %s differ from the request", path, ", ".join(differs))
        shutil.rmtree(path)
        action = "reset"

    group = zarr.open_group(path, mode="w")
    chunk = attrs["trajectories_per_chunk"]
    arrays = {}
    for name, (shape, dtype) in _array_specs(attrs).items():  # unwritten rows read as NaN / -1 / not done
        fill = {"float32": np.nan, "int64": -1, "uint8": 0}.get(dtype)
        arrays[name] = group.create_array(name, shape=shape, chunks=(chunk, *shape[1:]), dtype=dtype, fill_value=fill,
                                          compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
    J = attrs["num_trajectories"]
    arrays["seed"][:] = np.array([item_seed(attrs["seed"], j) for j in range(J)], dtype=np.int64)
    arrays["prompt_id"][:] = frame["prompt_id"].to_numpy(dtype=np.int64)
    arrays["prompt"][:] = np.array(frame["caption"].astype(str).tolist(), dtype=object)
    group.attrs.update(attrs)
    log.info("%s %s: %d trajectories of %s, N=%d, M=%d, w=%s", action, path, J, attrs["teacher"]["path"],
             attrs["num_steps"], attrs["steps_per_slot"], attrs["guidance"])
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
    from rapm.teacher import encode_prompts, unet_eps

    fine, coarse, delta = _grids(attrs["num_steps"], attrs["steps_per_slot"], teacher.num_train_timesteps)
    cond = encode_prompts(teacher, list(prompts), resolution=attrs["resolution"])
    z = torch.cat([initial_noise(s, attrs["latent_shape"]) for s in seeds]).to(teacher.device)
    abar = teacher.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    w = attrs["guidance"]
    _, kept = ddim_sample(lambda x, t: unet_eps(teacher, x, t, cond, w), z, fine, abar, keep=coarse + delta)
    out = {"coarse": torch.stack([kept[t] for t in coarse], 1), "delta": torch.stack([kept[t] for t in delta], 1),
           **cond.tensors()}
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def compute_shard(directory: str | Path, teacher_cfg: Mapping, traj_cfg: Mapping, shard: int, *, teacher=None,
                  max_trajectories: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Compute the missing trajectories of one shard; returns its summary (``remaining`` > 0 when stopped early).

    Writes only whole batches inside its own range: a batch's rows, then its done flags. Killed at any
    point, the next run recomputes exactly the batches whose flags are unset. ``max_trajectories``
    stops after that many trajectories (checked between batches).
    """
    from rapm.teacher import load_teacher

    zarr = _zarr()
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
    for k, lines in _chunk_problems(path, attrs, start, stop).items():  # repair: recompute what lost its chunks
        rows = slice(k * chunk - start, (k + 1) * chunk - start)
        if done[rows].any():
            log.warning("recomputing trajectories %d..%d: %s", k * chunk, min((k + 1) * chunk, stop) - 1, lines[0])
            done[rows] = False
    prompts, seeds = group["prompt"][start:stop], np.asarray(group["seed"][start:stop])
    arrays = {name: group[name] for name in ("coarse", "delta", *COND_ARRAYS) if name in group}
    abar = teacher.alphas_cumprod.to(teacher.device)  # on the device: no host copy per DDIM step
    todo = int((~done).sum())
    log.info("shard %d/%d: trajectories [%d, %d), %d done, %d to compute, batch size %d, device %s",
             shard, S, start, stop, int(done.sum()), todo, B, teacher.device)
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
        out = run_batch(teacher, [str(prompts[j - start]) for j in batch], [int(seeds[j - start]) for j in batch],
                        attrs, abar)
        for a, b, _ in _runs(idx):
            for name, arr in arrays.items():
                arr[a:b] = out[name][a - b0:b - b0]
        for a, b, _ in _runs(idx):  # flags last: a batch counts only once all its rows are on disk
            group["done"][a:b] = 1
        computed += idx
        bar.update(len(idx))
    remaining = int(stop - start - done.sum() - len(computed))
    now = time.perf_counter()
    wall, compute_s = now - t_start, now - t_compute
    summary = {
        "format": FORMAT, "key": attrs.get("key"), "store": str(path), "shard": shard, "num_shards": S,
        "range": [start, stop], "trajectories": stop - start, "already_done": int(done.sum()),
        "computed": len(computed), "computed_runs": [[a, b] for a, b, _ in _runs(computed)], "remaining": remaining,
        "batch_size": B, "device": str(teacher.device), "threads": torch.get_num_threads(),
        "wall_s": round(wall, 3), "compute_s": round(compute_s, 3),
        "trajectories_per_s": round(len(computed) / compute_s, 4) if computed else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if teacher.device.type == "cuda" else None,
        "teacher_weights_sha256": attrs["teacher"]["weights_sha256"], "versions": library_versions(LIBRARIES),
    }
    log.info("shard %d/%d: computed %d trajectories in %.1f s (%.1f s with loading; %d remaining), peak RSS %.0f MB",
             shard, S, len(computed), compute_s, wall, remaining, summary["peak_rss_mb"])
    return summary


# --- verification and gather ---------------------------------------------------------------------

def _chunk_problems(path: Path, attrs: Mapping, lo: int = 0, hi: int | None = None) -> dict[int, list[str]]:
    """Chunk files of trajectories [lo, hi) that are missing or have the wrong size, by chunk index.

    Cheap (a stat per file): every chunk is uncompressed plus a 4-byte CRC32C, so its size is known;
    the variable-length prompt chunks are only checked to exist.
    """
    chunk, problems = attrs["trajectories_per_chunk"], {}
    hi = attrs["num_trajectories"] if hi is None else hi
    for name, (shape, dtype) in _array_specs(attrs).items():
        size = None if dtype is str else math.prod((chunk, *shape[1:])) * np.dtype(dtype).itemsize + 4
        rest = "".join("/0" for _ in shape[1:])
        for k in range(lo // chunk, math.ceil(hi / chunk)):
            file = path / name / "c" / f"{k}{rest}"
            rows = f"{name}, trajectories {k * chunk}..{min((k + 1) * chunk, shape[0]) - 1}"
            if not file.is_file():
                problems.setdefault(k, []).append(f"chunk {file.relative_to(path)} ({rows}) is missing")
            elif size is not None and file.stat().st_size != size:
                problems.setdefault(k, []).append(f"chunk {file.relative_to(path)} ({rows}) is truncated or damaged: "
                                                  f"{file.stat().st_size} bytes, expected {size}")
    return problems


def verify_store(directory: str | Path, *, full: bool = True) -> dict[str, Any]:
    """Check a store is complete and intact; raise :class:`TrajectoryStoreError` listing what is wrong.

    Always: format, shapes, every done flag set, every chunk file present with its exact size
    (uncompressed + 4 checksum bytes). ``full``: also read every chunk (zarr checks its CRC32C), require
    finite values (unwritten rows read as NaN), and return a SHA-256 of each array's contents.
    """
    zarr = _zarr()
    path = store_path(directory)
    if not (path / "zarr.json").is_file():
        raise TrajectoryStoreError(f"{path}: no trajectory store here")
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise TrajectoryStoreError(f"{path}: not a {FORMAT} store (format {attrs.get('format')!r})")
    specs, chunk = _array_specs(attrs), attrs["trajectories_per_chunk"]
    wrong = [n for n, (shape, _) in specs.items() if n not in group or tuple(group[n].shape) != tuple(shape)]
    if wrong:
        raise TrajectoryStoreError(f"{path}: array(s) {wrong} missing or of the wrong shape; re-create the store")
    try:
        done = np.asarray(group["done"][:])
    except Exception as err:  # noqa: BLE001 - zarr raises ValueError on a checksum mismatch
        raise TrajectoryStoreError(f"{path}: the done flags are damaged ({err}); re-create the store") from err
    problems: list[str] = []
    missing = np.flatnonzero(done != 1)
    if len(missing):
        problems.append(f"{len(missing)} of {len(done)} trajectories are not computed (first: "
                        f"{missing[:10].tolist()}); run their shards (they resume)")
    for k, lines in sorted(_chunk_problems(path, attrs).items()):
        if done[k * chunk:(k + 1) * chunk].any():  # chunks of uncomputed trajectories are not written yet
            problems += [line + "; rerun its shard, which recomputes it" for line in lines]
    digests: dict[str, str] = {}
    if full and not problems:
        for name in specs:
            h, arr = hashlib.sha256(), group[name]
            for k in range(math.ceil(arr.shape[0] / chunk)):
                try:
                    block = arr[k * chunk:(k + 1) * chunk]
                except Exception as err:  # noqa: BLE001
                    problems.append(f"chunk {k} of {name!r} (trajectories from {k * chunk}) is damaged: {err}")
                    continue
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    problems.append(f"chunk {k} of {name!r} (trajectories from {k * chunk}) holds non-finite values")
                h.update("\0".join(block.tolist()).encode() if name == "prompt" else np.ascontiguousarray(block).tobytes())
            digests[name] = h.hexdigest()
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise TrajectoryStoreError(f"trajectory store {path} is incomplete or damaged:\n{shown}{more}")
    return {"attrs": attrs, "sha256": digests}


def gather(directory: str | Path, shard_summaries: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Verify the whole store (every chunk read), mark it complete, consolidate its metadata, write ``out``."""
    zarr = _zarr()
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
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": attrs.get("key"), "store": STORE_NAME,
        "num_trajectories": attrs["num_trajectories"], "teacher": attrs["teacher"], "num_steps": attrs["num_steps"],
        "steps_per_slot": attrs["steps_per_slot"], "guidance": attrs["guidance"], "seed": attrs["seed"],
        "prompts": attrs["prompts"], "arrays": {n: {"shape": list(group[n].shape), "dtype": "str" if n == "prompt" else str(group[n].dtype),
                                                    "sha256": report["sha256"][n]} for n in report["sha256"]},
        "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "shards": [{k: s.get(k) for k in ("shard", "num_shards", "range", "computed", "already_done", "batch_size",
                                          "device", "wall_s", "compute_s", "peak_rss_mb")} for s in summaries],
        "versions": attrs["versions"],
    }
    write_json(out, manifest)
    log.info("gathered %s: %d trajectories verified, %.1f MB", path, attrs["num_trajectories"],
             manifest["bytes_on_disk"] / 1e6)
    return manifest


# --- reader --------------------------------------------------------------------------------------

class TrajectoryDataset(Dataset):
    """Random access to a gathered trajectory store, for training (one item = one trajectory).

    Refuses a store that is not gathered, is damaged (chunk files checked on open, checksums on every
    read), or whose attributes differ from ``expect`` (dotted names, see :func:`expected_attrs`; the error
    names each attribute that differs). Items are dicts of CPU tensors: ``coarse`` (N+1, C, H, W) at
    :attr:`coarse_timesteps` (``coarse[0]`` is the noise z̃_N), ``delta`` (N, C, H, W) at
    :attr:`delta_timesteps`, ``prompt_embeds`` (and for SDXL ``pooled_embeds``, ``add_time_ids``), plus
    ``index``, ``seed``, ``prompt_id`` and ``prompt``.
    """

    def __init__(self, directory: str | Path, expect: Mapping[str, Any] | None = None, *, verify: bool = True,
                 num_steps: int | None = None):
        zarr = _zarr()
        self.path = store_path(directory)
        if not (self.path / "zarr.json").is_file():
            raise TrajectoryStoreError(f"{self.path}: no trajectory store here")
        group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(group.attrs)
        if not self.attrs.get("complete"):
            raise TrajectoryStoreError(f"{self.path}: the store was not gathered (rule gather_trajectories / "
                                       "`rapm trajectories gather`); it may be incomplete")
        check_attrs(self.attrs, expect or {}, f"trajectory store {self.path}")
        if verify:
            verify_store(directory, full=False)
        names = ["coarse", "delta", *COND_ARRAYS, "seed", "prompt_id", "prompt"]
        self._arrays = {n: group[n] for n in names if n in group}
        # a coarser student reads every (N_s / N)-th slot of the store (store_grid)
        self.num_steps = int(num_steps or self.attrs["num_steps"])
        self._coarse_idx, self._delta_idx = subgrid_indices(int(self.attrs["num_steps"]), self.num_steps)

    @classmethod
    def from_config(cls, directory: str | Path, cfg: Mapping[str, Any], teacher=None, *,
                    prompts: str | Path | None = None, **kwargs) -> TrajectoryDataset:
        """Open the store for the ``teacher`` and ``trajectories`` sections of a config (and a loaded
        teacher): the teacher, its weights and the grid must match (:func:`expected_attrs`), and so must
        the prompt set (:func:`prompt_attrs`: the number of trajectories ``trajectories.num_trajectories``
        or, when null, ``prompts.num_train`` / the rows of ``prompts`` asks; the hash of ``prompts``, the
        data stage's train.csv, when given). The error names the store, each attribute and both values."""
        expect = {**expected_attrs(cfg["teacher"], cfg["trajectories"], teacher), **prompt_attrs(cfg, prompts)}
        return cls(directory, expect, num_steps=int(cfg["trajectories"]["num_steps"]), **kwargs)

    @property
    def coarse_timesteps(self) -> list[int]:
        return [self.attrs["coarse_timesteps"][i] for i in self._coarse_idx]

    @property
    def delta_timesteps(self) -> list[int]:
        return [self.attrs["delta_timesteps"][i] for i in self._delta_idx]

    def __len__(self) -> int:
        return int(self.attrs["num_trajectories"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = int(index)
        if not -len(self) <= j < len(self):
            raise IndexError(f"trajectory {index} outside [0, {len(self)})")
        j %= len(self)
        item: dict[str, Any] = {"index": j}
        for name, arr in self._arrays.items():
            try:
                value = arr[j]
            except Exception as err:  # noqa: BLE001 - zarr raises ValueError on a checksum mismatch
                raise TrajectoryStoreError(f"trajectory store {self.path}: array {name!r}, trajectory {j}: chunk "
                                           f"unreadable ({err}); the store is damaged, recompute it") from err
            if name in ("coarse", "delta") and self.num_steps != int(self.attrs["num_steps"]):
                value = np.asarray(value)[self._coarse_idx if name == "coarse" else self._delta_idx]
            item[name] = str(value) if name == "prompt" else (int(value) if np.ndim(value) == 0 else torch.from_numpy(np.array(value)))
        return item
