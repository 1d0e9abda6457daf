"""rapm.plan: variants deep-merged onto the base sections, shared trajectory stores, table rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from rapm.config import ConfigError, load_config
from rapm.plan import (
    final_targets,
    protocol_key,
    row_priority,
    rows,
    student_config,
    training_priority,
    trajectory_store_key,
    trajectory_stores,
    upstream_priority,
    variant_config,
    variant_names,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    return load_config([ROOT / "config" / "config.yaml"])


def test_variant_overrides_merge_onto_train_and_trajectories(cfg):
    base = variant_config(cfg, "rapm")
    rank4 = variant_config(cfg, "rank4")
    assert rank4["train"]["lora"] == {**base["train"]["lora"], "rank": 4, "alpha": 4.0}
    assert rank4["train"]["optim"] == base["train"]["optim"]  # untouched keys keep the base values
    assert variant_config(cfg, "m5")["trajectories"]["steps_per_slot"] == 5
    assert variant_config(cfg, "relative_only")["train"]["losses"]["lambda_abs"] == 0.0


def test_a_bad_override_fails_naming_the_variant(cfg):
    cfg["variants"]["typo"] = {"description": "x", "train": {"losess": {"lambda_rel": 0}}}
    with pytest.raises(ConfigError, match=r"variants\.typo\.train\.losess"):
        variant_config(cfg, "typo")
    cfg["run_variants"] = ["rapm", "nope"]
    with pytest.raises(ConfigError, match="run_variants names \\['nope'\\]"):
        variant_names(cfg)


def test_only_trajectory_changes_get_their_own_store(cfg):
    key = lambda name: trajectory_store_key({**cfg, **variant_config(cfg, name)})  # noqa: E731
    assert key("rank4") == key("rapm") == key("no_renoise") == key("msd4")
    assert len({key("rapm"), key("m5"), key("m25"), key("j250")}) == 4
    assert key("n1") == key("n2") == key("rapm")  # store_steps 4: sub-grids of the N = 4 store
    assert len(trajectory_stores(cfg)) == 1 and len(trajectory_stores(cfg, every=True)) == 4


def test_rows_cover_teachers_students_msd_and_external(cfg):
    cfg["sampling"]["external"] = [{"name": "pcm", "lora": "pcm.safetensors", "steps": 4, "guidance": 1.0}]
    r = rows(cfg)
    assert list(r) == [
        "teacher",
        "teacher-4step",
        "init-4step",
        "teacher-1step",
        "init-1step",
        "rapm",
        "broken",
        "n1",
        "pcm",
    ]
    assert (
        r["init-4step"]["guidance"] == 1.0 and r["init-4step"]["kind"] == "init" and r["rapm"]["init"] == "init-4step"
    )
    assert r["teacher"]["steps"] == 40 and r["teacher"]["guidance"] == cfg["trajectories"]["guidance"]
    assert r["rapm"]["guidance"] == 1.0 and r["rapm"]["lora"] == "results/train/rapm/lora.safetensors"
    every = rows(cfg, every=True)
    assert {"teacher-1step", "teacher-2step", "init-1step", "init-2step"} <= set(every) and every["n1"]["steps"] == 1
    assert every["n1"]["init"] == "init-1step"
    assert every["msd4"]["kind"] == "msd" and len(every["msd4"]["loras"]) == 4
    cfg["sampling"]["external"] = [{"name": "teacher", "lora": "x", "steps": 4, "guidance": 1.0}]
    with pytest.raises(ConfigError, match="reserved for the teacher rows"):
        rows(cfg)


def test_msd_students_share_the_iterations(cfg):
    assert student_config(cfg, "msd4")["train"]["iterations"] == cfg["train"]["iterations"] // 4
    targets = final_targets(cfg, every=True)
    assert "results/train/msd4/router.safetensors" in targets and "results/train/msd4/lora.safetensors" not in targets


def test_protocol_key_tracks_the_fid_protocol_only(cfg):
    """The reference statistics' key: FID keys, data, prompts and the number of images; not CLIP, not training."""
    before = protocol_key(cfg)
    cfg["train"]["iterations"] = 5
    assert protocol_key(cfg) == before
    cfg["evaluation"]["clip"]["prefix"] = "A photo depicts "
    assert protocol_key(cfg) == before  # the CLIP score does not use the reference statistics
    cfg["evaluation"]["fid"]["resolutions"] = [32, 16]
    assert protocol_key(cfg) != before


def test_job_priorities_start_the_longest_training_first(cfg):
    # UNet work per training job: iterations x N (an MSD student trains iterations / K)
    assert training_priority(cfg, "n1") == 9000 * 1
    assert training_priority(cfg, "rapm") == training_priority(cfg, "rapm-seed2") == 600 * 4
    assert training_priority(cfg, "n2") == 600 * 2
    assert training_priority(cfg, "msd4") == student_config(cfg, "msd4")["train"]["iterations"] * 4 == 600
    cfg["variants"]["n1"]["train"]["iterations"] = 100
    assert training_priority(cfg, "n1") == 100
    # the jobs every training waits for come before any training; teacher rows after every trained row
    top = upstream_priority(cfg)
    assert top == 1 + max(training_priority(cfg, v) for v in cfg["variants"]) == 2401
    table = rows(cfg)
    assert row_priority(cfg, table["rapm"]) == 2400 and row_priority(cfg, table["n1"]) == 100
    assert row_priority(cfg, table["teacher"]) == row_priority(cfg, table["init-4step"]) == 0
