"""rapm verify: damaged cached outputs are found and, with --repair, their job's output is removed."""

import json

import numpy as np
from PIL import Image

from rapm.cli import main
from rapm.io import sha256_file


def _results(tmp_path):
    r = tmp_path / "results"
    shard = r / "samples" / "rapm"
    (shard / "shard-0" / "images").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(shard / "shard-0" / "images" / f"{i:06d}.png")
    (shard / "shard-0-of-1.csv").write_text("index,file\n0,shard-0/images/000000.png\n1,shard-0/images/000001.png\n")
    train = r / "train" / "rapm"
    train.mkdir(parents=True)
    (train / "lora.safetensors").write_bytes(b"weights")
    (train / "summary.json").write_text(
        json.dumps({"sha256": {"lora.safetensors": sha256_file(train / "lora.safetensors")}})
    )
    (r / "eval" / "rapm").mkdir(parents=True)
    (r / "eval" / "rapm" / "metrics.json").write_text("{}")
    return r


def test_intact_results_pass(tmp_path, capsys):
    r = _results(tmp_path)
    assert main(["verify", "--results", str(r)]) == 0
    assert "none damaged" in capsys.readouterr().out


def test_damage_is_reported_and_repair_removes_the_outputs_that_rerun_it(tmp_path, capsys):
    r = _results(tmp_path)
    (r / "samples/rapm/shard-0/images/000001.png").unlink()  # a deleted PNG
    (r / "train/rapm/lora.safetensors").write_bytes(b"weightz")  # a changed LoRA
    (r / "eval/rapm/metrics.json").write_text("{")  # a torn metrics file
    assert main(["verify", "--results", str(r)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 images missing or unreadable (first: shard-0/images/000001.png)" in out
    assert "sha256 differs" in out and "not valid JSON" in out and "--repair" in out
    assert (r / "samples/rapm/shard-0-of-1.csv").exists()  # without --repair nothing is removed
    assert main(["verify", "--results", str(r), "--repair"]) == 1
    assert not (r / "samples/rapm/shard-0-of-1.csv").exists()
    assert not (r / "train/rapm/lora.safetensors").exists() and (r / "train/rapm/summary.json").exists()
    assert not (r / "eval/rapm/metrics.json").exists()
    assert main(["verify", "--results", str(r)]) == 0  # what is left is intact (the removed outputs get rebuilt)
