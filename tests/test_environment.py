"""The conda environment the rules name works the way Snakemake deploys it (`--sdm conda`).

conda itself is not installed here (and could not download packages offline), so these tests check
the parts that are ours: every rule names the environment file, Snakemake finds the post-deploy
script beside it, the file itself names nothing by a relative path (Snakemake copies it under
``.snakemake/conda/`` before conda reads it), and the post-deploy script, run as Snakemake runs it
(inside the new environment, from the directory snakemake runs in), installs the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "environment.yml"
POST_DEPLOY = ROOT / "environment.post-deploy.sh"


def rule_envs() -> dict[str, Path]:
    """Each rule with a ``conda:`` directive -> the file it names, resolved as Snakemake resolves it."""
    envs = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        rule = None
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"(?:local)?rule (\w+):", line):
                rule = m.group(1)
            if line.strip() == "conda:":
                envs[rule] = (smk.parent / lines[i + 1].strip().strip('"')).resolve()
    return envs


def shell_rules() -> set[str]:
    names = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=(?:local)?rule )", smk.read_text()):
            if (m := re.match(r"(?:local)?rule (\w+):", block)) and "\n    shell:" in block:
                names.add(m.group(1))
    return names


def test_every_shell_rule_names_the_project_environment():
    envs = rule_envs()
    assert shell_rules() and shell_rules() <= set(envs)
    assert set(envs.values()) == {ENV_FILE}


def test_snakemake_finds_the_post_deploy_script_beside_the_environment_file():
    # Snakemake's own rule (deployment/conda.py, Env._get_aux_file): the env file's name with its
    # .yaml/.yml suffix replaced by .post-deploy.sh.
    from snakemake.sourcecache import LocalSourceFile

    aux = LocalSourceFile(str(ENV_FILE)).replace_suffix([".yaml", ".yml"], ".post-deploy.sh")
    assert aux is not None and Path(aux.get_path_or_uri(secret_free=True)) == POST_DEPLOY and POST_DEPLOY.is_file()
    assert POST_DEPLOY.read_text().startswith("#!/usr/bin/env sh\n")  # the interpreter Snakemake uses


def test_environment_file_names_nothing_by_a_relative_path():
    env = yaml.safe_load(ENV_FILE.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert not pip, "a pip section would be read from .snakemake/conda/, where '.' is not the checkout"
    assert {"python=3.11", "pip"} <= set(env["dependencies"])
    requires = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert int(requires.group(1)) <= 11


def run_post_deploy(env_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run the script as Snakemake does: the environment's bin first on PATH, from ``cwd``; no index."""
    environ = {
        **os.environ,
        "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "VIRTUAL_ENV": str(env_dir),
    }
    environ.pop("PYTHONPATH", None)
    return subprocess.run(["sh", str(POST_DEPLOY)], cwd=cwd, env=environ, capture_output=True, text=True)


def test_post_deploy_installs_the_checkout_it_is_run_from(tmp_path):
    # A virtual environment stands in for the conda one; it sees this interpreter's packages, so the
    # dependencies are already there and pip needs no network (PIP_NO_INDEX).
    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    proc = run_post_deploy(env_dir, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = "import importlib.metadata as m, rapm; print(rapm.__file__); print(m.distribution('rapm').locate_file(''))"
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "rapm" / "__init__.py"
    # the distribution found first is the one in the environment (not this interpreter's own install)
    assert Path(out[1]).resolve().is_relative_to(env_dir.resolve()), out[1]


def test_post_deploy_refuses_a_directory_that_is_not_the_checkout(tmp_path):
    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    proc = run_post_deploy(env_dir, tmp_path)
    assert proc.returncode == 1
    assert f"{tmp_path} is not a rapm checkout" in proc.stderr and "snakemake --sdm conda" in proc.stderr
