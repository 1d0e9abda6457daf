"""Training replicates (seeds): names, configs, rows, and how the tables combine them."""

import numpy as np
import pytest

from rapm.config import ConfigError, load_config, validate
from rapm.plan import final_targets, rows, split_replicate, trained_variants, variant_config
from rapm.replicates import combine_replicates, group_replicates
from rapm.stats import bootstrap_indices, seed_replicates
from rapm.tableformat import _fmt, expand_intervals
from rapm.tables import _delta, build_tables


def _cfg(*overrides):
    return load_config(["config/config.yaml"], list(overrides))


def test_replicate_names_and_their_seeds():
    cfg = _cfg("replicates.every=3", "run_variants=[rapm, n1]")
    assert trained_variants(cfg) == ["rapm", "n1"]  # replicates.run = 1: the default run is unchanged
    every = trained_variants(cfg, every=True)
    assert every[:3] == ["rapm", "rapm-seed1", "rapm-seed2"] and len(every) == 3 * len(cfg["variants"])
    assert split_replicate("rapm-seed2") == ("rapm", 2) and split_replicate("rapm") == ("rapm", 0)
    assert split_replicate("m5") == ("m5", 0)
    base, rep = variant_config(cfg, "n1"), variant_config(cfg, "n1-seed2")
    assert rep["train"]["seed"] == base["train"]["seed"] + 2
    rep["train"]["seed"] = base["train"]["seed"]
    assert rep == base  # nothing else differs
    r = rows(cfg, every=True)
    assert r["n1-seed2"]["variant"] == "n1" and r["n1-seed2"]["replicate"] == 2
    assert r["n1-seed2"]["init"] == "init-1step" and "replicate" not in r["n1"]
    assert "results/train/msd4-seed1/router.safetensors" in final_targets(cfg, every=True)
    assert "results/figures/curves/rapm-seed1.png" not in final_targets(cfg, every=True)  # curves: replicate 0 only
    with pytest.raises(ConfigError, match="unknown variant"):
        variant_config(cfg, "typo-seed1")


def test_a_variant_name_that_looks_like_a_replicate_is_refused():
    cfg = _cfg()
    cfg["variants"]["rapm-seed1"] = {"description": "clashes with replicate 1 of rapm"}
    with pytest.raises(ConfigError, match="rapm-seed1"):
        validate(cfg)


def test_seed_replicates_resample_seeds_and_keep_the_image_pairing():
    rng = np.random.default_rng(0)
    one = rng.normal(size=200)
    assert np.array_equal(seed_replicates([one]), one)  # one seed: its own replicates
    # three seeds whose means differ by far more than the image spread: the two-level interval is wide
    per_seed = [0.01 * rng.normal(size=400) + mu for mu in (0.0, 1.0, 2.0)]
    mean = seed_replicates(per_seed)
    assert mean.shape == (400,) and abs(mean.mean() - 1.0) < 0.1
    assert abs(mean.std() - np.sqrt(2 / 9)) < 0.04  # a mean of 3 draws with replacement from {0, 1, 2}: var (2/3) / 3
    assert np.array_equal(mean, seed_replicates(per_seed))  # seeded: the same tables every time
    assert bootstrap_indices(5, 3).shape == (3, 5)


def _row(name, value, spread=0.01, kind="student", seed=0):
    reps = list(value + spread * np.random.default_rng(seed).normal(size=200))
    return {
        "row": name,
        "kind": kind,
        "steps": 4,
        "guidance": 1.0,
        "images": 400,
        "init": "init-4step",
        "fid": {"32": value},
        "teacher_distance": {"rmse": 10 * value, "fd": value},
        "clip_score": 20.0,
        "accuracy": {"all": value},
        "bootstrap_replicates": {"fid_32": reps, "accuracy_all": reps},
        "intervals": {
            "level": 0.95,
            "resamples": 200,
            "fid_32": [min(reps), max(reps)],
            "accuracy_all": [min(reps), max(reps)],
        },
    }


def test_combined_row_has_the_mean_the_sd_over_seeds_and_a_wider_interval():
    group = [_row("rapm", 0.50, seed=1), _row("rapm-seed1", 0.60, seed=2), _row("rapm-seed2", 0.70, seed=3)]
    m = combine_replicates(group, "rapm")
    assert m["row"] == "rapm" and m["seeds"] == 3
    assert m["accuracy"]["all"] == pytest.approx(0.60) and m["teacher_distance"]["rmse"] == pytest.approx(6.0)
    assert m["seed_sd"]["accuracy_all"] == pytest.approx(0.10)
    lo, hi = m["intervals"]["accuracy_all"]
    assert lo < 0.55 and hi > 0.65  # the seed spread (sd 0.1) is in it, not only the image spread (0.01)
    text = _fmt(Value_of(m))
    assert text.startswith("0.600 ± 0.100 (")
    # grouping keeps teacher rows and merges the replicates in first-appearance order
    merged = group_replicates([_row("teacher", 0.9, kind="teacher"), *group, _row("n1", 0.3)])
    assert [r["row"] for r in merged] == ["teacher", "rapm", "n1"] and merged[2]["seeds"] == 1


def Value_of(m):
    from rapm.tables import _with_interval

    return _with_interval(m, m["accuracy"]["all"], "accuracy_all")


def test_delta_between_seed_means_is_significant_only_beyond_the_seed_spread():
    get = lambda m: m["accuracy"]["all"]  # noqa: E731
    init = _row("init-4step", 0.40, kind="init", seed=9)
    tight = combine_replicates(
        [_row("a", 0.60, seed=1), _row("a-seed1", 0.61, seed=2), _row("a-seed2", 0.62, seed=3)], "a"
    )
    loose = combine_replicates(
        [_row("b", 0.30, seed=4), _row("b-seed1", 0.58, seed=5), _row("b-seed2", 0.95, seed=6)], "b"
    )
    assert _delta(tight, init, get, "accuracy_all").mark == "*"  # +0.21, seeds agree
    d = _delta(loose, tight, get, "accuracy_all")
    assert float(d) == pytest.approx(0.0, abs=0.01) and d.mark == ""  # same mean, seed spread 0.33: not significant
    d = _delta(loose, init, get, "accuracy_all")
    assert float(d) > 0.2 and d.lo < 0 and d.mark == ""  # a big mean difference, but one seed is below init


def test_tables_show_seeds_and_sd_columns():
    cfg = _cfg()
    metrics = [
        _row("teacher", 0.9, kind="teacher"),
        _row("init-4step", 0.4, kind="init"),
        _row("rapm", 0.5, seed=1),
        _row("rapm-seed1", 0.6, seed=2),
        _row("rapm-seed2", 0.7, seed=3),
    ]
    for m in metrics:
        m["protocol"] = {"images": 400, "prompts": "eval.csv"}
    tables = build_tables(cfg, metrics, [], [])
    main, notes, _ = tables["main"]
    assert list(main["seeds"]) == [None, None, 3]
    assert any("mean over 3 training seeds" in n for n in notes)
    csv = expand_intervals(tables["ablations"][0])
    assert list(csv["accuracy sd over seeds"]) == [pytest.approx(0.1)]
    assert bool(csv["accuracy: Δ vs init significant"][0])


def test_study_parts_build_each_variants_replicates_and_its_reference_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", "benchmarks/study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    cfg = _cfg()
    assert list(study.study_rows(cfg, ["n1"])) == [
        "teacher",
        "teacher-1step",
        "init-1step",
        "n1",
        "n1-seed1",
        "n1-seed2",
    ]
    names = list(study.study_rows(cfg, ["absolute_only", "rapm"]))
    assert names.index("rapm") < names.index("absolute_only")  # the workflow's order: rapm is the Δ base
