"""benchmarks/rule_times.py --timeline: job start/end from a Snakemake log, and how many jobs ran when."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rule_times", ROOT / "benchmarks" / "rule_times.py")
rule_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rule_times)

LOG = """Select jobs to execute...
[Sun Dec  6 21:30:27 2026]
localrule stage_config:
    output: results/config/prompts.yaml
    jobid: 22
[Sun Dec  6 21:30:28 2026]
Finished jobid: 22 (Rule: stage_config)
[Sun Dec  6 21:30:28 2026]
rule train_rapm:
    input: results/config/variants/n1.yaml
    jobid: 14
    benchmark: logs/benchmarks/train/n1.tsv
[Sun Dec  6 21:30:30 2026]
rule sample_images:
    jobid: 19
Shell command: python -m rapm sample
[Sun Dec  6 21:30:40 2026]
Finished jobid: 19 (Rule: sample_images)
[Sun Dec  6 21:31:28 2026]
Finished jobid: 14 (Rule: train_rapm)
"""


def test_timeline_pairs_each_job_with_its_own_start_and_end():
    df = rule_times.timeline(LOG)
    got = [(r.rule, r.job, r.start, r.end) for r in df.itertuples()]
    assert got == [("stage_config", 22, 0, 1), ("train_rapm", 14, 1, 61), ("sample_images", 19, 3, 13)]
    # second 0: one job; 1-2 and 13-60: one; 3-12: two side by side
    assert rule_times.occupancy(df) == {1: 51, 2: 10}
