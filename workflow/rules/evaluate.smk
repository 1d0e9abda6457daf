# Evaluation under one pinned protocol: sample every table row's images (sharded, resumable), the
# cached FID reference statistics, and one metrics JSON per row.


# Sample one shard of one row's evaluation images (image i from the noise of sampling.seed + i).
rule sample_images:
    input:
        unpack(get_row_inputs),
        config="results/config/sampling.yaml",
        row="results/config/rows/{row}.yaml",
        prompts="results/prompts/eval.csv",
    output:
        manifest="results/samples/{row}/shard-{shard}-of-{shards}.csv",
    log:
        "logs/samples/{row}/shard-{shard}-of-{shards}.log",
    benchmark:
        "logs/benchmarks/samples/{row}/shard-{shard}-of-{shards}.tsv"
    priority: get_row_priority
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    params:
        out_dir="results/samples/{row}/shard-{shard}",
    shell:
        "python -m rapm --log {log} sample --config {input.config} --row {input.row} --prompts {input.prompts}"
        " --shard {wildcards.shard} --out-dir {params.out_dir} --manifest {output.manifest}"
        " --threads {threads}"


# FID reference statistics of the evaluation prompts, once per protocol (results/eval/reference/<key>.npz).
rule reference_stats:
    input:
        config="results/config/reference.yaml",
        prompts="results/prompts/eval.csv",
    output:
        stats="results/eval/reference/{protocol}.npz",
    log:
        "logs/eval/reference/{protocol}.log",
    benchmark:
        "logs/benchmarks/eval/reference/{protocol}.tsv"
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    shell:
        "python -m rapm --log {log} reference-stats --config {input.config} --prompts {input.prompts}"
        " --out {output.stats} --threads {threads}"


# FID, CLIP score, the distance to the teacher's images from the same noise (and the toy's
# prompt-following accuracy) of one row, with bootstrap intervals over images; fd_stats.npz: the
# mean and covariance of the row's features (the teacher's serve every other row's FD to the teacher).
rule evaluate:
    input:
        config="results/config/evaluation.yaml",
        row="results/config/rows/{row}.yaml",
        manifests=get_row_manifests,
        teacher=get_teacher_manifests,
        teacher_stats=get_teacher_stats,
        reference=get_reference_stats,
        prompts="results/prompts/eval.csv",
    output:
        metrics="results/eval/{row}/metrics.json",
        stats="results/eval/{row}/fd_stats.npz",
    log:
        "logs/eval/{row}.log",
    benchmark:
        "logs/benchmarks/eval/{row}.tsv"
    priority: get_row_priority
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    shell:
        "python -m rapm --log {log} evaluate --config {input.config} --row {input.row} --manifests {input.manifests}"
        " --teacher-manifests {input.teacher} --teacher-stats {input.teacher_stats} --reference {input.reference}"
        " --prompts {input.prompts} --out {output.metrics} --stats-out {output.stats}"
        " --threads {threads}"
