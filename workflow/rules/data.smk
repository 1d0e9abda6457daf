# Data stage: COCO 2014 captions (or the toy dataset's captions) in, prompt sets out.


# Download (or take from data.coco.local_path) and verify the COCO 2014 captions.
rule fetch_coco_captions:
    input:
        config="results/config/fetch_coco.yaml",
    output:
        train="results/data/coco/captions_train2014.json",
        val="results/data/coco/captions_val2014.json",
    log:
        "logs/data/fetch_coco_captions.log",
    benchmark:
        "logs/benchmarks/data/fetch_coco_captions.tsv"
    priority: UPSTREAM_PRIORITY
    localrule: True  # on a cluster it runs on the login node: compute nodes often have no internet
    conda:
        "../../environment.yml"
    resources:
        network=1,
    params:
        out_dir=subpath(output.train, parent=True),
        cache_dir="resources/downloads",
    shell:
        "python -m rapm --log {log} fetch-coco --config {input.config} --out-dir {params.out_dir}"
        " --cache-dir {params.cache_dir}"


# Write the toy dataset's captions in the COCO captions schema.
rule make_toy_captions:
    input:
        config="results/config/toy_captions.yaml",
    output:
        train="results/data/toy/captions_train2014.json",
        val="results/data/toy/captions_val2014.json",
    log:
        "logs/data/make_toy_captions.log",
    benchmark:
        "logs/benchmarks/data/make_toy_captions.tsv"
    priority: UPSTREAM_PRIORITY
    conda:
        "../../environment.yml"
    params:
        out_dir=subpath(output.train, parent=True),
    shell:
        "python -m rapm --log {log} toy captions --config {input.config} --out-dir {params.out_dir}"


# Seeded selection of training prompts (train split) and evaluation prompts (val split).
rule make_prompt_sets:
    input:
        unpack(get_captions),
        config="results/config/prompts.yaml",
    output:
        train=report(
            "results/prompts/train.csv",
            category="Data",
            caption="../report/prompts_train.rst",
        ),
        eval=report(
            "results/prompts/eval.csv",
            category="Data",
            caption="../report/prompts_eval.rst",
        ),
        manifest="results/prompts/manifest.json",
    log:
        "logs/prompts/make_prompt_sets.log",
    benchmark:
        "logs/benchmarks/prompts/make_prompt_sets.tsv"
    priority: UPSTREAM_PRIORITY
    conda:
        "../../environment.yml"
    params:
        captions_dir=subpath(input.train, parent=True),
        out_dir=subpath(output.manifest, parent=True),
    shell:
        "python -m rapm --log {log} prompts --config {input.config} --captions-dir {params.captions_dir}"
        " --out-dir {params.out_dir}"
