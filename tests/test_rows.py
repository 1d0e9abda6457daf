"""Tests of rapm.rows: the typed table row and its file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rapm.config import ConfigError, load_config
from rapm.plan import row_file, rows
from rapm.rows import Row

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def every():
    return rows(load_config([ROOT / "config" / "config.yaml"]), every=True)


def test_row_files_hold_exactly_the_keys_of_each_kind(every):
    assert every["teacher"].to_dict() == {
        "name": "teacher",
        "kind": "teacher",
        "steps": 40,
        "guidance": 6.0,
        "lora": None,
        "resolution": None,
    }
    assert every["rapm-seed1"].to_dict() == {
        "name": "rapm-seed1",
        "kind": "student",
        "steps": 4,
        "guidance": 1.0,
        "lora": "results/train/rapm-seed1/lora.safetensors",
        "resolution": None,
        "variant": "rapm",
        "replicate": 1,
        "init": "init-4step",
    }
    assert "replicate" not in every["rapm"] and every["rapm"]["init"] == "init-4step"
    msd = every["msd4"].to_dict()
    assert msd["lora"] is None and msd["router"] == "results/train/msd4/router.safetensors" and len(msd["loras"]) == 4


def test_a_row_reads_back_from_its_file_and_as_a_mapping(every, tmp_path):
    cfg = load_config([ROOT / "config" / "config.yaml"])
    for name in ("teacher", "init-1step", "n1-seed2", "msd4"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(row_file(cfg, name)))  # JSON is YAML
        back = Row.from_file(path)
        assert back == every[name] and dict(back) == every[name].to_dict() and {**back} == back.to_dict()
    assert every["msd4"].trained and every["rapm"].trained and not every["init-4step"].trained
    assert every["rapm"].workflow_inputs() == {"lora": "results/train/rapm/lora.safetensors"}
    assert set(every["msd4"].workflow_inputs()) == {"router", "loras"} and every["teacher"].workflow_inputs() == {}
    assert every["msd4"].weight_files()[-1] == "results/train/msd4/router.safetensors"


def test_an_msd_student_and_a_snapshot_are_rows_with_a_lora(every):
    student = every["msd4"].with_lora("s0.safetensors")
    assert (student.kind, student.lora, student.router, student.loras) == ("student", "s0.safetensors", None, None)
    snap = every["rapm"].with_lora("snap.safetensors")
    assert snap.kind == "student" and snap.init == "init-4step" and snap.name == "rapm"


def test_bad_rows_are_refused_naming_the_file_and_key(tmp_path):
    path = tmp_path / "row.yaml"
    path.write_text(json.dumps({"row": {"name": "x", "kind": "student", "steps": 4, "guidance": 1.0, "lorra": "a"}}))
    with pytest.raises(ConfigError, match=r"row.yaml: not a table row; unknown key\(s\) \['lorra'\]"):
        Row.from_file(path)
    path.write_text(json.dumps({"row": {"name": "x", "kind": "student", "steps": 4}}))
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['guidance'\]"):
        Row.from_file(path)
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="not a row file"):
        Row.from_file(path)
    with pytest.raises(ConfigError, match="kind 'studnet' is not one of"):
        Row("x", "studnet", 4, 1.0)
    with pytest.raises(ConfigError, match="an msd row needs router and loras"):
        Row("x", "msd", 4, 1.0)
