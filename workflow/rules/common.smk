# Helpers shared by all rules: config validation, stage configs, input functions, targets.
import json

from rapm.config import ConfigError, select_keys, validate
from rapm.workflow import final_targets, stage_keys

# Validate the merged config (config/config.yaml plus any --configfile / --config) before
# any job is scheduled; a typo fails here with the key and the file named.
try:
    config.update(
        validate(
            config,
            source=", ".join(str(f) for f in workflow.configfiles) or "<command line>",
        )
    )
except ConfigError as err:
    raise WorkflowError(str(err))


wildcard_constraints:
    stage="|".join(stage_keys()),


def get_stage_config(wildcards):
    """The config keys one stage reads, as canonical JSON (key order does not matter):
    a change to them, and only to them, reruns that stage."""
    return json.dumps(
        select_keys(config, stage_keys()[wildcards.stage]), sort_keys=True
    )


def get_captions(wildcards):
    """captions_{train,val}2014.json of the configured source (COCO or the toy dataset)."""
    folder = f"results/data/{config['data']['source']}"
    return {
        "train": f"{folder}/captions_train2014.json",
        "val": f"{folder}/captions_val2014.json",
    }


def get_final_targets():
    return final_targets(config)
