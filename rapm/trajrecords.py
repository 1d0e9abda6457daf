"""What the trajectory stage records (docs/method.md §1): the prompts it reads, the store's attributes, a
shard's summary and the gathered store's manifest.

:mod:`rapm.trajectories` computes the store and calls these; the store's layout, the attributes it is
checked by and its reader are in :mod:`rapm.store`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rapm.io import LIBRARIES, library_versions, machine, resource_fields, sha256_file
from rapm.schedule import trajectory_grids
from rapm.shards import index_runs
from rapm.store import FORMAT, FORMAT_VERSION, STORE_NAME, TrajectoryStoreError, jsonable, weights_sha256

#: What the manifest keeps of each shard's summary.
SHARD_FIELDS = (
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


def build_attrs(
    teacher, traj_cfg: Mapping[str, Any], prompt_hashes: Mapping, cond_shapes: Mapping, key: str | None
) -> dict:
    """The group attributes of a new store (listed in :mod:`rapm.store`), ``complete`` False."""
    meta = teacher.metadata()
    N, M = int(traj_cfg["num_steps"]), int(traj_cfg["steps_per_slot"])
    fine, coarse, delta = trajectory_grids(N, M, teacher.num_train_timesteps)
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
            "machine": machine(),
            "complete": False,
        }
    )


def shard_summary(
    attrs: Mapping,
    path: Path,
    shard: int,
    num_shards: int,
    span: tuple[int, int],
    already_done: int,
    computed: Sequence[int],
    batch_size: int,
    device,
    wall: float,
    compute_s: float,
) -> dict[str, Any]:
    """The summary of one shard's run over trajectories ``span`` = [start, stop), which found ``already_done``
    of them done and computed ``computed`` (``remaining`` > 0 when it stopped early)."""
    start, stop = span
    return {
        "format": FORMAT,
        "key": attrs.get("key"),
        "store": str(path),
        "shard": shard,
        "num_shards": num_shards,
        "range": [start, stop],
        "trajectories": stop - start,
        "already_done": already_done,
        "computed": len(computed),
        "computed_runs": [[a, b] for a, b, _ in index_runs(computed)],
        "remaining": int(stop - start - already_done - len(computed)),
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 3),
        "compute_s": round(compute_s, 3),
        "trajectories_per_s": round(len(computed) / compute_s, 4) if computed else None,
        **resource_fields(device),
        "teacher_weights_sha256": attrs["teacher"]["weights_sha256"],
        "versions": library_versions(LIBRARIES),
    }


def gather_manifest(path: Path, group, report: Mapping, summaries: Sequence[Mapping]) -> dict[str, Any]:
    """The manifest of a verified store (``report``: :func:`rapm.store.verify_store`), with what each shard did."""
    attrs = report["attrs"]
    return {
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
        "shards": [{k: s.get(k) for k in SHARD_FIELDS} for s in summaries],
        "versions": attrs["versions"],
        "machine": attrs.get("machine"),
    }
