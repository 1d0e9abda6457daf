"""The trajectory store: its format, the attributes that identify it, its verification and its reader.

The precompute stage (:mod:`rapm.trajectories`) writes a store; training reads it through
:class:`TrajectoryDataset`, which refuses a store that is not gathered, damaged, or computed for another
teacher, grid or prompt set. Layout of ``results/trajectories/<key>/`` (``key``:
:func:`rapm.plan.trajectory_store_key`, a hash of the settings that change the arrays)::

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
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from rapm.config import lookup
from rapm.errors import RapmError
from rapm.schedule import store_grid, subgrid_indices

FORMAT = "rapm-trajectories"
FORMAT_VERSION = 1
STORE_NAME = "store.zarr"
COND_ARRAYS = ("prompt_embeds", "pooled_embeds", "add_time_ids")
CACHE_BYTES = 2 << 30  # TrajectoryDataset(cache=True) keeps the items of a store up to 2 GiB decoded (the toy: 17 MB)
#: Attributes that define the arrays' content: a store whose values differ holds other trajectories.
FINGERPRINT = (
    "format_version",
    "teacher.path",
    "teacher.type",
    "teacher.dtype",
    "teacher.weights_sha256",
    "scheduler",
    "num_steps",
    "steps_per_slot",
    "guidance",
    "seed",
    "resolution",
    "num_trajectories",
    "latent_shape",
    "conditioning_shapes",
    "trajectories_per_chunk",
    "prompts.train_csv_sha256",
)

_MISSING = object()


class TrajectoryStoreError(RapmError):
    """A trajectory store is missing, incomplete, damaged, or does not match the requested teacher/grid."""


def store_path(directory: str | Path) -> Path:
    """The zarr group inside a trajectory directory ``results/trajectories/<key>``."""
    return Path(directory) / STORE_NAME


def import_zarr():
    import zarr

    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
    return zarr


def attr(attrs: Mapping, dotted: str) -> Any:
    found, value = lookup(attrs, dotted)
    return value if found else _MISSING


def jsonable(value: Any) -> Any:
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


def expected_attrs(teacher_cfg: Mapping[str, Any], traj_cfg: Mapping[str, Any], teacher=None) -> dict[str, Any]:
    """Attribute values (dotted names) a store must have for this ``teacher``/``trajectories`` config
    (the store's grid: :func:`rapm.schedule.store_grid`).

    With a loaded ``teacher``, its weights' hash is required too (a retrained teacher at the same path).
    """
    traj_cfg = store_grid(traj_cfg)
    expect: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "teacher.path": str(teacher_cfg["path"]),
        "teacher.dtype": teacher_cfg.get("dtype", "float32"),
        "num_steps": traj_cfg["num_steps"],
        "steps_per_slot": traj_cfg["steps_per_slot"],
        "guidance": float(traj_cfg["guidance"]),
        "seed": traj_cfg["seed"],
        "resolution": traj_cfg.get("resolution"),
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
        have = attr(attrs, name)
        if have is _MISSING:
            diffs.append(f"attribute {name!r} is absent (requested {want!r})")
        elif jsonable(have) != jsonable(want):
            diffs.append(f"attribute {name!r} differs (store: {have!r}, requested: {want!r})")
    if diffs:
        raise TrajectoryStoreError(f"{where} does not match the requested teacher/grid/prompt set: " + "; ".join(diffs))


def array_specs(attrs: Mapping) -> dict[str, tuple[tuple[int, ...], Any]]:
    J, N = attrs["num_trajectories"], attrs["num_steps"]
    C, H, W = attrs["latent_shape"]
    specs: dict[str, tuple[tuple[int, ...], Any]] = {
        "seed": ((J,), "int64"),
        "prompt_id": ((J,), "int64"),
        "prompt": ((J,), str),
        "coarse": ((J, N + 1, C, H, W), "float32"),
        "delta": ((J, N, C, H, W), "float32"),
    }
    for name, shape in attrs["conditioning_shapes"].items():
        specs[name] = ((J, *shape), "float32")
    specs["done"] = ((J,), "uint8")
    return specs


def chunk_problems(path: Path, attrs: Mapping, lo: int = 0, hi: int | None = None) -> dict[int, list[str]]:
    """Chunk files of trajectories [lo, hi) that are missing or have the wrong size, by chunk index.

    Cheap (a stat per file): every chunk is uncompressed plus a 4-byte CRC32C, so its size is known;
    the variable-length prompt chunks are only checked to exist.
    """
    chunk, problems = attrs["trajectories_per_chunk"], {}
    hi = attrs["num_trajectories"] if hi is None else hi
    for name, (shape, dtype) in array_specs(attrs).items():
        size = None if dtype is str else math.prod((chunk, *shape[1:])) * np.dtype(dtype).itemsize + 4
        rest = "".join("/0" for _ in shape[1:])
        for k in range(lo // chunk, math.ceil(hi / chunk)):
            file = path / name / "c" / f"{k}{rest}"
            rows = f"{name}, trajectories {k * chunk}..{min((k + 1) * chunk, shape[0]) - 1}"
            if not file.is_file():
                problems.setdefault(k, []).append(f"chunk {file.relative_to(path)} ({rows}) is missing")
            elif size is not None and file.stat().st_size != size:
                problems.setdefault(k, []).append(
                    f"chunk {file.relative_to(path)} ({rows}) is truncated or damaged: "
                    f"{file.stat().st_size} bytes, expected {size}"
                )
    return problems


def verify_store(directory: str | Path, *, full: bool = True) -> dict[str, Any]:
    """Check a store is complete and intact; raise :class:`TrajectoryStoreError` listing what is wrong.

    Always: format, shapes, every done flag set, every chunk file present with its exact size
    (uncompressed + 4 checksum bytes). ``full``: also read every chunk (zarr checks its CRC32C), require
    finite values (unwritten rows read as NaN), and return a SHA-256 of each array's contents.
    """
    zarr = import_zarr()
    path = store_path(directory)
    if not (path / "zarr.json").is_file():
        raise TrajectoryStoreError(f"{path}: no trajectory store here")
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise TrajectoryStoreError(f"{path}: not a {FORMAT} store (format {attrs.get('format')!r})")
    specs, chunk = array_specs(attrs), attrs["trajectories_per_chunk"]
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
        problems.append(
            f"{len(missing)} of {len(done)} trajectories are not computed (first: "
            f"{missing[:10].tolist()}); run their shards (they resume)"
        )
    for k, lines in sorted(chunk_problems(path, attrs).items()):
        if done[k * chunk : (k + 1) * chunk].any():  # chunks of uncomputed trajectories are not written yet
            problems += [line + "; rerun its shard, which recomputes it" for line in lines]
    digests: dict[str, str] = {}
    if full and not problems:
        for name in specs:
            h, arr = hashlib.sha256(), group[name]
            for k in range(math.ceil(arr.shape[0] / chunk)):
                try:
                    block = arr[k * chunk : (k + 1) * chunk]
                except Exception as err:  # noqa: BLE001
                    problems.append(f"chunk {k} of {name!r} (trajectories from {k * chunk}) is damaged: {err}")
                    continue
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    problems.append(f"chunk {k} of {name!r} (trajectories from {k * chunk}) holds non-finite values")
                h.update(
                    "\0".join(block.tolist()).encode() if name == "prompt" else np.ascontiguousarray(block).tobytes()
                )
            digests[name] = h.hexdigest()
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise TrajectoryStoreError(f"trajectory store {path} is incomplete or damaged:\n{shown}{more}")
    return {"attrs": attrs, "sha256": digests}


class TrajectoryDataset(Dataset):
    """Random access to a gathered trajectory store, for training (one item = one trajectory).

    Refuses a store that is not gathered, is damaged (chunk files checked on open, checksums on every
    read), or whose attributes differ from ``expect`` (dotted names, see :func:`expected_attrs`; the error
    names each attribute that differs). Items are dicts of CPU tensors: ``coarse`` (N+1, C, H, W) at
    :attr:`coarse_timesteps` (``coarse[0]`` is the noise z̃_N), ``delta`` (N, C, H, W) at
    :attr:`delta_timesteps`, ``prompt_embeds`` (and for SDXL ``pooled_embeds``, ``add_time_ids``), plus
    ``index``, ``seed``, ``prompt_id`` and ``prompt``.
    """

    def __init__(
        self,
        directory: str | Path,
        expect: Mapping[str, Any] | None = None,
        *,
        verify: bool = True,
        num_steps: int | None = None,
        cache: bool = False,
    ):
        zarr = import_zarr()
        self.path = store_path(directory)
        if not (self.path / "zarr.json").is_file():
            raise TrajectoryStoreError(f"{self.path}: no trajectory store here")
        group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(group.attrs)
        if not self.attrs.get("complete"):
            raise TrajectoryStoreError(
                f"{self.path}: the store was not gathered (rule gather_trajectories / "
                "`rapm trajectories gather`); it may be incomplete"
            )
        check_attrs(self.attrs, expect or {}, f"trajectory store {self.path}")
        if verify:
            verify_store(directory, full=False)
        names = ["coarse", "delta", *COND_ARRAYS, "seed", "prompt_id", "prompt"]
        self._arrays = {n: group[n] for n in names if n in group}
        # a coarser student reads every (N_s / N)-th slot of the store (store_grid)
        self.num_steps = int(num_steps or self.attrs["num_steps"])
        self._coarse_idx, self._delta_idx = subgrid_indices(int(self.attrs["num_steps"]), self.num_steps)
        # ``cache``: each item is read from disk once and kept, if the decoded store fits in CACHE_BYTES
        size = sum(math.prod(a.shape) * a.dtype.itemsize for n, a in self._arrays.items() if n != "prompt")
        self._cache: dict[int, dict] | None = {} if cache and size <= CACHE_BYTES else None

    @classmethod
    def from_config(
        cls, directory: str | Path, cfg: Mapping[str, Any], teacher=None, *, prompts: str | Path | None = None, **kwargs
    ) -> TrajectoryDataset:
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
        if self._cache is None:
            return self._read(j)
        if j not in self._cache:
            self._cache[j] = self._read(j)
        return dict(self._cache[j])  # the tensors are shared: callers copy (load_batch stacks them)

    def _read(self, j: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": j}
        for name, arr in self._arrays.items():
            try:
                value = arr[j]
            except Exception as err:  # noqa: BLE001 - zarr raises ValueError on a checksum mismatch
                raise TrajectoryStoreError(
                    f"trajectory store {self.path}: array {name!r}, trajectory {j}: chunk "
                    f"unreadable ({err}); the store is damaged, recompute it"
                ) from err
            if name in ("coarse", "delta") and self.num_steps != int(self.attrs["num_steps"]):
                value = np.asarray(value)[self._coarse_idx if name == "coarse" else self._delta_idx]
            item[name] = (
                str(value)
                if name == "prompt"
                else (int(value) if np.ndim(value) == 0 else torch.from_numpy(np.array(value)))
            )
        return item
