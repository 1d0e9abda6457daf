"""What the Snakemake workflow needs from the package: stage keys and final targets.

Kept here (not in the .smk files) so it is importable, testable and the same for every profile.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from rapm.config import select_keys

# The config keys each CLI stage reads. The workflow writes exactly these to
# results/config/<stage>.yaml, so editing a key reruns the stages that read it and no other.
STAGE_KEYS: dict[str, list[str]] = {
    "fetch_coco": ["data.coco"],
    "toy_captions": ["data.toy"],
    "prompts": ["prompts"],
    "trajectories": ["teacher", "trajectories"],
}


def stage_keys() -> dict[str, list[str]]:
    return STAGE_KEYS


def final_targets(config: Mapping) -> list[str]:
    """Every file ``rule all`` asks for under ``config``."""
    return [
        "results/prompts/train.csv",
        "results/prompts/eval.csv",
        "results/prompts/manifest.json",
        f"{trajectory_dir(config)}/manifest.json",
    ]


# The settings that change the teacher trajectories' arrays (the prompt set, the teacher, the grid,
# the noise, the chunk layout) and none that do not (device, shards, batch size). The store lives at
# results/trajectories/<short hash of them>/, so every variant that shares them shares one store.
TRAJECTORY_STORE_KEYS = [
    "data.source",
    "prompts.seed",
    "prompts.num_train",
    "teacher.path",
    "teacher.type",
    "teacher.dtype",
    "teacher.revision",
    "teacher.variant",
    "trajectories.num_steps",
    "trajectories.steps_per_slot",
    "trajectories.guidance",
    "trajectories.num_trajectories",
    "trajectories.seed",
    "trajectories.resolution",
    "trajectories.trajectories_per_chunk",
]


def trajectory_store_key(config: Mapping) -> str:
    """Short hash (12 hex digits) of :data:`TRAJECTORY_STORE_KEYS` in ``config`` (key order does not matter)."""
    text = json.dumps(select_keys(config, TRAJECTORY_STORE_KEYS), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def trajectory_dir(config: Mapping) -> str:
    """``results/trajectories/<key>``: the store (``store.zarr``), shard summaries and the gathered manifest."""
    return f"results/trajectories/{trajectory_store_key(config)}"
