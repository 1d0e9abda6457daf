"""Fault injection: every resumable stage killed (SIGKILL) at three or more points, then rerun.

One workflow copy runs the CI profile's ``rapm`` row straight through; another runs the same target
with a fault armed (``tests/faults/sitecustomize.py``: the n-th call of one function kills the job
before the call runs), once per fault in :data:`FAULTS`, each run picking up what the previous killed
runs left behind, then once more without a fault. Every file under ``results/`` must then equal the
straight run's byte for byte, except the timing fields of JSON records (:data:`TIMING_KEYS`) and a
trajectory shard's count of what its last invocation computed (:data:`RESUME_KEYS`), and Snakemake must have nothing left to do. A killed job is only ever resumed by a plain rerun: nothing
here deletes, repairs or forces anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from test_workflow import ROOT, copy_workflow, snakemake

TARGET = "results/eval/rapm/metrics.json"
# Small batches, so that each stage has several units of work to be killed between.
OVERRIDES = {"trajectories": {"batch_size": 1}, "sampling": {"batch_size": 5}}

# (what is killed, "<argv words> <module>:<function> <n>"): the n-th call in one process, before it runs.
FAULTS = [
    ("trajectories: before the first batch", "trajectories,compute rapm.trajectories:run_batch 1"),
    ("trajectories: after two of a shard's four batches", "trajectories,compute rapm.trajectories:run_batch 3"),
    ("trajectories: every batch written, before the shard summary", "trajectories,compute rapm.io:write_json 1"),
    ("train: iteration 2, before the first checkpoint", "train rapm.train:Trainer.run_iteration 3"),
    ("train: iteration 5, after the checkpoint at 4", "train rapm.train:Trainer.run_iteration 6"),
    ("train: while writing the last checkpoint", "train rapm.train:Trainer.save_checkpoint 1"),
    ("train: LoRA exported, before the validation grid and summary", "train rapm.train:Trainer.write_validation 1"),
    ("sample: before the second batch", "sample rapm.sample:generate 2"),
    ("sample: mid-batch, 12 of 20 PNGs written", "sample rapm.sample:_write_png 13"),
    ("sample: every PNG written, before the manifest", "sample pandas.core.generic:NDFrame.to_csv 1"),
    ("evaluate: images read, before the reader's scores", "evaluate rapm.protocol:Protocol.reader_scores 1"),
    ("evaluate: before the Fréchet distances", "evaluate rapm.evaluate:fd_replicates 1"),
    ("evaluate: every metric computed, before the metrics file", "evaluate rapm.io:write_json 1"),
]
# The only content allowed to differ between a straight run and a killed-and-resumed one: fields that
# record how long something took or how much memory it used, and a trajectory shard's record of what
# its last invocation did (it found some batches already done and computed the rest).
TIMING_KEYS = {
    "seconds",
    "wall_time_s",
    "wall_s",
    "compute_s",
    "seconds_per_iteration",
    "train_seconds_logged",
    "trajectories_per_s",
    "peak_rss_mb",
    "peak_cuda_mb",
}
RESUME_KEYS = {"computed", "already_done", "computed_runs"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS | RESUME_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _content(path: Path):
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_strip(json.loads(line)) for line in path.read_text().splitlines()]
    return path.read_bytes()


def _files(results: Path) -> set[str]:
    return {str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    dirs = {}
    for name in ("straight", "faulty"):
        wd = copy_workflow(base / name)
        (wd / "faults.yaml").write_text(yaml.safe_dump(OVERRIDES))
        dirs[name] = wd
    args = [TARGET, "--cores", "1", "--resources", "gpu=1", "--configfile", ".test/config/config.yaml", "faults.yaml"]
    snakemake(*args, cwd=dirs["straight"])
    fault_log = base / "fired.txt"
    fault_log.touch()
    outcomes = []
    for what, spec in FAULTS:
        env = {
            "RAPM_FAULT": spec,
            "RAPM_FAULT_LOG": str(fault_log),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")]),
        }
        proc = snakemake(*args, cwd=dirs["faulty"], check=False, env=env)
        fired = fault_log.read_text().splitlines()
        outcomes.append((what, spec, proc.returncode, fired[-1] if fired else None, proc.stdout + proc.stderr))
        fault_log.write_text("")
    final = snakemake(*args, cwd=dirs["faulty"], check=False)
    return dirs, outcomes, final, args


def test_every_fault_fires_and_stops_the_run(runs):
    _, outcomes, _, _ = runs
    for what, spec, rc, fired, output in outcomes:
        assert fired == f"{spec} #{spec.split()[-1]}", f"{what}: the fault did not fire\n{output[-3000:]}"
        assert rc != 0, f"{what}: the run did not stop"
        assert "Error in rule" in output, f"{what}: Snakemake did not report the killed job\n{output[-3000:]}"


def test_a_plain_rerun_after_every_kill_gives_the_straight_run_bytes(runs):
    dirs, _, final, args = runs
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    straight, faulty = dirs["straight"] / "results", dirs["faulty"] / "results"
    assert _files(faulty) == _files(straight)
    differ = [f for f in sorted(_files(straight)) if _content(straight / f) != _content(faulty / f)]
    assert not differ, f"differ from the straight run: {differ}"
    dry = snakemake(*args, "-n", cwd=dirs["faulty"])
    assert "Nothing to be done" in dry.stdout + dry.stderr
