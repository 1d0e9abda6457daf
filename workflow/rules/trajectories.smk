# Teacher trajectories (docs/method.md §1): pre-allocate a store, compute it in shards, gather it.
# One store per distinct teacher + trajectory settings (results/trajectories/<key>/, key: a hash of
# them), shared by every variant that uses those settings. The store itself (store.zarr) is never a
# declared output: Snakemake deletes declared outputs before a job runs, and the store holds the
# resumable state of the shards.


# Create the pre-allocated trajectory store, or keep a matching one so the shards resume.
rule init_trajectories:
    input:
        config="results/config/trajectories/{key}.yaml",
        prompts="results/prompts/train.csv",
        manifest="results/prompts/manifest.json",
    output:
        init="results/trajectories/{key}/init.json",
    log:
        "logs/trajectories/{key}/init.log",
    benchmark:
        "logs/benchmarks/trajectories/{key}/init.tsv"
    priority: UPSTREAM_PRIORITY
    conda:
        "../../environment.yml"
    params:
        dir=subpath(output.init, parent=True),
    shell:
        "python -m rapm --log {log} trajectories init --config {input.config} --dir {params.dir}"
        " --prompts {input.prompts} --manifest {input.manifest} --out {output.init}"


# Compute the missing trajectories of one shard (whole chunks of its own index range; resumable).
rule precompute_trajectories:
    input:
        config="results/config/trajectories/{key}.yaml",
        init="results/trajectories/{key}/init.json",
    output:
        summary="results/trajectories/{key}/shards/{shard}-of-{shards}.json",
    log:
        "logs/trajectories/{key}/shards/{shard}-of-{shards}.log",
    benchmark:
        "logs/benchmarks/trajectories/{key}/shards/{shard}-of-{shards}.tsv"
    priority: UPSTREAM_PRIORITY
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    params:
        dir=subpath(input.init, parent=True),
    shell:
        "python -m rapm --log {log} trajectories compute --config {input.config} --dir {params.dir}"
        " --shard {wildcards.shard} --summary {output.summary} --threads {threads}"


# Check every trajectory and chunk of the store, consolidate its metadata, write its manifest.
rule gather_trajectories:
    input:
        config="results/config/trajectories/{key}.yaml",
        shards=get_trajectory_shards,
    output:
        manifest="results/trajectories/{key}/manifest.json",
    log:
        "logs/trajectories/{key}/gather.log",
    benchmark:
        "logs/benchmarks/trajectories/{key}/gather.tsv"
    priority: UPSTREAM_PRIORITY
    conda:
        "../../environment.yml"
    params:
        dir=subpath(output.manifest, parent=True),
    shell:
        "python -m rapm --log {log} trajectories gather --config {input.config} --dir {params.dir}"
        " --summaries {input.shards} --out {output.manifest}"
