# RAPM training (docs/method.md §2-§4), one job per variant. Checkpoints, the loss log and validation
# grids live in results/state/train/<variant>/ (not declared: Snakemake would delete them), so a
# killed job resumes when it is run again.


# Train the student LoRA of one variant on its trajectory store.
rule train_rapm:
    input:
        config="results/config/variants/{variant}.yaml",
        trajectories=get_variant_trajectories,
    output:
        lora="results/train/{variant}/lora.safetensors",
        summary="results/train/{variant}/summary.json",
        losses="results/train/{variant}/losses.jsonl",
        snapshots="results/train/{variant}/snapshots.json",
        grid=report(
            "results/train/{variant}/validation.png",
            caption="../report/validation.rst",
            category="Training",
            subcategory="{variant}",
        ),
    log:
        "logs/train/{variant}.log",
    benchmark:
        "logs/benchmarks/train/{variant}.tsv"
    priority: get_training_priority
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    params:
        trajectories=subpath(input.trajectories, parent=True),
        out_dir=subpath(output.lora, parent=True),
        state_dir="results/state/train/{variant}",
    shell:
        "python -m rapm --log {log} train --config {input.config} --trajectories {params.trajectories}"
        " --out-dir {params.out_dir} --state-dir {params.state_dir} --threads {threads}"


# The trained LoRA in kohya-ss form (sd-scripts, AUTOMATIC1111, ComfyUI); not part of `all`: ask for
# it by name, e.g. `snakemake results/train/rapm/lora_kohya.safetensors`.
rule export_kohya:
    input:
        lora="results/train/{variant}/lora.safetensors",
    output:
        kohya="results/train/{variant}/lora_kohya.safetensors",
    log:
        "logs/train/{variant}/kohya.log",
    benchmark:
        "logs/benchmarks/train/{variant}/kohya.tsv"
    conda:
        "../../environment.yml"
    shell:
        "python -m rapm --log {log} export-kohya {input.lora} {output.kohya}"


# MSD (docs/method.md §7): split a variant's training trajectories into K groups and fit the router.
rule msd_partition:
    input:
        config="results/config/variants/{variant}.yaml",
        trajectories=get_variant_trajectories,
    output:
        router="results/train/{variant}/router.safetensors",
        groups="results/train/{variant}/groups.json",
    log:
        "logs/train/{variant}/partition.log",
    benchmark:
        "logs/benchmarks/train/{variant}/partition.tsv"
    priority: get_training_priority
    conda:
        "../../environment.yml"
    params:
        trajectories=subpath(input.trajectories, parent=True),
        out_dir=subpath(output.router, parent=True),
        msd=get_msd,
    shell:
        "python -m rapm --log {log} msd-partition --config {input.config} --trajectories {params.trajectories}"
        " --students {params.msd[students]} --partition {params.msd[partition]}"
        " --seed {params.msd[seed]} --out-dir {params.out_dir}"


# MSD: train student k of a variant on its group's trajectories (train.iterations / K iterations).
rule train_msd_student:
    input:
        config="results/config/students/{variant}.yaml",
        groups="results/train/{variant}/groups.json",
        trajectories=get_variant_trajectories,
    output:
        lora="results/train/{variant}/students/{k}/lora.safetensors",
        summary="results/train/{variant}/students/{k}/summary.json",
        losses="results/train/{variant}/students/{k}/losses.jsonl",
        snapshots="results/train/{variant}/students/{k}/snapshots.json",
        grid="results/train/{variant}/students/{k}/validation.png",
    log:
        "logs/train/{variant}/students/{k}.log",
    benchmark:
        "logs/benchmarks/train/{variant}/students/{k}.tsv"
    wildcard_constraints:
        k=r"\d+",
    priority: get_training_priority
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    params:
        trajectories=subpath(input.trajectories, parent=True),
        out_dir=subpath(output.lora, parent=True),
        state_dir="results/state/train/{variant}/students/{k}",
        name="{variant}/s{k}",
    shell:
        "python -m rapm --log {log} train --config {input.config} --trajectories {params.trajectories}"
        " --out-dir {params.out_dir} --state-dir {params.state_dir} --subset-file {input.groups}"
        " --group {wildcards.k} --name {params.name} --threads {threads}"
