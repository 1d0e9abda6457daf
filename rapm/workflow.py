"""What the Snakemake workflow needs from the package: stage keys and final targets.

Kept here (not in the .smk files) so it is importable, testable and the same for every profile.
"""

from __future__ import annotations

from typing import Mapping

# The config keys each CLI stage reads. The workflow writes exactly these to
# results/config/<stage>.yaml, so editing a key reruns the stages that read it and no other.
STAGE_KEYS: dict[str, list[str]] = {
    "fetch_coco": ["data.coco"],
    "toy_captions": ["data.toy"],
    "prompts": ["prompts"],
}


def stage_keys() -> dict[str, list[str]]:
    return STAGE_KEYS


def final_targets(config: Mapping) -> list[str]:
    """Every file ``rule all`` asks for under ``config``."""
    return [
        "results/prompts/train.csv",
        "results/prompts/eval.csv",
        "results/prompts/manifest.json",
    ]
