# Helpers shared by all rules: config validation, stage configs, input functions, targets.
import json

from snakemake.logging import LogEvent, logger

from rapm.config import ConfigError, apply_command_line, select_keys, validate
from rapm.plan import (
    final_targets,
    protocol_key,
    row_file,
    row_priority,
    rows,
    stage_keys,
    student_config,
    trajectory_store_key,
    trained_variants,
    training_priority,
    trajectory_stores,
    upstream_priority,
    variant_config,
    variant_msd,
    variant_names,
)

# Validate the merged config (config/config.yaml plus any --configfile / --config) before
# any job is scheduled; a typo fails here with the key and the file named.
# --config values arrive as strings (Snakemake reads nested ones as text): read them by the schema's
# types, and name the command line in an error when it set any key.
COMMAND_LINE = dict(getattr(workflow.config_settings, "overwrite_config", None) or {})
try:
    config.update(
        validate(
            apply_command_line(config, COMMAND_LINE),
            source=", ".join(
                [str(f) for f in workflow.configfiles]
                + (
                    [f"--config on the command line ({', '.join(COMMAND_LINE)})"]
                    if COMMAND_LINE
                    else []
                )
            ),
        )
    )
    ROWS = rows(config, every=True)
    STORES = trajectory_stores(config, every=True)
except ConfigError as err:
    raise WorkflowError(str(err))

# printshellcmds shows each shell job's command; Snakemake also logs "Shell command: None" for every
# run: job (the config writers), which is noise: drop exactly those records.
logger.addFilter(
    lambda record: not (
        getattr(record, "event", None) == LogEvent.SHELLCMD
        and getattr(record, "shellcmd", "") is None
    )
)

SHARDS = config["sampling"]["shards"]
# Job priorities (rapm.plan.training_priority): the jobs every training waits for first, then the
# longest training, and the jobs that need a training's weights as soon as they exist.
UPSTREAM_PRIORITY = upstream_priority(config)


wildcard_constraints:
    stage="|".join(stage_keys()),
    variant="|".join(trained_variants(config, every=True)),
    table_set="run|every",
    row="|".join(ROWS),
    key="[0-9a-f]{12}",
    protocol="[0-9a-f]{12}",
    shard=r"\d+",
    shards=r"\d+",


def canonical(data):
    """Canonical JSON (key order does not matter): a change to it, and only to it, reruns its stage."""
    return json.dumps(data, sort_keys=True)


def write_config_file(values, path, log_path):
    """The job of the config rules: write the canonical JSON ``values`` as YAML to ``path``, a line to its log."""
    from pathlib import Path

    from rapm.config import write_yaml

    write_yaml(json.loads(values), path)
    Path(log_path).write_text(f"wrote {path}\n")


def get_stage_config(wildcards):
    """The config keys one stage reads."""
    return canonical(select_keys(config, stage_keys()[wildcards.stage]))


def get_named_config(wildcards):
    """variants/<name>: the resolved teacher / trajectories / train sections of one variant;
    trajectories/<key>: the teacher and trajectories sections of one store; rows/<name>: one table row.
    """
    if wildcards.kind == "variants":
        return canonical(variant_config(config, wildcards.name))
    if wildcards.kind == "students":
        return canonical(student_config(config, wildcards.name))
    if wildcards.kind == "trajectories":
        return canonical(STORES[wildcards.name])
    return canonical(row_file(config, wildcards.name))


def get_captions(wildcards):
    """captions_{train,val}2014.json of the configured source (COCO or the toy dataset)."""
    folder = f"results/data/{config['data']['source']}"
    return {
        "train": f"{folder}/captions_train2014.json",
        "val": f"{folder}/captions_val2014.json",
    }


def variant_store(name):
    return trajectory_store_key({**config, **variant_config(config, name)})


def get_variant_trajectories(wildcards):
    """The gathered manifest of the variant's trajectory store."""
    return f"results/trajectories/{variant_store(wildcards.variant)}/manifest.json"


def get_trajectory_shards(wildcards):
    n = STORES[wildcards.key]["trajectories"]["shards"]
    return [
        f"results/trajectories/{wildcards.key}/shards/{s}-of-{n}.json" for s in range(n)
    ]


def get_row_inputs(wildcards):
    """A student row's LoRA (MSD: router and students) trained by this workflow, so retraining resamples it."""
    return ROWS[wildcards.row].workflow_inputs()


def get_training_priority(wildcards):
    return training_priority(config, wildcards.variant)


def get_row_priority(wildcards):
    return row_priority(config, ROWS[wildcards.row])


def get_msd(wildcards):
    return variant_msd(config, wildcards.variant)


def get_row_manifests(wildcards):
    return [
        f"results/samples/{wildcards.row}/shard-{s}-of-{SHARDS}.csv"
        for s in range(SHARDS)
    ]


def get_teacher_manifests(wildcards):
    """The teacher row's images (same noise) for every other row's distance to the teacher."""
    if wildcards.row == "teacher":
        return []
    return [f"results/samples/teacher/shard-{s}-of-{SHARDS}.csv" for s in range(SHARDS)]


def get_teacher_stats(wildcards):
    """The teacher row's feature statistics (its evaluate job's), for every other row's FD to the teacher."""
    return [] if wildcards.row == "teacher" else ["results/eval/teacher/fd_stats.npz"]


def get_reference_stats(wildcards):
    return f"results/eval/reference/{protocol_key(config)}.npz"


def _every(wildcards):
    return wildcards.table_set == "every"


def get_all_metrics(wildcards):
    return [
        f"results/eval/{name}/metrics.json" for name in rows(config, _every(wildcards))
    ]


def get_all_manifests(wildcards):
    return [
        f"results/samples/{name}/shard-{s}-of-{SHARDS}.csv"
        for name in rows(config, _every(wildcards))
        for s in range(SHARDS)
    ]


def get_all_train_summaries(wildcards):
    out = []
    for v in trained_variants(config, _every(wildcards)):
        msd = variant_msd(config, v)
        if msd is None:
            out.append(f"results/train/{v}/summary.json")
        else:
            students = range(msd["students"])
            out += [f"results/train/{v}/students/{k}/summary.json" for k in students]
    return out


def get_all_train_losses(wildcards):
    return [
        s.replace("summary.json", "losses.jsonl")
        for s in get_all_train_summaries(wildcards)
    ]


def get_all_trajectory_manifests(wildcards):
    stores = trajectory_stores(config, _every(wildcards))
    return [f"results/trajectories/{key}/manifest.json" for key in stores]


def get_final_targets(every=False):
    return final_targets(config, every)
