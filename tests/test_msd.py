"""rapm.msd: the MSD partition and router (method.md §7), and students trained on their groups."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rapm.msd import Router, RouterError, group_sizes, partition_store, pooled_features


def features(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([6.0, 3.0] + [0.5] * (d - 2))  # PC1 = axis 0, PC2 = axis 1
    return rng.normal(size=(n, d)) * scales + 5.0


def test_pca_partition_is_balanced_and_follows_the_principal_components():
    x = features()
    router = Router.fit(x, 4, "pca")
    groups = router.assign(x)
    assert sorted(set(groups.tolist())) == [0, 1, 2, 3]
    # each bit splits the prompts at its median: exactly half on each side
    assert np.bincount(groups & 1).tolist() == [100, 100] and np.bincount(groups >> 1).tolist() == [100, 100]
    # bit 0 is the sign of the projection on PC1 (axis 0 here, the largest variance) around its median
    proj = (x - x.mean(0)) @ router.components[0]
    assert np.array_equal(groups & 1, (proj > np.median(proj)).astype(int))
    assert abs(router.components[0][0]) > 0.9
    two = Router.fit(x, 2, "pca").assign(x)
    assert group_sizes(two, 2) == [100, 100]


def test_router_round_trips_through_safetensors(tmp_path):
    x = features()
    for method, k in (("pca", 4), ("kmeans", 3)):
        router = Router.fit(x, k, method, seed=1)
        router.save(tmp_path / f"{method}.safetensors")
        again = Router.load(tmp_path / f"{method}.safetensors")
        assert again.method == method and again.num_groups == k
        assert np.array_equal(again.assign(x), router.assign(x))
    assert sorted(set(Router.fit(x, 3, "kmeans").assign(x).tolist())) == [0, 1, 2]


def test_bad_partitions_are_refused(tmp_path):
    with pytest.raises(RouterError, match="power-of-two"):
        Router.fit(features(), 3, "pca")
    with pytest.raises(RouterError, match="cannot split 2 prompts into 4"):
        Router.fit(features(2), 4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(RouterError, match="not a rapm router file"):
        Router.load(tmp_path / "bad.safetensors")


def test_pooled_features_use_sdxl_pooled_embedding_or_token_mean():
    import torch

    emb = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    np.testing.assert_allclose(pooled_features(emb), emb.mean(1).numpy())
    pooled = torch.ones(2, 5)
    assert pooled_features(emb, pooled).shape == (2, 5)


def test_students_train_on_their_groups_only(tiny_sd_dir, tmp_path):
    from test_train import build_store, make_cfg

    from rapm.train import train

    store = build_store(tmp_path / "data", tiny_sd_dir)
    info = partition_store(store, 2, "pca", 0, tmp_path / "msd")
    assert sorted(info["groups"][0] + info["groups"][1]) == [0, 1, 2, 3] and info["sizes"] == [2, 2]
    saved = json.loads((tmp_path / "msd" / "groups.json").read_text())
    assert saved["groups"] == info["groups"]
    train(
        make_cfg(tiny_sd_dir, iterations=4),
        store,
        tmp_path / "s0",
        tmp_path / "s0.state",
        subset=info["groups"][0],
        name="msd/s0",
    )
    log = [json.loads(x) for x in (tmp_path / "s0" / "losses.jsonl").read_text().splitlines()]
    assert all(set(r["trajectories"]) <= set(info["groups"][0]) for r in log)
    assert json.loads((tmp_path / "s0" / "summary.json").read_text())["name"] == "msd/s0"


def test_msd_sampling_with_one_teacher_equals_each_students_own_pipeline(tiny_sd_dir, tmp_path):
    """MSD rows load the teacher once and swap fused LoRAs; every image must equal the one its student's
    own freshly loaded pipeline gives (so no student's update leaks into the next)."""
    import pandas as pd
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_train import PROMPTS, build_store, make_cfg

    from rapm.manifests import read_row_images
    from rapm.sample import sample_shard
    from rapm.train import train

    store = build_store(tmp_path / "data", tiny_sd_dir)
    info = partition_store(store, 2, "pca", 0, tmp_path / "msd")
    loras = []
    for k in range(2):
        train(
            make_cfg(tiny_sd_dir, iterations=4, optim={"student_lr": 5e-2}),
            store,
            tmp_path / f"s{k}",
            tmp_path / f"s{k}.state",
            subset=info["groups"][k],
            name=f"msd/s{k}",
        )
        loras.append(str(tmp_path / f"s{k}" / "lora.safetensors"))
        # a few iterations move the images by about a pixel level; scale the updates up so that a
        # student's update left fused in the next student's pipeline changes its images visibly
        with safe_open(loras[-1], framework="pt") as f:
            meta = f.metadata()
        tensors = {n: t * 30 if "lora_B" in n else t for n, t in load_file(loras[-1]).items()}
        save_file(tensors, loras[-1], metadata=meta)
    prompts = tmp_path / "eval.csv"
    pd.DataFrame(
        {
            "prompt_id": range(4),
            "image_id": range(4),
            "caption_id": range(4),
            "caption": PROMPTS[:4],
            "file_name": [f"x{i}.jpg" for i in range(4)],
        }
    ).to_csv(prompts, index=False)
    teacher = {"path": str(tiny_sd_dir), "type": "auto", "dtype": "float32", "device": "cpu"}
    cfg = {"seed": 3, "num_images": None, "shards": 1, "batch_size": 1}
    msd = {
        "name": "msd",
        "kind": "msd",
        "steps": 4,
        "guidance": 1.0,
        "loras": loras,
        "router": str(tmp_path / "msd" / "router.safetensors"),
    }
    sample_shard(msd, teacher, cfg, prompts, 0, tmp_path / "msd-row", tmp_path / "msd-row.csv")
    images, table = read_row_images([tmp_path / "msd-row.csv"])
    assert sorted(set(table["group"])) == [0, 1]  # both students are used
    own = []
    for k, lora in enumerate(loras):
        row = {"name": f"s{k}", "kind": "student", "steps": 4, "guidance": 1.0, "lora": lora}
        sample_shard(row, teacher, cfg, prompts, 0, tmp_path / f"row{k}", tmp_path / f"row{k}.csv")
        own.append(read_row_images([tmp_path / f"row{k}.csv"])[0])
    # the students differ by far more than rounding, so a leaked update would show
    assert np.abs(own[0].astype(int) - own[1].astype(int)).max() > 20
    for i, k in enumerate(table["group"]):
        assert np.array_equal(images[i], own[k][i]), f"image {i} (student {k})"
