"""What the Snakemake workflow needs from the package: stage keys and final targets.

Kept here (not in the .smk files) so it is importable, testable and the same for every profile.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from rapm.config import ConfigError, deep_merge, replicate_name, select_keys, split_replicate, validate
from rapm.rows import Row
from rapm.schedule import store_grid

# The config keys each CLI stage reads. The workflow writes exactly these to
# results/config/<stage>.yaml, so editing a key reruns the stages that read it and no other.
STAGE_KEYS: dict[str, list[str]] = {
    "fetch_coco": ["data.coco"],
    "toy_captions": ["data.toy"],
    "prompts": ["prompts"],
    "sampling": ["teacher", "sampling"],
    "evaluation": ["profile", "data", "sampling", "evaluation"],
    # FID reference statistics: the FID keys only (a CLIP-only edit must not recompute them)
    "reference": ["profile", "data", "sampling.num_images", "evaluation.fid", "evaluation.reference"],
    # curves: FD and the reader's accuracy of snapshots, no CLIP score
    "curves": [
        "profile",
        "data",
        "teacher",
        "sampling",
        "evaluation.fid",
        "evaluation.reference",
        "evaluation.reader_accuracy",
        "curves",
    ],
    "tables": ["profile", "data.source", "trajectories.guidance", "sampling", "evaluation", "variants", "run_variants"],
}


def stage_keys() -> dict[str, list[str]]:
    return STAGE_KEYS


def final_targets(config: Mapping, every: bool = False) -> list[str]:
    """Every file ``rule all`` asks for under ``config``: prompt sets, each run variant's LoRA and every
    row's metrics, and the tables in results/tables/run/. ``every``: the same over every variant
    (rule ``ablations``, tables in results/tables/every/)."""
    return [
        "results/prompts/train.csv",
        "results/prompts/eval.csv",
        "results/prompts/manifest.json",
        *[path for v in trained_variants(config, every) for path in variant_outputs(config, v)],
        *[f"results/eval/{name}/metrics.json" for name in rows(config, every)],
        *table_files("every" if every else "run"),
        f"results/figures/{'every' if every else 'run'}/grid.png",
        f"results/figures/{'every' if every else 'run'}/losses.png",
        *[
            f"results/figures/curves/{v}.png"
            for v in variant_names(config, every)  # variants with snapshots
            if variant_msd(config, v) is None and variant_config(config, v)["train"]["snapshot_every"]
        ],
    ]


def table_files(table_set: str) -> list[str]:
    return [
        f"results/tables/{table_set}/{name}.{ext}"
        for name in ("main", "ablations", "resources")
        for ext in ("md", "csv", "tex")
    ]


# --- variants ---------------------------------------------------------------------------------------


def variant_names(config: Mapping, every: bool = False) -> list[str]:
    """The variants ``rule all`` runs: ``run_variants``, or every entry of ``variants`` (also when ``every``)."""
    names = (None if every else config.get("run_variants")) or list(config["variants"])
    unknown = [n for n in names if n not in config["variants"]]
    if unknown:
        raise ConfigError(f"run_variants names {unknown}, which are not in variants ({sorted(config['variants'])})")
    return list(names)


def replicates(config: Mapping, every: bool = False) -> int:
    """Training seeds per variant: ``replicates.every`` for the ablation study, else ``replicates.run``."""
    return int(config["replicates"]["every" if every else "run"])


def trained_variants(config: Mapping, every: bool = False) -> list[str]:
    """Every replicate of every variant ``rule all`` (or ``ablations``) trains, variant by variant."""
    n = replicates(config, every)
    return [replicate_name(v, r) for v in variant_names(config, every) for r in range(n)]


def variant_config(config: Mapping, name: str) -> dict:
    """The resolved teacher / trajectories / train sections of variant ``name`` (overrides deep-merged
    onto the base sections and validated: a bad override fails naming the variant and key). Replicate
    ``<variant>-seed<r>`` is the variant with ``train.seed`` + r."""
    base, r = split_replicate(name)
    if base not in config["variants"]:
        raise ConfigError(f"unknown variant {name!r}; defined: {sorted(config['variants'])}")
    name, entry = base, config["variants"][base]
    merged = {
        "teacher": config["teacher"],
        "trajectories": deep_merge(config["trajectories"], entry.get("trajectories", {})),
        "train": deep_merge(config.get("train", {}), entry.get("train", {})),
    }
    if r:
        merged["train"]["seed"] = int(merged["train"].get("seed", 0)) + r
    try:
        return validate(merged, source=f"variants.{name}", partial=True)
    except ConfigError as err:
        raise ConfigError(
            str(err)
            .replace("  - train.", f"  - variants.{name}.train.")
            .replace("  - trajectories.", f"  - variants.{name}.trajectories.")
        ) from err


def variant_msd(config: Mapping, name: str) -> dict | None:
    """The ``msd`` section of variant (or replicate) ``name`` (K students), or None for a single-student variant."""
    msd = config["variants"][split_replicate(name)[0]].get("msd")
    if msd is None:
        return None
    return {"partition": "pca", "seed": 0, **msd}


def student_config(config: Mapping, name: str) -> dict:
    """The training config of each student of MSD variant ``name``: train.iterations / K iterations each."""
    vc = variant_config(config, name)
    k = variant_msd(config, name)["students"]
    vc["train"] = {**vc["train"], "iterations": max(1, vc["train"]["iterations"] // k)}
    return vc


def training_priority(config: Mapping, name: str) -> int:
    """Scheduling priority of variant ``name``'s training and of the jobs that need its weights: its UNet work,
    iterations x N per job (an N = 1 iteration costs about a quarter of an N = 4 one; an MSD student
    trains iterations / K). With two job slots the longest training starts first and the short jobs fill
    the other slot around it, instead of it starting last and running alone."""
    vc = variant_config(config, name) if variant_msd(config, name) is None else student_config(config, name)
    return int(vc["train"]["iterations"]) * int(vc["trajectories"]["num_steps"])


def upstream_priority(config: Mapping) -> int:
    """Priority of the jobs every training waits for (captions, prompt sets, trajectory stores): above
    every :func:`training_priority`, so a free slot never goes to an evaluation while they are due."""
    return 1 + max((training_priority(config, v) for v in trained_variants(config, every=True)), default=0)


def row_priority(config: Mapping, row: Row) -> int:
    """Priority of a row's sampling and evaluation: its training's (:func:`training_priority`) for a trained
    row, so the longest training's row is sampled as soon as it exists; 0 for the teacher rows."""
    return training_priority(config, row.name) if row.trained else 0


def variant_outputs(config: Mapping, name: str) -> list[str]:
    """The trained artefacts of a variant: its LoRA, or the router and every student's LoRA."""
    msd = variant_msd(config, name)
    if msd is None:
        return [f"results/train/{name}/lora.safetensors"]
    return [
        f"results/train/{name}/router.safetensors",
        *[f"results/train/{name}/students/{k}/lora.safetensors" for k in range(msd["students"])],
    ]


def trajectory_stores(config: Mapping, every: bool = False) -> dict[str, dict]:
    """{store key: its teacher + trajectories sections} over the run (or ``every``) variants; variants share stores."""
    stores = {}
    for name in variant_names(config, every):
        vc = variant_config(config, name)
        stores.setdefault(
            trajectory_store_key({**config, **vc}),
            {"teacher": vc["teacher"], "trajectories": store_grid(vc["trajectories"])},
        )
    return stores


# --- table rows -------------------------------------------------------------------------------------


def rows(config: Mapping, every: bool = False) -> dict[str, Row]:
    """{row name: row} of every table row: the teacher (many steps), at each variant's N the teacher
    with guidance (``teacher-<N>step``) and without (``init-<N>step``, the student's initialisation),
    each run variant's student (``init`` names its initialisation row), each external LoRA. A row
    holds what sampling needs."""
    s = config["sampling"]
    guidance = s["teacher_guidance"] if s["teacher_guidance"] is not None else config["trajectories"]["guidance"]
    res = config["trajectories"].get("resolution")
    out = {"teacher": Row("teacher", "teacher", s["teacher_steps"], guidance, resolution=res)}
    students = {}
    for name in trained_variants(config, every):
        vc, (variant, replicate) = variant_config(config, name), split_replicate(name)
        n = vc["trajectories"]["num_steps"]
        out.setdefault(f"teacher-{n}step", Row(f"teacher-{n}step", "teacher", n, guidance, resolution=res))
        # the student's starting point (method.md §8): the teacher at its N steps and guidance 1 (LoRA B = 0)
        out.setdefault(f"init-{n}step", Row(f"init-{n}step", "init", n, 1.0, resolution=res))
        common = {
            "name": name,
            "steps": n,
            "guidance": 1.0,
            "variant": variant,
            "init": f"init-{n}step",
            "resolution": vc["trajectories"].get("resolution"),
            "replicate": replicate or None,
        }  # replicate r: trained with train.seed + r
        msd = variant_msd(config, name)
        if msd is None:
            students[name] = Row(kind="student", lora=f"results/train/{name}/lora.safetensors", **common)
        else:
            students[name] = Row(
                kind="msd",
                router=f"results/train/{name}/router.safetensors",
                loras=tuple(f"results/train/{name}/students/{k}/lora.safetensors" for k in range(msd["students"])),
                **common,
            )
    for ext in s.get("external", []):
        students[ext["name"]] = Row(
            ext["name"], "external", ext["steps"], ext["guidance"], lora=ext["lora"], resolution=res
        )
    clash = sorted(set(out) & set(students))
    if clash:
        raise ConfigError(f"row name(s) {clash} are reserved for the teacher rows; rename the variant or external LoRA")
    out.update(students)
    return out


def row_file(config: Mapping, name: str) -> dict:
    """The content of ``results/config/rows/<name>.yaml``: ``{"row": {...}}``, what sampling and evaluation
    need to know of one row beyond the teacher, sampling and evaluation sections."""
    all_rows = rows(config, every=True)
    if name not in all_rows:
        raise ConfigError(f"unknown row {name!r}; rows: {sorted(all_rows)}")
    return {"row": all_rows[name].to_dict()}


def protocol_key(config: Mapping) -> str:
    """Short hash of what the reference statistics depend on (data, prompts, number of images, FID keys)."""
    keys = ["data", "prompts", "sampling.num_images", "evaluation.fid", "evaluation.reference"]
    text = json.dumps(select_keys(config, keys), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


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
    """Short hash (12 hex digits) of :data:`TRAJECTORY_STORE_KEYS` in ``config`` (key order does not matter),
    on the store's grid (:func:`rapm.schedule.store_grid`): a student on a sub-grid shares the store."""
    config = {**config, "trajectories": store_grid(config["trajectories"])}
    text = json.dumps(select_keys(config, TRAJECTORY_STORE_KEYS), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
