"""The Snakemake workflow: lint, formatting, a DAG for every profile, and the .test profile end to end."""

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CONFIGS = sorted((ROOT / "config").glob("*.yaml")) + [ROOT / ".test" / "config" / "config.yaml"]


def snakemake(*args, cwd=ROOT, check=True, env=None):
    """Run Snakemake in ``cwd``; ``env``: variables added to this process's environment."""
    proc = subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env}
    )
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
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_clean():
    """``ruff check`` with the rules of pyproject.toml's [tool.ruff] (pyflakes, import order) passes on the repo."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_clean():
    """``ruff format --check`` (pyproject.toml's [tool.ruff], line length 120): every Python file is formatted."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# the toy renderer and attribute reader are exempt from the function-length rule (issue #14)
LONG_FUNCTIONS_ALLOWED = {("rapm/toy/reader.py", "_read_chunk")}


def test_module_and_function_sizes():
    """No rapm module over 400 lines, no function over 60 lines outside the toy renderer/reader."""
    import ast

    too_long = []
    for path in sorted((ROOT / "rapm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60 and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_dry_run_builds_dag(config, tmp_path):
    proc = snakemake(
        "-n", "all", "--directory", str(tmp_path), "-s", str(ROOT / "Snakefile"), "--configfile", str(config)
    )
    assert "make_prompt_sets" in proc.stdout
    source = yaml.safe_load(config.read_text())["data"]["source"]
    expected = {"coco": "fetch_coco_captions", "toy": "make_toy_captions"}[source]
    assert expected in proc.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    proc = snakemake("-n", "all", "--config", "prompts={'num_tain': 3}", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "prompts.num_tain: unknown key" in err and "config/config.yaml" in err


def test_nested_config_values_get_their_schema_types(tmp_path):
    """--config 'train={iterations: 100}' (Snakemake passes 100 as a string) sets the integer 100."""
    wd = copy_workflow(tmp_path / "wd")
    snakemake(
        "results/config/variants/rapm.yaml",
        "--cores",
        "1",
        "--config",
        "train={iterations: 100, lora: {rank: 4}, optim: {student_lr: 1e-4}}",
        "run_variants=[rapm]",
        cwd=wd,
    )
    train = yaml.safe_load((wd / "results/config/variants/rapm.yaml").read_text())["train"]
    assert (train["iterations"], train["lora"]["rank"], train["optim"]["student_lr"]) == (100, 4, 1e-4)
    assert train["optim"]["disc_lr"] == 1e-3  # the rest of the section is kept
    proc = snakemake("-n", "all", "--config", "train={iterations: many}", cwd=wd, check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "train.iterations: 'many' is not of type 'integer'" in err
    assert "--config on the command line (train)" in err


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow files (not the package), as a user's checkout would hold them."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in [
        "Snakefile",
        "workflow",
        "config",
        "profiles",
        ".test",
        "environment.yml",
        "environment.post-deploy.sh",
    ]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def test_whole_dag_runs_end_to_end_and_caches(tmp_path):
    wd = copy_workflow(tmp_path)
    cfg = ".test/config/config.yaml"
    run = snakemake("all", "--cores", "1", "--resources", "gpu=1", "--configfile", cfg, cwd=wd)
    # The profile prints each shell job's command, and nothing for the run: jobs (the config writers).
    terminal = run.stdout + run.stderr
    assert "Shell command: python -m rapm" in terminal and "Shell command: None" not in terminal
    config_logs = sorted((wd / "logs/config").rglob("*.log"))
    assert config_logs and all(log.read_text().startswith("wrote results/config/") for log in config_logs)
    train = (wd / "results/prompts/train.csv").read_text().splitlines()
    evals = (wd / "results/prompts/eval.csv").read_text().splitlines()
    assert len(train) == 64 + 1 and len(evals) == 100 + 1
    assert json.loads((wd / "results/prompts/manifest.json").read_text())["seed"] == 2014

    # The whole DAG ran: a LoRA, one metrics file per row, the tables.
    assert (wd / "results/train/rapm/lora.safetensors").is_file()
    for row in ("teacher", "teacher-4step", "init-4step", "rapm"):
        metrics = json.loads((wd / f"results/eval/{row}/metrics.json").read_text())
        assert metrics["images"] == 40 and metrics["protocol"]["fid_features"] == "toyclip"
        assert metrics["accuracy"] is not None and 0 <= metrics["accuracy"]["colour"] <= 1
        assert ("teacher_distance" in metrics) is (row != "teacher") and "intervals" in metrics
    assert json.loads((wd / "results/eval/init-4step/metrics.json").read_text())["guidance"] == 1.0
    main_md = (wd / "results/tables/run/main.md").read_text()
    assert "RAPM: rapm" in main_md and "toy CLIP" in main_md and "published" in main_md
    assert "the student's initialisation" in main_md and "RMSE to teacher" in main_md
    ablations = (wd / "results/tables/run/ablations.csv").read_text().splitlines()
    assert "Δ vs init" in ablations[0] and "low" in ablations[0]
    assert (wd / "results/figures/run/grid.png").stat().st_size > 0
    curve = json.loads((wd / "results/figures/curves/rapm.json").read_text())
    assert [p["iteration"] for p in curve["points"]] == [0, 3, 6] and curve["images"] == 20
    snakemake("--report", "report.html", "--configfile", cfg, cwd=wd)
    report = (wd / "report.html").read_text(errors="replace")
    assert "main.md" in report and "grid.png" in report

    # A no-op rerun schedules nothing.
    assert planned_jobs("all", "--configfile", cfg, cwd=wd) == {}

    # Damage inside an output is invisible to Snakemake until `rapm verify --repair` removes that job's output.
    png = sorted((wd / "results/samples/rapm").glob("shard-*/images/*.png"))[3]
    png.unlink()
    assert planned_jobs("all", "--configfile", cfg, cwd=wd) == {}
    verify = [sys.executable, "-m", "rapm", "verify"]
    assert subprocess.run(verify, cwd=wd, capture_output=True, text=True).returncode == 1
    assert subprocess.run([*verify, "--repair"], cwd=wd, capture_output=True, text=True).returncode == 1
    assert planned_jobs("all", "--configfile", cfg, cwd=wd) == {
        "sample_images": 1,
        "evaluate": 1,
        "tables": 1,
        "comparison_grid": 1,
        "all": 1,
    }
    snakemake("all", "--cores", "1", "--resources", "gpu=1", "--configfile", cfg, cwd=wd)
    assert png.is_file() and subprocess.run(verify, cwd=wd).returncode == 0

    # Each job's log holds its output; the terminal got progress lines, not the log records.
    assert "rapm.train" in (wd / "logs/train/rapm.log").read_text()

    edited = yaml.safe_load((wd / cfg).read_text())

    def plan(change):
        data = json.loads(json.dumps(edited))
        change(data)
        (wd / "edited.yaml").write_text(yaml.safe_dump(data))
        return planned_jobs("all", "--configfile", "edited.yaml", cwd=wd)

    # A CLIP-only edit reruns the evaluations and tables: not the FID reference statistics, not the curves.
    jobs = plan(lambda d: d["evaluation"].setdefault("clip", {}).update(prefix="A photo depicts "))
    assert jobs == {"stage_config": 2, "evaluate": 4, "tables": 1, "all": 1}, jobs
    # An FID-only edit reruns the reference statistics, the evaluations, the curve and the tables.
    jobs = plan(lambda d: d["evaluation"]["fid"].update(resolutions=[32, 16]))
    assert jobs == {"stage_config": 4, "reference_stats": 1, "evaluate": 4, "tables": 1, "curve": 1, "all": 1}, jobs
    # A sampling-only edit resamples; no training, no trajectories, no reference statistics.
    jobs = plan(lambda d: d["sampling"].update(batch_size=10))
    assert jobs["sample_images"] == 8 and jobs["evaluate"] == 4, jobs
    assert not {"train_rapm", "precompute_trajectories", "reference_stats"} & set(jobs), jobs

    # Editing one variant's training reruns its training, sampling, evaluation and the tables only.
    jobs = plan(
        lambda d: d.setdefault("variants", {}).update(
            rapm={"description": "RAPM", "train": {"optim": {"student_lr": 5e-4}}}
        )
    )
    assert jobs == {
        "stage_config": 1,
        "named_config": 1,
        "train_rapm": 1,
        "sample_images": 2,
        "evaluate": 1,
        "tables": 1,
        "comparison_grid": 1,
        "curve": 1,
        "loss_curves": 1,
        "all": 1,
    }, jobs

    # Adding a variant adds only its jobs (training on the shared store, sampling, evaluation) and the tables.
    jobs = plan(lambda d: d.update(run_variants=["rapm", "rank4"]))
    assert jobs == {
        "stage_config": 1,
        "named_config": 2,
        "train_rapm": 1,
        "sample_images": 2,
        "evaluate": 1,
        "tables": 1,
        "comparison_grid": 1,
        "curve": 1,
        "loss_curves": 1,
        "all": 1,
    }, jobs

    # Editing the prompt selection reruns the data stage and everything after it.
    jobs = plan(lambda d: d["prompts"].update(seed=7))
    assert {"make_prompt_sets", "init_trajectories", "train_rapm", "sample_images", "evaluate", "tables"} <= set(jobs)
    assert "make_toy_captions" not in jobs


def test_two_jobs_side_by_side_give_the_same_bits_as_one_at_a_time(tmp_path):
    """The default profile runs two one-thread jobs at once; every artefact must equal a sequential run's."""
    cfg = ".test/config/config.yaml"
    target = ["results/eval/rapm/metrics.json", "results/eval/init-4step/metrics.json"]
    runs = {}
    for name, extra in (
        ("one", ["--cores", "1", "--resources", "gpu=1"]),
        ("two", ["--cores", "2", "--resources", "gpu=2"]),
    ):
        wd = copy_workflow(tmp_path / name)
        snakemake(*target, *extra, "--configfile", cfg, cwd=wd)
        runs[name] = wd
    files = [
        "results/train/rapm/lora.safetensors",
        *sorted(
            str(p.relative_to(runs["one"]))
            for p in (runs["one"] / "results/trajectories").rglob("*")
            if p.is_file() and "/c/" in p.as_posix()
        ),
    ]
    assert len(files) > 5
    for f in files:
        assert (runs["one"] / f).read_bytes() == (runs["two"] / f).read_bytes(), f
    for row in ("rapm", "init-4step"):
        a, b = (json.loads((runs[k] / f"results/eval/{row}/metrics.json").read_text()) for k in ("one", "two"))
        a.pop("wall_time_s"), b.pop("wall_time_s")
        assert a == b, row


def _captions(image_ids, prefix):
    return {
        "info": {},
        "licenses": [],
        "images": [{"id": i, "file_name": f"{prefix}_{i:012d}.jpg", "width": 640, "height": 480} for i in image_ids],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": f"{prefix} image {i} caption {k}"}
            for i in image_ids
            for k in range(2)
        ],
    }


@pytest.fixture
def coco_archive(tmp_path):
    """A small annotations_trainval2014.zip in the real layout, served from a file:// URL."""
    archive = tmp_path / "annotations_trainval2014.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/captions_train2014.json", json.dumps(_captions(range(1, 40), "train")))
        zf.writestr("annotations/captions_val2014.json", json.dumps(_captions(range(100, 130), "val")))
        zf.writestr("annotations/instances_val2014.json", "{}")
    return archive


def _coco_profile(wd, archive, sha256):
    cfg = yaml.safe_load((ROOT / "config" / "sd15.yaml").read_text())
    cfg["data"]["coco"].update(url=archive.as_uri(), sha256=sha256, retries=1)
    cfg["prompts"].update(num_train=10, num_eval=20)
    (wd / "coco.yaml").write_text(yaml.safe_dump(cfg))
    return "coco.yaml"


# The SD profiles' `all` needs SD weights and a GPU; the fetch tests stop at the prompt sets.
PROMPTS_TARGET = "results/prompts/manifest.json"


def test_fetch_rule_from_file_url(tmp_path, coco_archive):
    wd = copy_workflow(tmp_path / "wf")
    sha = hashlib.sha256(coco_archive.read_bytes()).hexdigest()
    profile = _coco_profile(wd, coco_archive, sha)
    snakemake(PROMPTS_TARGET, "--cores", "1", "--configfile", profile, cwd=wd)
    out = wd / "results/data/coco"
    with zipfile.ZipFile(coco_archive) as zf:
        assert (out / "captions_val2014.json").read_bytes() == zf.read("annotations/captions_val2014.json")
    evals = (wd / "results/prompts/eval.csv").read_text()
    assert "val image" in evals and "train image" not in evals


def test_fetch_rule_checksum_mismatch_leaves_nothing(tmp_path, coco_archive):
    wd = copy_workflow(tmp_path / "wf")
    profile = _coco_profile(wd, coco_archive, "0" * 64)
    proc = snakemake(PROMPTS_TARGET, "--cores", "1", "--configfile", profile, cwd=wd, check=False)
    assert proc.returncode != 0
    log = (wd / "logs/data/fetch_coco_captions.log").read_text()
    assert "SHA-256 mismatch" in log and "0" * 64 in log
    assert not list((wd / "results/data/coco").glob("*.json"))
    assert not list((wd / "resources/downloads").glob("*.zip"))


def test_fetch_rule_truncated_archive(tmp_path, coco_archive):
    wd = copy_workflow(tmp_path / "wf")
    data = coco_archive.read_bytes()
    coco_archive.write_bytes(data[: len(data) // 2])
    profile = _coco_profile(wd, coco_archive, None)
    proc = snakemake(PROMPTS_TARGET, "--cores", "1", "--configfile", profile, cwd=wd, check=False)
    assert proc.returncode != 0
    log = (wd / "logs/data/fetch_coco_captions.log").read_text()
    assert "annotations_trainval2014.zip" in log and "Traceback" not in log
    assert not (wd / "results/data/coco/captions_train2014.json").exists()


def _printed_commands() -> list[tuple[str, str]]:
    """(where, command) of every `snakemake ...` command the project prints: the shell blocks and inline
    code of README.md and docs/*.md, and the `#   snakemake ...` lines of the config, profile and Snakefile
    headers."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        where, text = str(doc.relative_to(ROOT)), doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                cmd = line.split("&&")[-1].split("#")[0].strip()
                if cmd.startswith("snakemake"):
                    out.append((where, cmd))
        for cmd in re.findall(r"`(snakemake [^`]*)`", text):
            if cmd != "snakemake --cores 1 --resources gpu=1 all":  # the README's example of the wrong order
                out.append((where, cmd))
    for path in [
        *(ROOT / "config").glob("*.yaml"),
        *(ROOT / "profiles").rglob("*.yaml"),
        ROOT / ".test/config/config.yaml",
        ROOT / "Snakefile",
    ]:
        for m in re.finditer(r"^#.*?(snakemake [^(\n]*)", path.read_text(), flags=re.M):
            out.append((str(path.relative_to(ROOT)), m.group(1).split("`")[0].split("  ")[0].strip()))
    return out


def test_every_command_the_project_prints_works_as_printed():
    """Dry-run each printed command exactly as written (plus -n): the target first, greedy options after."""
    commands = _printed_commands()
    assert len(commands) >= 8 and any(c == "snakemake all" for _, c in commands)
    for where, cmd in commands:
        args = shlex.split(cmd)[1:]  # as a shell reads it (quoted --config values stay one argument)
        if "--report" in args or "--lint" in args:
            continue  # not a run (the report needs a finished run; --lint has its own test)
        if "profiles/slurm" in cmd and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            continue  # the documented example profile needs its executor plugin
        if "--sdm" in args and shutil.which("conda") is None:
            continue  # conda environments need conda (tests/test_environment.py checks what is ours)
        proc = snakemake(*args, "-n", check=False)
        assert proc.returncode == 0, f"{where}: `{cmd}` fails:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
