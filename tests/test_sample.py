"""rapm.sample and rapm.evaluate: per-image seeds, resumable shards, the FID refusal, the metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rapm.manifests import read_row_images
from rapm.sample import SamplingError, sample_shard

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red circle", "a green triangle", "two yellow squares", "a blue square", "a big red square"]


@pytest.fixture(scope="module")
def eval_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "eval.csv"
    pd.DataFrame(
        {
            "prompt_id": range(5),
            "image_id": range(100, 105),
            "caption_id": range(5),
            "caption": PROMPTS,
            "file_name": [f"COCO_val2014_{100 + i:012d}.jpg" for i in range(5)],
        }
    ).to_csv(path, index=False)
    return path


def teacher_cfg(path):
    return {"path": str(path), "type": "auto", "dtype": "float32", "device": "cpu"}


ROW = {"name": "teacher-4step", "kind": "teacher", "steps": 4, "guidance": 5.0, "lora": None}


def sample_all(tmp, teacher_dir, eval_csv, shards, batch_size, row=ROW):
    cfg = {"seed": 3, "num_images": None, "shards": shards, "batch_size": batch_size}
    manifests = []
    for s in range(shards):
        m = tmp / f"shard-{s}-of-{shards}.csv"
        sample_shard(row, teacher_cfg(teacher_dir), cfg, eval_csv, s, tmp / f"shard-{s}", m)
        manifests.append(m)
    return manifests


def test_images_depend_only_on_seed_and_index(tiny_sd_dir, eval_csv, tmp_path):
    one = read_row_images(sample_all(tmp_path / "a", tiny_sd_dir, eval_csv, shards=1, batch_size=5))
    two = read_row_images(sample_all(tmp_path / "b", tiny_sd_dir, eval_csv, shards=2, batch_size=2))
    three = read_row_images(sample_all(tmp_path / "c", tiny_sd_dir, eval_csv, shards=3, batch_size=1))
    assert one[0].shape[0] == 5
    # batched CPU kernels round differently (~1e-5 in latents); decoded uint8 pixels agree to 1 level
    for other in (two, three):
        assert int(np.abs(one[0].astype(int) - other[0].astype(int)).max()) <= 1
        assert list(other[1]["seed"]) == [3 + i for i in range(5)] and list(other[1]["caption"]) == PROMPTS
    assert not np.array_equal(one[0][0], one[0][1])


def test_shard_resumes_missing_images_and_discards_stale_ones(tiny_sd_dir, eval_csv, tmp_path):
    sample_all(tmp_path, tiny_sd_dir, eval_csv, shards=1, batch_size=5)
    (tmp_path / "shard-0" / "images" / "000002.png").unlink()
    before = (tmp_path / "shard-0" / "images" / "000001.png").stat().st_mtime_ns
    sample_all(tmp_path, tiny_sd_dir, eval_csv, shards=1, batch_size=5)
    assert (tmp_path / "shard-0" / "images" / "000001.png").stat().st_mtime_ns == before  # kept
    again = (tmp_path / "shard-0" / "images" / "000002.png").read_bytes()
    assert len(again) > 0
    # other sampler settings: every image is redone
    sample_all(tmp_path, tiny_sd_dir, eval_csv, shards=1, batch_size=5, row={**ROW, "guidance": 1.0})
    assert (tmp_path / "shard-0" / "images" / "000001.png").stat().st_mtime_ns != before
    assert json.loads((tmp_path / "shard-0" / "settings.json").read_text())["guidance"] == 1.0


def test_missing_lora_is_named(tiny_sd_dir, eval_csv, tmp_path):
    row = {"name": "pcm", "kind": "external", "steps": 4, "guidance": 1.0, "lora": str(tmp_path / "pcm.safetensors")}
    with pytest.raises(SamplingError, match="pcm.safetensors: LoRA file not found"):
        sample_all(tmp_path, tiny_sd_dir, eval_csv, shards=1, batch_size=5, row=row)


def test_missing_image_is_reported(tiny_sd_dir, eval_csv, tmp_path):
    (m,) = sample_all(tmp_path, tiny_sd_dir, eval_csv, shards=1, batch_size=5)
    (tmp_path / "shard-0" / "images" / "000004.png").unlink()
    with pytest.raises(SamplingError, match="000004.png: image listed in its shard manifest is missing"):
        read_row_images([m])


def _toy_cfg(min_images=None, num_images=None):
    return {
        "profile": "t",
        "data": {"source": "toy", "toy": {"image_size": 32}},
        "sampling": {"seed": 3, "num_images": num_images},
        "evaluation": {
            "fid": {"features": "toyclip", "resolutions": [32], "inception_weights": None, "min_images": min_images},
            "clip": {"model": "rapm-toyclip", "pretrained": None, "prefix": ""},
            "reference": {"images_dir": None},
            "reader_accuracy": True,
        },
    }


@pytest.fixture(scope="module")
def toy_rows(tmp_path_factory):
    """A toy eval.csv of 12 prompts and a 'row' whose images are exactly the reference renders."""
    from PIL import Image

    from rapm.toy.captions import reference_image
    from rapm.toy.scene import caption, split_scenes

    d = tmp_path_factory.mktemp("toyrow")
    toy = {
        "seed": 0,
        "image_size": 32,
        "num_train_images": 10,
        "num_val_images": 12,
        "max_objects": 2,
        "holdout_pairs": ["red triangle"],
    }
    caps = [caption(s) for s in split_scenes(toy, "val", range(12))]
    csv = d / "eval.csv"
    pd.DataFrame(
        {
            "prompt_id": range(12),
            "image_id": range(12),
            "caption_id": range(12),
            "caption": caps,
            "file_name": [f"x{i}.png" for i in range(12)],
        }
    ).to_csv(csv, index=False)
    (d / "images").mkdir()
    for i, c in enumerate(caps):
        Image.fromarray(reference_image(c, i, 32)).save(d / "images" / f"{i:06d}.png")
    pd.DataFrame(
        {
            "index": range(12),
            "prompt_id": range(12),
            "image_id": range(12),
            "caption": caps,
            "seed": range(12),
            "file": [f"images/{i:06d}.png" for i in range(12)],
        }
    ).to_csv(d / "m.csv", index=False)
    return d, csv


def test_evaluate_row_metrics_and_refusal(toy_rows, tmp_path):
    from rapm.evaluate import compute_reference_stats, evaluate_row
    from rapm.metrics import MetricsError

    d, csv = toy_rows
    cfg = _toy_cfg()
    compute_reference_stats(cfg, csv, tmp_path / "ref.npz")
    row = {"name": "real", "kind": "teacher", "steps": 1, "guidance": 1.0, "lora": None}
    result = evaluate_row(cfg, row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "metrics.json")
    assert result["fid"]["32"] == pytest.approx(0.0, abs=1e-3)  # the images are the reference images
    assert result["accuracy"]["colour"] == 1.0 and result["images"] == 12
    assert json.loads((tmp_path / "metrics.json").read_text())["protocol"]["fid_features"] == "toyclip"
    with pytest.raises(MetricsError, match="12 images, the protocol asks for 13"):
        evaluate_row(_toy_cfg(min_images=13), row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "m2.json")
    other = _toy_cfg()
    other["evaluation"]["clip"]["prefix"] = "A photo depicts "  # CLIP only: the reference statistics still apply
    assert (
        evaluate_row(other, row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "m3.json")["fid"] == result["fid"]
    )
    other["evaluation"]["fid"]["resolutions"] = [16]
    with pytest.raises(MetricsError, match="reference statistics of another protocol"):
        evaluate_row(other, row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "m4.json")


def test_distance_to_the_teacher_from_the_same_noise_and_bootstrap_intervals(toy_rows, tmp_path):
    """A row shifted by 10 grey levels from the 'teacher' (the same images) is 10 levels away, and a row
    that IS the teacher is 0 away; intervals bracket the value, and the paired replicates make the
    difference of two rows significant exactly when it is."""
    from PIL import Image

    from rapm.evaluate import compute_reference_stats, evaluate_row

    d, csv = toy_rows
    cfg = _toy_cfg()
    cfg["evaluation"]["bootstrap"] = 50
    compute_reference_stats(cfg, csv, tmp_path / "ref.npz")
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    table = pd.read_csv(d / "m.csv")
    for f in table["file"]:
        img = np.asarray(Image.open(d / f)).astype(np.int16)
        (shifted / Path(f).parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img + 10, 0, 255).astype(np.uint8)).save(shifted / f)
    table.to_csv(shifted / "m.csv", index=False)
    row = {"name": "x", "kind": "student", "steps": 1, "guidance": 1.0, "lora": None, "init": "init-1step"}
    same = evaluate_row(
        cfg, row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "a.json", teacher_manifests=[d / "m.csv"]
    )
    off = evaluate_row(
        cfg, row, [shifted / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "b.json", teacher_manifests=[d / "m.csv"]
    )
    assert same["teacher_distance"]["rmse"] == 0.0 and same["teacher_distance"]["fd"] == pytest.approx(0.0, abs=1e-3)
    clipped = np.clip(np.stack([np.asarray(Image.open(d / f)) for f in table["file"]]).astype(np.int16) + 10, 0, 255)
    expected = np.sqrt(
        ((clipped - np.stack([np.asarray(Image.open(d / f)) for f in table["file"]])) ** 2).reshape(12, -1).mean(axis=1)
    ).mean()  # 10 levels except where white clips
    assert off["teacher_distance"]["rmse"] == pytest.approx(expected, rel=1e-9) and 5 < expected <= 10
    lo, hi = off["intervals"]["teacher_rmse"]
    assert lo <= off["teacher_distance"]["rmse"] <= hi and off["intervals"]["resamples"] == 50
    assert len(off["bootstrap_replicates"]["teacher_rmse"]) == 50 and same["init"] == "init-1step"
    from rapm.tables import _delta

    get = lambda m: m["teacher_distance"]["rmse"]  # noqa: E731
    assert _delta(off, same, get, "teacher_rmse").mark == "*"  # 0 vs ~9 levels on every image
    assert _delta(same, same, get, "teacher_rmse").mark == ""
    with pytest.raises(Exception, match="other prompts"):
        other = d / "reversed.csv"
        table.assign(caption=table["caption"][::-1].values).to_csv(other, index=False)
        evaluate_row(cfg, row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "c.json", teacher_manifests=[other])


def test_the_teacher_rows_feature_statistics_replace_encoding_its_images(toy_rows, tmp_path):
    """The teacher's evaluate job writes the statistics of its features (--stats-out); every other row
    reads them for its FD to the teacher and gets the same metrics, bit for bit; statistics of another
    protocol are refused."""
    from rapm.evaluate import compute_reference_stats, evaluate_row, read_fd_stats, save_feature_stats

    d, csv = toy_rows
    cfg = _toy_cfg()
    cfg["evaluation"]["bootstrap"] = 20
    compute_reference_stats(cfg, csv, tmp_path / "ref.npz")
    teacher = {"name": "teacher", "kind": "teacher", "steps": 2, "guidance": 3.0, "lora": None}
    evaluate_row(
        cfg, teacher, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "t.json", stats_out=tmp_path / "t.npz"
    )
    mu, sigma = read_fd_stats(tmp_path / "t.npz", cfg["evaluation"])
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (len(mu), len(mu))
    row = {"name": "x", "kind": "student", "steps": 1, "guidance": 1.0, "lora": None, "init": "init-1step"}
    common = (cfg, row, [d / "m.csv"], tmp_path / "ref.npz", csv)
    encoded = evaluate_row(*common, tmp_path / "a.json", teacher_manifests=[d / "m.csv"])
    read = evaluate_row(*common, tmp_path / "b.json", teacher_manifests=[d / "m.csv"], teacher_stats=tmp_path / "t.npz")
    encoded.pop("wall_time_s"), read.pop("wall_time_s")
    assert read == encoded and read["teacher_distance"]["fd"] == pytest.approx(0.0, abs=1e-3)
    # the statistics really are used: a teacher of other statistics gives another FD
    save_feature_stats(tmp_path / "shifted.npz", cfg["evaluation"], {32: (mu + 1.0, sigma)})
    moved = evaluate_row(
        *common, tmp_path / "c.json", teacher_manifests=[d / "m.csv"], teacher_stats=tmp_path / "shifted.npz"
    )
    assert moved["teacher_distance"]["fd"] > read["teacher_distance"]["fd"] + 1.0
    other = _toy_cfg()
    other["evaluation"]["fid"]["resolutions"] = [16]
    with pytest.raises(Exception, match="another protocol"):
        read_fd_stats(tmp_path / "t.npz", other["evaluation"])


def _stand_in_inception(directory: Path) -> Path:
    """A TorchScript module with clean-fid's Inception interface (``layers``: (B, 3, 299, 299) in [-1, 1] ->
    2048 features; ``forward(x, return_features)``), saved under clean-fid's file name: the real
    ``inception`` code path runs on it offline. Fixed weights: average colours of a 4 x 4 grid, mixed."""
    import torch
    from torch import nn

    from rapm.metrics import INCEPTION_FILE

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.proj = nn.Linear(48, 2048)

        def forward(self, x):
            return torch.tanh(self.proj(self.pool(x).flatten(1)))

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers((x - 128) / 128)

    torch.manual_seed(0)
    path = directory / INCEPTION_FILE
    torch.jit.script(StandIn().eval()).save(str(path))
    return path


def test_the_inception_fid_path_runs_end_to_end_on_a_stand_in_network(toy_rows, tmp_path):
    """SD profiles' protocol (Inception features, COCO-style reference images by file_name), with a
    stand-in network in clean-fid's format: reference statistics at two resolutions, FID of a row whose
    images are the references (0 at both), statistics that move with the images, refusal below min_images."""
    import shutil

    from PIL import Image

    from rapm.evaluate import compute_reference_stats, evaluate_row
    from rapm.metrics import MetricsError

    d, csv = toy_rows
    weights = _stand_in_inception(tmp_path)
    refs, shifted = tmp_path / "coco", tmp_path / "shifted"
    refs.mkdir(), shifted.mkdir()
    table = pd.read_csv(d / "m.csv")
    for i, f in enumerate(table["file"]):
        shutil.copy(d / f, refs / f"x{i}.png")  # eval.csv's file_name column names them
        img = np.asarray(Image.open(d / f)).astype(np.int16)
        Image.fromarray(np.clip(img - 60, 0, 255).astype(np.uint8)).save(shifted / f"x{i}.png")

    def cfg(images_dir, min_images=None):
        c = _toy_cfg(min_images=min_images)
        c["data"] = {"source": "coco"}
        c["evaluation"]["fid"].update(features="inception", resolutions=[32, 64], inception_weights=str(weights))
        c["evaluation"].update(reference={"images_dir": str(images_dir)}, reader_accuracy=False, bootstrap=0)
        return c

    info = compute_reference_stats(cfg(refs), csv, tmp_path / "ref.npz")
    compute_reference_stats(cfg(shifted), csv, tmp_path / "shifted.npz")
    assert info["images"] == 12 and info["resolutions"] == [32, 64]
    with np.load(tmp_path / "ref.npz") as ref, np.load(tmp_path / "shifted.npz") as moved:
        assert ref["mu_32"].shape == (2048,) and ref["sigma_64"].shape == (2048, 2048)
        assert not np.allclose(ref["mu_32"], ref["mu_64"])  # each resolution its own features
        assert np.abs(ref["mu_32"] - moved["mu_32"]).max() > 1e-2  # darker images, other features
    row = {"name": "real", "kind": "teacher", "steps": 1, "guidance": 1.0, "lora": None}
    result = evaluate_row(cfg(refs), row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "m.json")
    assert set(result["fid"]) == {"32", "64"} and result["accuracy"] is None
    assert result["fid"]["32"] == pytest.approx(0.0, abs=1e-6) and result["fid"]["64"] == pytest.approx(0.0, abs=1e-6)
    assert result["protocol"]["fid_features"] == "inception" and "Inception" in result["protocol"]["fid_code"]
    with pytest.raises(MetricsError, match="12 images, the protocol asks for 13"):
        evaluate_row(cfg(refs, 13), row, [d / "m.csv"], tmp_path / "ref.npz", csv, tmp_path / "m2.json")
