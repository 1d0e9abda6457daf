# Teacher trajectories (docs/method.md §1): pre-allocate the store, compute it in shards, gather it.
# The store (results/trajectories/<key>/store.zarr) is never a declared output: Snakemake deletes
# declared outputs before a job runs, and the store holds the resumable state of the shards.
from rapm.workflow import trajectory_dir

TRAJECTORY_DIR = trajectory_dir(config)
TRAJECTORY_LOGS = TRAJECTORY_DIR.replace("results/", "logs/", 1)
TRAJECTORY_BENCHMARKS = TRAJECTORY_DIR.replace("results/", "benchmarks/", 1)
NUM_SHARDS = config["trajectories"]["shards"]


# Create the pre-allocated trajectory store, or keep a matching one so the shards resume.
rule init_trajectories:
    input:
        config="results/config/trajectories.yaml",
        prompts="results/prompts/train.csv",
        manifest="results/prompts/manifest.json",
    output:
        init=f"{TRAJECTORY_DIR}/init.json",
    log:
        f"{TRAJECTORY_LOGS}/init.log",
    benchmark:
        f"{TRAJECTORY_BENCHMARKS}/init.tsv"
    conda:
        "../../environment.yml"
    params:
        dir=subpath(output.init, parent=True),
    shell:
        "python -m rapm trajectories init --config {input.config} --dir {params.dir}"
        " --prompts {input.prompts} --manifest {input.manifest} --out {output.init} > {log} 2>&1"


# Compute the missing trajectories of one shard (whole chunks of its own index range; resumable).
rule precompute_trajectories:
    input:
        config="results/config/trajectories.yaml",
        init=f"{TRAJECTORY_DIR}/init.json",
    output:
        summary=f"{TRAJECTORY_DIR}/shards/{{shard}}-of-{NUM_SHARDS}.json",
    log:
        f"{TRAJECTORY_LOGS}/shards/{{shard}}-of-{NUM_SHARDS}.log",
    benchmark:
        f"{TRAJECTORY_BENCHMARKS}/shards/{{shard}}-of-{NUM_SHARDS}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    params:
        dir=subpath(input.init, parent=True),
    shell:
        "python -m rapm trajectories compute --config {input.config} --dir {params.dir}"
        " --shard {wildcards.shard} --summary {output.summary} --threads {threads} > {log} 2>&1"


# Check every trajectory and chunk of the store, consolidate its metadata, write its manifest.
rule gather_trajectories:
    input:
        config="results/config/trajectories.yaml",
        shards=expand(
            f"{TRAJECTORY_DIR}/shards/{{shard}}-of-{NUM_SHARDS}.json",
            shard=range(NUM_SHARDS),
        ),
    output:
        manifest=f"{TRAJECTORY_DIR}/manifest.json",
    log:
        f"{TRAJECTORY_LOGS}/gather.log",
    benchmark:
        f"{TRAJECTORY_BENCHMARKS}/gather.tsv"
    conda:
        "../../environment.yml"
    params:
        dir=subpath(output.manifest, parent=True),
    shell:
        "python -m rapm trajectories gather --config {input.config} --dir {params.dir}"
        " --summaries {input.shards} --out {output.manifest} > {log} 2>&1"
