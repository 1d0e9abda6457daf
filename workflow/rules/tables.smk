# The paper's tables from measured metrics, next to the published reference rows.


# Main, ablation and resources tables as Markdown, CSV and LaTeX.
rule tables:
    input:
        config="results/config/tables.yaml",
        metrics=get_all_metrics,
        summaries=get_all_train_summaries,
        trajectories=get_all_trajectory_manifests,
    output:
        main_md=report(
            "results/tables/main.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        main_csv="results/tables/main.csv",
        main_tex="results/tables/main.tex",
        ablations_md=report(
            "results/tables/ablations.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        ablations_csv="results/tables/ablations.csv",
        ablations_tex="results/tables/ablations.tex",
        resources_md=report(
            "results/tables/resources.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
        resources_csv="results/tables/resources.csv",
        resources_tex="results/tables/resources.tex",
    log:
        "logs/tables.log",
    benchmark:
        "benchmarks/tables.tsv"
    conda:
        "../../environment.yml"
    params:
        out_dir="results/tables",
    shell:
        "python -m rapm tables --config {input.config} --metrics {input.metrics}"
        " --train-summaries {input.summaries} --trajectory-manifests {input.trajectories}"
        " --out-dir {params.out_dir} > {log} 2>&1"
