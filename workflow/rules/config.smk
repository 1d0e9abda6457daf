# Per-stage config files: each CLI stage reads only the keys it needs.


# Write the keys one stage reads to results/config/<stage>.yaml; rules take that file as input.
rule stage_config:
    output:
        "results/config/{stage}.yaml",
    log:
        "logs/config/{stage}.log",
    priority: UPSTREAM_PRIORITY
    localrule: True
    params:
        values=get_stage_config,
    run:
        write_config_file(params["values"], output[0], log[0])


# The resolved config of one variant (variants/<name>: base sections + its overrides, the training
# job's input; students/<name>: the same for each student of an MSD variant), of one trajectory store (trajectories/<key>) or of one table row (rows/<name>).
rule named_config:
    output:
        "results/config/{kind}/{name}.yaml",
    log:
        "logs/config/{kind}/{name}.log",
    wildcard_constraints:
        kind="variants|students|trajectories|rows",
    priority: UPSTREAM_PRIORITY
    localrule: True
    params:
        values=get_named_config,
    run:
        write_config_file(params["values"], output[0], log[0])
