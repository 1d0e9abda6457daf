"""Loss curves: names of runs, running means (against a plain loop), a deterministic PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rapm.cli import main
from rapm.errors import RapmError
from rapm.losscurves import read_losses, run_name, running_mean


def test_run_names_follow_the_train_layout():
    assert run_name("results/train/rapm/losses.jsonl") == "rapm"
    assert run_name("results/train/rapm-seed2/losses.jsonl") == "rapm-seed2"
    assert run_name("results/train/msd4/students/3/losses.jsonl") == "msd4/s3"


def test_running_mean_is_the_mean_of_the_last_window_values():
    x = np.random.default_rng(0).normal(size=57)
    ref = [x[max(0, i + 1 - 10) : i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(running_mean(x, 10), ref, rtol=1e-12)


def _log(path, n, seed):
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for step in range(n):  # D and G updates alternate, as the loss log records them
            rec = (
                {"d_rel": float(rng.random()), "d_abs": 2.0}
                if step % 2 == 0
                else {"g_rel": float(rng.random()), "reg": 0.5}
            )
            f.write(json.dumps({**rec, "step": step, "seconds": 0.1}) + "\n")
    return path


def test_loss_curves_png_is_deterministic_and_reports_the_last_means(tmp_path, capsys):
    a = _log((tmp_path / "train" / "rapm").mkdir(parents=True) or tmp_path / "train" / "rapm" / "losses.jsonl", 60, 0)
    b = _log((tmp_path / "train" / "n1").mkdir(parents=True) or tmp_path / "train" / "n1" / "losses.jsonl", 40, 1)
    series = read_losses(a)
    assert set(series) == {"d_rel", "d_abs", "g_rel", "reg"} and series["d_rel"].shape == (30, 2)
    assert main(["loss-curves", "--losses", str(a), str(b), "--out", str(tmp_path / "x.png"), "--window", "5"]) == 0
    out = capsys.readouterr().out
    expect = np.mean(series["g_rel"][-5:, 1])
    assert "rapm: d_rel" in out and f"g_rel {expect:.3f}" in out and "d_abs 2.000" in out and "n1:" in out
    png = (tmp_path / "x.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["loss-curves", "--losses", str(a), str(b), "--out", str(tmp_path / "y.png"), "--window", "5"]) == 0
    assert (tmp_path / "y.png").read_bytes() == png


def test_a_torn_log_is_named(tmp_path):
    path = tmp_path / "train" / "rapm" / "losses.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"d_rel": 1.0, "step": 0}\n{"d_rel": ')
    with pytest.raises(RapmError, match=r"losses\.jsonl, line 2: not a JSON record"):
        read_losses(path)
