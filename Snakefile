# rapm: single-GPU diffusion distillation (RAPM, MSD) as a Snakemake workflow.
# Run: snakemake all   (see README.md; the default profile sets cores and resources)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/config.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/trajectories.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


# Default target: every final output of the configured profile.
rule all:
    default_target: True
    input:
        get_final_targets(),


# Every variant of config.variants (the paper's ablations), with its own tables in results/tables/every/.
rule ablations:
    input:
        get_final_targets(every=True),
