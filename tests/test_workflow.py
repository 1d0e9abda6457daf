"""The Snakemake workflow: lint, formatting, a DAG for every profile, and the .test profile end to end."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CONFIGS = sorted((ROOT / "config").glob("*.yaml")) + [ROOT / ".test" / "config" / "config.yaml"]


def snakemake(*args, cwd=ROOT, check=True):
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(*args, cwd):
    """rule -> count of the jobs a dry run would execute."""
    out = snakemake("-n", "--quiet", "rules", *args, cwd=cwd).stdout
    jobs = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_snakefmt_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_dry_run_builds_dag(config, tmp_path):
    proc = snakemake("-n", "--configfile", str(config), "--directory", str(tmp_path), "-s",
                     str(ROOT / "Snakefile"), "all")
    assert "make_prompt_sets" in proc.stdout
    source = yaml.safe_load(config.read_text())["data"]["source"]
    expected = {"coco": "fetch_coco_captions", "toy": "make_toy_captions"}[source]
    assert expected in proc.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    proc = snakemake("-n", "all", "--config", "prompts={'num_tain': 3}", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "prompts.num_tain: unknown key" in err and "config/config.yaml" in err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow (not the package) where the .test profile runs for real."""
    wd = tmp_path_factory.mktemp("wf")
    for name in ["Snakefile", "workflow", "config", "profiles", ".test"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, wd / name, symlinks=True)
    return wd


def test_whole_dag_runs_end_to_end(workdir):
    snakemake("--cores", "1", "--resources", "gpu=1", "--configfile", ".test/config/config.yaml",
              "all", cwd=workdir)
    train = (workdir / "results/prompts/train.csv").read_text().splitlines()
    evals = (workdir / "results/prompts/eval.csv").read_text().splitlines()
    assert len(train) == 64 + 1 and len(evals) == 100 + 1
    # Nothing left to do on a rerun.
    assert planned_jobs("--configfile", ".test/config/config.yaml", "all", cwd=workdir) == {}


def test_editing_one_key_reruns_only_what_reads_it(workdir):
    test_cfg = workdir / ".test/config/config.yaml"
    if not (workdir / "results/prompts/manifest.json").exists():
        pytest.skip("needs the end-to-end run")
    cfg = yaml.safe_load(test_cfg.read_text())
    cfg["prompts"]["seed"] = 7
    edited = workdir / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs("--configfile", str(edited), "all", cwd=workdir)
    assert jobs == {"stage_config": 1, "make_prompt_sets": 1, "all": 1}
