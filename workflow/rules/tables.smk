# The paper's tables from measured metrics, next to the published reference rows.


# Main, ablation and resources tables as Markdown, CSV and LaTeX: results/tables/run/ for the
# run variants (rule all), results/tables/every/ for every variant (rule ablations).
rule tables:
    input:
        config="results/config/tables.yaml",
        metrics=get_all_metrics,
        summaries=get_all_train_summaries,
        trajectories=get_all_trajectory_manifests,
    output:
        main_md=report(
            "results/tables/{table_set}/main.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        main_csv="results/tables/{table_set}/main.csv",
        main_tex="results/tables/{table_set}/main.tex",
        ablations_md=report(
            "results/tables/{table_set}/ablations.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        ablations_csv="results/tables/{table_set}/ablations.csv",
        ablations_tex="results/tables/{table_set}/ablations.tex",
        resources_md=report(
            "results/tables/{table_set}/resources.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        resources_csv="results/tables/{table_set}/resources.csv",
        resources_tex="results/tables/{table_set}/resources.tex",
    log:
        "logs/tables/{table_set}.log",
    benchmark:
        "logs/benchmarks/tables/{table_set}.tsv"
    conda:
        "../../environment.yml"
    params:
        out_dir="results/tables/{table_set}",
    shell:
        "python -m rapm --log {log} tables --config {input.config} --metrics {input.metrics}"
        " --train-summaries {input.summaries} --trajectory-manifests {input.trajectories}"
        " --out-dir {params.out_dir}"


# The same evaluation prompts and seeds across the teacher, the undistilled N-step teacher and each variant.
rule comparison_grid:
    input:
        manifests=get_all_manifests,
    output:
        grid=report(
            "results/figures/{table_set}/grid.png",
            caption="../report/grid.rst",
            category="Images",
        ),
    log:
        "logs/figures/{table_set}/grid.log",
    benchmark:
        "logs/benchmarks/figures/{table_set}/grid.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m rapm --log {log} grid --manifests {input.manifests} --num 8 --out {output.grid}"


# Loss terms against iteration of every trained run of the table set (running means, one PNG).
rule loss_curves:
    input:
        losses=get_all_train_losses,
    output:
        png=report(
            "results/figures/{table_set}/losses.png",
            caption="../report/losses.rst",
            category="Training",
        ),
    log:
        "logs/figures/{table_set}/losses.log",
    benchmark:
        "logs/benchmarks/figures/{table_set}/losses.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m rapm --log {log} loss-curves --losses {input.losses} --out {output.png}"


# FID (and the toy's accuracy) of one variant's LoRA snapshots against training iteration.
rule curve:
    input:
        config="results/config/curves.yaml",
        row="results/config/rows/{variant}.yaml",
        snapshots="results/train/{variant}/snapshots.json",
        prompts="results/prompts/eval.csv",
    output:
        json="results/figures/curves/{variant}.json",
        png=report(
            "results/figures/curves/{variant}.png",
            caption="../report/curve.rst",
            category="Training",
            subcategory="{variant}",
        ),
    log:
        "logs/figures/curves/{variant}.log",
    benchmark:
        "logs/benchmarks/figures/curves/{variant}.tsv"
    priority: get_training_priority
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        gpu=1,
    shell:
        "python -m rapm --log {log} curve --config {input.config} --row {input.row} --snapshots {input.snapshots}"
        " --prompts {input.prompts} --out-json {output.json} --out-png {output.png}"
        " --threads {threads}"
