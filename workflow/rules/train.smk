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
        grid=report(
            "results/train/{variant}/validation.png",
            caption="../report/validation.rst",
            category="Training",
            subcategory="{variant}",
        ),
    log:
        "logs/train/{variant}.log",
    benchmark:
        "benchmarks/train/{variant}.tsv"
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
        "python -m rapm train --config {input.config} --trajectories {params.trajectories}"
        " --out-dir {params.out_dir} --state-dir {params.state_dir} --threads {threads} > {log} 2>&1"
