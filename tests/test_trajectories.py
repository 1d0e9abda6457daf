"""rapm.trajectories: the teacher-trajectory store (method.md §1), its shards, gather, reader and rules.

Tiny random-weight SD1.5/SDXL teachers (conftest), a grid of N = 4 coarse steps with M = 2 fine steps per
slot, guidance 7.5, six prompts. The oracle for the stored states is the diffusers pipeline itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rapm import store as TS
from rapm import trajectories as T
from rapm.cli import main
from rapm.conditioning import encode_prompts
from rapm.plan import trajectory_store_key
from rapm.schedule import coarse_timesteps, ddim_sample, delta_timesteps, fine_timesteps
from rapm.shards import shard_range
from rapm.teacher import decode_latents, unet_eps

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle",
    "two yellow squares",
    "NA",
    "a small blue circle on the left",
    "a big red triangle, and a green square",
]
CFG = dict(
    num_steps=4,
    steps_per_slot=2,
    guidance=7.5,
    num_trajectories=None,
    seed=11,
    resolution=None,
    shards=1,
    batch_size=2,
    trajectories_per_chunk=1,
)
STATE_ARRAYS = ("coarse", "delta", "prompt_embeds", "pooled_embeds", "add_time_ids")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """train.csv (the data stage's columns) and a manifest.json holding its SHA-256, as the data stage writes."""
    d = tmp_path_factory.mktemp("prompts")
    rows = "".join(f'{i},{100 + i},{1000 + i},"{p}",COCO_train2014_{100 + i:012d}.jpg\n' for i, p in enumerate(PROMPTS))
    data = ("prompt_id,image_id,caption_id,caption,file_name\n" + rows).encode()
    (d / "train.csv").write_bytes(data)
    manifest = {"outputs": {"train.csv": {"rows": len(PROMPTS), "sha256": hashlib.sha256(data).hexdigest()}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d / "train.csv", d / "manifest.json"


@pytest.fixture(params=["sd15", "sdxl"])
def kind(request):
    return request.param


def teacher_of(request, kind):
    return request.getfixturevalue("sd_teacher" if kind == "sd15" else "sdxl_teacher")


def teacher_cfg(teacher):
    return {"path": teacher.source, "type": "auto", "dtype": "float32", "device": "cpu"}


def build(directory, teacher, prompt_files, *, only=None, **overrides):
    """init + every shard + gather; returns the gathered manifest. ``only``: run just these shards, no gather."""
    cfg = {**CFG, **overrides}
    tc = teacher_cfg(teacher)
    T.init_store(directory, tc, cfg, *prompt_files, key="test", teacher=teacher)
    summaries = []
    for s in range(cfg["shards"]) if only is None else only:
        summary = T.compute_shard(directory, tc, cfg, s, teacher=teacher, progress=False)
        path = Path(directory) / "shards" / f"{s}-of-{cfg['shards']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary))
        summaries.append(path)
    if only is not None:
        return None
    return T.gather(directory, summaries, Path(directory) / "manifest.json")


def arrays(directory):
    import zarr

    group = zarr.open_group(TS.store_path(directory), mode="r")
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}


@pytest.fixture(scope="module")
def sd_store(sd_teacher, prompt_files, tmp_path_factory):
    """A gathered SD1.5 store: six trajectories, batch size 2, one shard."""
    directory = tmp_path_factory.mktemp("sd-store")
    manifest = build(directory, sd_teacher, prompt_files)
    return directory, manifest


# --- contents --------------------------------------------------------------------------------------


def test_store_layout_and_attributes(sd_store, sd_teacher, prompt_files):
    directory, manifest = sd_store
    a = arrays(directory)
    J, N, M = len(PROMPTS), CFG["num_steps"], CFG["steps_per_slot"]
    assert a["coarse"].shape == (J, N + 1, 4, 8, 8) and a["delta"].shape == (J, N, 4, 8, 8)
    assert a["prompt_embeds"].shape == (J, 77, 32) and "pooled_embeds" not in a and "add_time_ids" not in a
    assert a["coarse"].dtype == a["delta"].dtype == a["prompt_embeds"].dtype == np.float32
    assert a["seed"].tolist() == [11 + j for j in range(J)] and a["done"].tolist() == [1] * J
    assert a["prompt_id"].tolist() == list(range(J)) and a["prompt"].tolist() == PROMPTS  # "NA" stays a string

    import zarr

    group = zarr.open_group(TS.store_path(directory), mode="r")
    assert all(group[n].chunks[0] == 1 and group[n].chunks[1:] == group[n].shape[1:] for n in a)
    root = json.loads((TS.store_path(directory) / "zarr.json").read_text())
    assert set(root["consolidated_metadata"]["metadata"]) == set(a)  # consolidated by gather
    attrs = dict(group.attrs)
    assert attrs["complete"] and attrs["format"] == "rapm-trajectories"
    assert attrs["teacher"]["path"] == sd_teacher.source and attrs["teacher"]["dtype"] == "float32"
    assert attrs["teacher"]["weights_sha256"] == TS.weights_sha256(sd_teacher)["all"]
    assert set(attrs["teacher"]["component_sha256"]) == {"unet", "text_encoder", "vae", "all"}
    assert attrs["scheduler"]["timestep_spacing"] == "trailing" and attrs["scheduler"]["set_alpha_to_one"] is False
    assert (attrs["num_steps"], attrs["steps_per_slot"], attrs["guidance"]) == (N, M, 7.5)
    assert attrs["coarse_timesteps"] == [999, 749, 499, 249, 0] and attrs["delta_timesteps"] == [874, 624, 374, 124]
    assert attrs["prompts"]["manifest_sha256"] == hashlib.sha256(prompt_files[1].read_bytes()).hexdigest()
    assert {"torch", "diffusers", "transformers", "zarr", "numpy", "rapm"} <= set(attrs["versions"])
    assert attrs["machine"]["cpu"] and manifest["machine"] == attrs["machine"]  # the CPU kind picks the last bits
    assert manifest["arrays"]["coarse"]["sha256"] == attrs["content_sha256"]["coarse"]

    # z̃_N is each trajectory's own seeded noise; the conditioning is the teacher's, bitwise.
    for j in range(J):
        assert torch.equal(torch.from_numpy(a["coarse"][j, 0]), T.initial_noise(11 + j, (4, 8, 8))[0])
    assert torch.equal(torch.from_numpy(a["prompt_embeds"][:2]), encode_prompts(sd_teacher, PROMPTS[:2]).prompt_embeds)


def test_states_are_the_fine_runs_coarse_and_delta_states(sd_store, sd_teacher):
    # Rerun the first batch (trajectories 0, 1) keeping EVERY fine state: the store holds exactly those at
    # fine[k*M] (coarse) and fine[k*M + 1] (Δ: first fine state after each boundary), bitwise.
    directory, _ = sd_store
    a = arrays(directory)
    fine = fine_timesteps(4, 2)
    cond = encode_prompts(sd_teacher, PROMPTS[:2])
    z = torch.cat([T.initial_noise(11 + j, (4, 8, 8)) for j in range(2)])
    with torch.no_grad():
        _, kept = ddim_sample(
            lambda x, t: unet_eps(sd_teacher, x, t, cond, 7.5), z, fine, sd_teacher.alphas_cumprod, keep=fine
        )
    for n, t in enumerate(coarse_timesteps(4)):
        assert torch.equal(torch.from_numpy(a["coarse"][:2, n]), kept[t]), t
    for n, t in enumerate(delta_timesteps(4, 2)):
        assert t == fine[2 * n + 1] and torch.equal(torch.from_numpy(a["delta"][:2, n]), kept[t]), t
    # Canary: tiny random teacher (seeded init) + this grid; changes if the maths or versions change.
    assert abs(float(a["coarse"][:, -1].sum(dtype=np.float64)) - COARSE_FINAL_SUM) < 1e-2


COARSE_FINAL_SUM = 803.3988


def test_final_state_equals_the_diffusers_pipeline(request, kind, prompt_files, tmp_path):
    # Same prompt, seed (the pipeline draws the noise itself from generator(seed_j)), guidance and N·M steps.
    # Stored with batch size 2: batched kernels round differently from the pipeline's batch of 1, so the
    # latents agree to 1e-4 (measured <= 2e-6) and the decoded images to 1e-4; with batch size 1, bitwise.
    teacher = teacher_of(request, kind)
    build(tmp_path / "b2", teacher, prompt_files)
    build(tmp_path / "b1", teacher, prompt_files, batch_size=1)
    b2, b1 = arrays(tmp_path / "b2"), arrays(tmp_path / "b1")
    for j in (0, 3):
        with torch.no_grad():
            out = {
                kind_: teacher.pipe(
                    PROMPTS[j],
                    num_inference_steps=8,
                    guidance_scale=7.5,
                    output_type=kind_,
                    generator=torch.Generator().manual_seed(11 + j),
                ).images
                for kind_ in ("latent", "pt")
            }
        final = torch.from_numpy(b2["coarse"][j, -1])[None]
        assert (final - out["latent"]).abs().max().item() < 1e-4
        assert (decode_latents(teacher, final) - out["pt"]).abs().max().item() < 1e-4
        assert torch.equal(torch.from_numpy(b1["coarse"][j, -1])[None], out["latent"])


def test_sdxl_conditioning_is_stored(sdxl_teacher, prompt_files, tmp_path):
    manifest = build(tmp_path, sdxl_teacher, prompt_files, batch_size=3, trajectories_per_chunk=3)
    a = arrays(tmp_path)
    cond = encode_prompts(sdxl_teacher, PROMPTS[:3])
    assert a["prompt_embeds"].shape == (6, 77, 64) and a["pooled_embeds"].shape == (6, 32)
    assert a["add_time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 6  # original size, crop (0, 0), target size
    assert torch.equal(torch.from_numpy(a["pooled_embeds"][:3]), cond.pooled_embeds)
    assert torch.equal(torch.from_numpy(a["prompt_embeds"][:3]), cond.prompt_embeds)
    assert manifest["arrays"]["coarse"]["shape"] == [6, 5, 4, 8, 8]
    item = TS.TrajectoryDataset(tmp_path)[4]
    assert item["pooled_embeds"].shape == (32,) and item["add_time_ids"].tolist() == [16, 16, 0, 0, 16, 16]


# --- determinism ----------------------------------------------------------------------------------


def test_shard_count_does_not_change_a_bit(sd_store, sd_teacher, prompt_files, tmp_path):
    one, _ = sd_store
    four = tmp_path / "four"  # 3 batches of 2 over 4 shards: one shard is empty, none splits a batch
    manifest = build(four, sd_teacher, prompt_files, shards=4)
    a1, a4 = arrays(one), arrays(four)
    for name in a1:
        assert np.array_equal(a1[name], a4[name]), name
    assert [s["range"] for s in manifest["shards"]] == [[0, 0], [0, 2], [2, 4], [4, 6]]

    # A shard writes only its own index range (whole chunks): run shard 1 of 3 alone.
    alone = tmp_path / "alone"
    build(alone, sd_teacher, prompt_files, only=[1], shards=3)
    root = TS.store_path(alone) / "coarse" / "c"
    chunks = sorted(int(p.relative_to(root).parts[0]) for p in root.glob("*/0/0/0/0"))
    assert chunks == [2, 3]
    assert arrays(alone)["done"].tolist() == [0, 0, 1, 1, 0, 0]


def test_batch_size_changes_states_only_at_rounding_level(sd_store, sd_teacher, prompt_files, tmp_path):
    # Noise, seeds, prompts and text embeddings are bitwise the same for any batch size; the UNet is not
    # bitwise batch-invariant on CPU (see rapm.trajectories), so states agree to 1e-4 (measured ~1e-6).
    ref = arrays(sd_store[0])
    for b in (1, 4):
        build(tmp_path / f"b{b}", sd_teacher, prompt_files, batch_size=b)
        other = arrays(tmp_path / f"b{b}")
        for name in ("seed", "prompt_id", "prompt", "prompt_embeds", "done"):
            assert np.array_equal(ref[name], other[name]), name
        assert np.array_equal(ref["coarse"][:, 0], other["coarse"][:, 0])
        for name in ("coarse", "delta"):
            assert np.abs(ref[name] - other[name]).max() < 1e-4, (b, name)


def test_shards_are_aligned_to_batches_and_chunks():
    for J in range(1, 23):
        for S in range(1, 6):
            for unit in (1, 2, 3, 4, 6):
                ranges = [shard_range(J, S, s, unit) for s in range(S)]
                assert ranges[0][0] == 0 and ranges[-1][1] == J
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                assert all(start % unit == 0 for start, stop in ranges if start < J)
    with pytest.raises(ValueError):
        shard_range(5, 2, 2, 1)


# --- resume ----------------------------------------------------------------------------------------


def test_resume_after_a_limit_computes_only_the_rest(sd_store, sd_teacher, prompt_files, tmp_path):
    cfg, tc = {**CFG, "batch_size": 1}, teacher_cfg(sd_teacher)
    T.init_store(tmp_path, tc, cfg, *prompt_files, teacher=sd_teacher)
    first = T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, max_trajectories=2, progress=False)
    assert (first["computed"], first["remaining"], first["computed_runs"]) == (2, 4, [[0, 2]])
    assert arrays(tmp_path)["done"].tolist() == [1, 1, 0, 0, 0, 0]
    assert T.init_store(tmp_path, tc, cfg, *prompt_files, teacher=sd_teacher)["action"] == "kept"  # a rerun of init
    second = T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, progress=False)
    assert (second["already_done"], second["computed"], second["computed_runs"], second["remaining"]) == (
        2,
        4,
        [[2, 6]],
        0,
    )
    assert second["wall_s"] > 0 and second["peak_rss_mb"] > 0
    T.gather(tmp_path, [], tmp_path / "manifest.json")
    uninterrupted = tmp_path / "ref"
    build(uninterrupted, sd_teacher, prompt_files, batch_size=1)
    for name, value in arrays(uninterrupted).items():
        assert np.array_equal(value, arrays(tmp_path)[name]), name


def test_resume_after_a_crash_mid_batch(sd_store, sd_teacher, prompt_files, tmp_path, monkeypatch):
    # The teacher dies during the 2nd batch (trajectories 2, 3), after a quarter of its steps.
    import rapm.teacher

    cfg, tc = dict(CFG), teacher_cfg(sd_teacher)
    T.init_store(tmp_path, tc, cfg, *prompt_files, teacher=sd_teacher)
    real, calls = rapm.teacher.unet_eps, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8 + 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rapm.teacher, "unet_eps", dying)
    with pytest.raises(KeyboardInterrupt):
        T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, progress=False)
    monkeypatch.setattr(rapm.teacher, "unet_eps", real)
    assert arrays(tmp_path)["done"].tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(TS.TrajectoryStoreError, match="4 of 6 trajectories are not computed"):
        T.gather(tmp_path, [], tmp_path / "manifest.json")
    again = T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, progress=False)
    assert again["computed_runs"] == [[2, 6]] and again["already_done"] == 2
    T.gather(tmp_path, [], tmp_path / "manifest.json")
    for name, value in arrays(sd_store[0]).items():  # the uninterrupted run, same batch size
        assert np.array_equal(value, arrays(tmp_path)[name]), name


def test_done_flags_are_written_after_the_data(sd_store, sd_teacher, prompt_files, tmp_path, monkeypatch):
    # Writing the 2nd batch fails after its coarse states are on disk, before its Δ-states: no flag may be set.
    cfg, tc = dict(CFG), teacher_cfg(sd_teacher)
    T.init_store(tmp_path, tc, cfg, *prompt_files, teacher=sd_teacher)
    real, calls = T.run_batch, []

    def half_written(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out["delta"] = out["delta"][:, :3]  # wrong shape (3 of 4 slots): the zarr write of "delta" raises
        return out

    monkeypatch.setattr(T, "run_batch", half_written)
    with pytest.raises(Exception):
        T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, progress=False)
    monkeypatch.setattr(T, "run_batch", real)
    a = arrays(tmp_path)
    assert np.isfinite(a["coarse"][2:4]).all() and np.isnan(a["delta"][2:4]).all()  # data half written ...
    assert a["done"].tolist() == [1, 1, 0, 0, 0, 0]  # ... and not flagged
    assert T.compute_shard(tmp_path, tc, cfg, 0, teacher=sd_teacher, progress=False)["computed_runs"] == [[2, 6]]
    T.gather(tmp_path, [], tmp_path / "manifest.json")
    for name, value in arrays(sd_store[0]).items():
        assert np.array_equal(value, arrays(tmp_path)[name]), name


def test_cli_limit_exits_75_without_summary_then_resumes(sd_teacher, prompt_files, tmp_path):
    config = tmp_path / "trajectories.yaml"
    config.write_text(yaml.safe_dump({"teacher": teacher_cfg(sd_teacher), "trajectories": {**CFG, "shards": 2}}))
    d, base = tmp_path / "k", ["--config", str(config), "--dir", str(tmp_path / "k")]
    assert (
        main(
            [
                "trajectories",
                "init",
                *base,
                "--prompts",
                str(prompt_files[0]),
                "--manifest",
                str(prompt_files[1]),
                "--out",
                str(d / "init.json"),
            ]
        )
        == 0
    )
    assert json.loads((d / "init.json").read_text())["action"] == "created"
    summary = d / "shards" / "1-of-2.json"
    assert (
        main(["trajectories", "compute", *base, "--shard", "1", "--summary", str(summary), "--max-trajectories", "1"])
        == 75
    )
    assert not summary.exists()
    assert main(["trajectories", "compute", *base, "--shard", "1", "--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["computed_runs"] == [[4, 6]]  # 2 left of batch [2, 4) done first
    assert main(["trajectories", "gather", *base, "--summaries", str(summary), "--out", str(d / "m.json")]) == 1
    assert main(["trajectories", "compute", *base, "--shard", "0", "--summary", str(d / "s0.json")]) == 0
    assert main(["trajectories", "gather", *base, "--summaries", str(summary), "--out", str(d / "m.json")]) == 0


# --- refusing the wrong store ----------------------------------------------------------------------


def test_reader_refuses_other_teacher_or_grid(sd_store, sd_teacher, sdxl_teacher):
    directory, _ = sd_store
    full = {"teacher": teacher_cfg(sd_teacher), "trajectories": CFG}
    ds = TS.TrajectoryDataset.from_config(directory, full, teacher=sd_teacher)
    assert len(ds) == 6 and ds.coarse_timesteps == [999, 749, 499, 249, 0]
    for section, key, value, attr in [
        ("trajectories", "guidance", 5.0, "guidance"),
        ("trajectories", "steps_per_slot", 10, "steps_per_slot"),
        ("trajectories", "num_steps", 2, "num_steps"),
        ("teacher", "dtype", "bfloat16", "teacher.dtype"),
        ("teacher", "path", "rapm:tinysd", "teacher.path"),
    ]:
        bad = copy.deepcopy(full)
        bad[section][key] = value
        with pytest.raises(TS.TrajectoryStoreError, match=f"attribute '{attr}' differs") as err:
            TS.TrajectoryDataset.from_config(directory, bad)
        assert repr(value) in str(err.value)
    with pytest.raises(TS.TrajectoryStoreError, match="attribute 'teacher.weights_sha256' differs"):
        TS.TrajectoryDataset.from_config(directory, full, teacher=sdxl_teacher)


def test_reader_refuses_another_prompt_set_or_trajectory_count(sd_store, sd_teacher, prompt_files, tmp_path):
    import re

    directory, _ = sd_store
    where = re.escape(str(TS.store_path(directory)))
    full = {"teacher": teacher_cfg(sd_teacher), "trajectories": CFG}  # num_trajectories: null, all 6 prompts
    assert len(TS.TrajectoryDataset.from_config(directory, full, prompts=prompt_files[0])) == 6
    assert len(TS.TrajectoryDataset.from_config(directory, {**full, "prompts": {"num_train": 6}})) == 6
    with pytest.raises(
        TS.TrajectoryStoreError,
        match=rf"{where} .*attribute 'num_trajectories' differs "
        r"\(store: 6, requested: 24\)",
    ):
        TS.TrajectoryDataset.from_config(directory, {**full, "prompts": {"seed": 0, "num_train": 24, "num_eval": 2}})
    edited = tmp_path / "train.csv"
    edited.write_bytes(prompt_files[0].read_bytes().replace(b"green", b"brown"))
    with pytest.raises(
        TS.TrajectoryStoreError,
        match=rf"{where} .*attribute 'prompts\.train_csv_sha256' differs "
        r"\(store: '[0-9a-f]{64}', requested: '[0-9a-f]{64}'\)",
    ):
        TS.TrajectoryDataset.from_config(directory, full, prompts=edited)
    fewer = tmp_path / "fewer.csv"  # one prompt dropped: both the hash and the count differ
    fewer.write_bytes(b"".join(prompt_files[0].read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(TS.TrajectoryStoreError, match=r"'num_trajectories' differs \(store: 6, requested: 5\)"):
        TS.TrajectoryDataset.from_config(directory, full, prompts=fewer)
    # an explicit num_trajectories is compared as before (a prefix of the same train.csv is the same prompt set)
    with pytest.raises(TS.TrajectoryStoreError, match=r"'num_trajectories' differs \(store: 6, requested: 4\)"):
        TS.TrajectoryDataset.from_config(
            directory, {**full, "trajectories": {**CFG, "num_trajectories": 4}}, prompts=prompt_files[0]
        )


BUILD = """
import json, sys
from pathlib import Path
import torch
from rapm import trajectories as T
from rapm.teacher import load_teacher
torch.set_num_threads(1)
directory, teacher_dir, csv, manifest, cfg = sys.argv[1:]
cfg, tc = json.loads(cfg), {"path": teacher_dir, "type": "auto", "dtype": "float32", "device": "cpu"}
teacher = load_teacher(tc)
T.init_store(directory, tc, cfg, csv, manifest, key="test", teacher=teacher)
summary = Path(directory) / "shards" / "0-of-1.json"
summary.parent.mkdir()
summary.write_text(json.dumps(T.compute_shard(directory, tc, cfg, 0, teacher=teacher, progress=False)))
T.gather(directory, [summary], Path(directory) / "manifest.json")
"""


def test_two_identical_precomputes_give_byte_identical_stores(sd_store, sd_teacher, prompt_files, tmp_path):
    """File by file, metadata included; the second store is built in another process with another hash seed."""
    import os

    one, _ = sd_store
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            BUILD,
            str(tmp_path / "again"),
            sd_teacher.source,
            *map(str, prompt_files),
            json.dumps(CFG),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = TS.store_path(one), TS.store_path(tmp_path / "again")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert "zarr.json" in files and len(files) > 40
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_compute_refuses_a_store_made_for_other_settings(sd_teacher, prompt_files, tmp_path):
    tc = teacher_cfg(sd_teacher)
    T.init_store(tmp_path, tc, CFG, *prompt_files, teacher=sd_teacher)
    with pytest.raises(TS.TrajectoryStoreError, match="attribute 'guidance' differs"):
        T.compute_shard(tmp_path, tc, {**CFG, "guidance": 3.0}, 0, teacher=sd_teacher, progress=False)
    # init on the same directory with other settings starts over; with the same ones it keeps the store
    assert T.init_store(tmp_path, tc, {**CFG, "guidance": 3.0}, *prompt_files, teacher=sd_teacher)["differs"] == [
        "guidance"
    ]
    assert (
        T.init_store(tmp_path, tc, {**CFG, "guidance": 3.0, "shards": 4}, *prompt_files, teacher=sd_teacher)["action"]
        == "kept"
    )


def test_prompts_must_match_their_manifest(sd_teacher, prompt_files, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_bytes(prompt_files[0].read_bytes().replace(b"green", b"brown"))
    with pytest.raises(TS.TrajectoryStoreError, match="differs from"):
        T.init_store(tmp_path / "s", teacher_cfg(sd_teacher), CFG, csv, prompt_files[1], teacher=sd_teacher)
    with pytest.raises(TS.TrajectoryStoreError, match="num_trajectories = 7"):
        T.init_store(
            tmp_path / "s", teacher_cfg(sd_teacher), {**CFG, "num_trajectories": 7}, *prompt_files, teacher=sd_teacher
        )


# --- damage ------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(sd_store, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(sd_store[0], directory)
    return directory, TS.store_path(directory) / "coarse" / "c" / "3" / "0" / "0" / "0" / "0"


def test_missing_chunk_is_detected_and_repaired_by_its_shard(damaged, sd_store, sd_teacher):
    directory, chunk = damaged
    chunk.unlink()
    message = r"chunk coarse/c/3/0/0/0/0 \(coarse, trajectories 3..3\) is missing"
    with pytest.raises(TS.TrajectoryStoreError, match=message):
        TS.TrajectoryDataset(directory)
    with pytest.raises(TS.TrajectoryStoreError, match=message):
        T.gather(directory, [], directory / "manifest.json")
    summary = T.compute_shard(directory, teacher_cfg(sd_teacher), CFG, 0, teacher=sd_teacher, progress=False)
    assert summary["computed_runs"] == [[3, 4]]  # the batch [2, 4) minus the intact trajectory 2
    T.gather(directory, [], directory / "manifest.json")
    assert np.array_equal(arrays(directory)["coarse"], arrays(sd_store[0])["coarse"])


def test_truncated_chunk_is_detected(damaged):
    directory, chunk = damaged
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(TS.TrajectoryStoreError, match=r"coarse/c/3/0/0/0/0 \(coarse, trajectories 3..3\) is truncated"):
        TS.TrajectoryDataset(directory)
    ds = TS.TrajectoryDataset(directory, verify=False)  # unchecked open: the read itself fails clearly
    assert ds[2]["coarse"].shape == (5, 4, 8, 8)
    with pytest.raises(TS.TrajectoryStoreError, match="array 'coarse', trajectory 3: chunk unreadable"):
        ds[3]


def test_corrupted_chunk_is_detected_by_its_checksum(damaged):
    directory, chunk = damaged
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF  # same size, one byte flipped
    chunk.write_bytes(bytes(data))
    ds = TS.TrajectoryDataset(directory)  # sizes are fine; the read checks the CRC32C
    with pytest.raises(TS.TrajectoryStoreError, match="trajectory 3: chunk unreadable"):
        ds[3]
    with pytest.raises(TS.TrajectoryStoreError, match="chunk 3 of 'coarse'.*is damaged"):
        T.gather(directory, [], directory / "manifest.json")


def test_cached_reader_reads_each_item_once_and_returns_the_same_values(damaged, monkeypatch):
    """``cache=True`` (training): an item comes from disk on its first read only, with the values of an uncached read."""
    directory, chunk = damaged
    plain, cached = TS.TrajectoryDataset(directory), TS.TrajectoryDataset(directory, cache=True)
    first = cached[3]
    for name, value in plain[3].items():
        assert torch.equal(value, first[name]) if torch.is_tensor(value) else value == first[name], name
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF  # trajectory 3's coarse chunk is now corrupt: only the kept item can still be read
    chunk.write_bytes(bytes(data))
    assert torch.equal(cached[3]["coarse"], first["coarse"])
    cached[3]["coarse"] = None  # a caller's change to the returned dict does not reach the cache
    assert cached[3]["coarse"] is not None
    with pytest.raises(TS.TrajectoryStoreError, match="trajectory 3: chunk unreadable"):
        plain[3]
    monkeypatch.setattr(TS, "CACHE_BYTES", 0)  # a store larger than the budget is read from disk every time
    with pytest.raises(TS.TrajectoryStoreError, match="trajectory 3: chunk unreadable"):
        TS.TrajectoryDataset(directory, verify=False, cache=True)[3]


def test_ungathered_store_is_refused(sd_teacher, prompt_files, tmp_path):
    T.init_store(tmp_path, teacher_cfg(sd_teacher), CFG, *prompt_files, teacher=sd_teacher)
    with pytest.raises(TS.TrajectoryStoreError, match="not gathered"):
        TS.TrajectoryDataset(tmp_path)


# --- reader ------------------------------------------------------------------------------------------


def test_dataset_random_access_and_dataloader(sd_store):
    directory, _ = sd_store
    ds, a = TS.TrajectoryDataset(directory), arrays(directory)
    for j in (5, 0, 3, -1):
        item = ds[j]
        k = j % 6
        assert item["index"] == k and item["seed"] == 11 + k and item["prompt"] == PROMPTS[k]
        assert np.array_equal(item["coarse"].numpy(), a["coarse"][k]) and item["delta"].shape == (4, 4, 8, 8)
    with pytest.raises(IndexError):
        ds[6]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["coarse"].shape == (4, 5, 4, 8, 8) and len(batch["prompt"]) == 4


# --- workflow ----------------------------------------------------------------------------------------


def test_store_key_depends_on_content_settings_only():
    from rapm.config import load_config

    cfg = load_config([ROOT / "config" / "config.yaml"])
    key = trajectory_store_key(cfg)
    same = copy.deepcopy(cfg)
    same["trajectories"].update(shards=7, batch_size=3)
    same["teacher"]["device"] = "cpu"
    same["prompts"]["num_eval"] = 5
    assert trajectory_store_key(same) == key
    for section, name, value in [
        ("trajectories", "guidance", 1.5),
        ("trajectories", "steps_per_slot", 25),
        ("teacher", "path", "other"),
        ("prompts", "seed", 3),
        ("trajectories", "seed", 1),
    ]:
        other = copy.deepcopy(cfg)
        other[section][name] = value
        assert trajectory_store_key(other) != key, name


def test_snakemake_dry_run_scatters_and_gathers(tmp_path):
    cfg = tmp_path / "c.yaml"
    data = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())
    data["trajectories"]["shards"] = 3
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "all",
            "--directory",
            str(tmp_path),
            "-s",
            str(ROOT / "Snakefile"),
            "--configfile",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    jobs = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert (jobs["init_trajectories"], jobs["precompute_trajectories"], jobs["gather_trajectories"]) == (1, 3, 1)
    from rapm.config import load_config

    d = f"results/trajectories/{trajectory_store_key(load_config([ROOT / 'config' / 'config.yaml', cfg]))}"
    for s in range(3):
        assert f"{d}/shards/{s}-of-3.json" in out
    assert f"{d}/manifest.json" in out and "store.zarr" not in out  # the store is never a declared output


def test_a_coarser_student_reads_a_sub_grid_equal_to_its_own_store(sd_store, sd_teacher, prompt_files, tmp_path):
    """N = 2 (M = 4) on the store of N = 4 (M = 2): the same 8 fine teacher steps from the same noise, so
    every 2nd coarse slot and Δ-state of the N = 4 store IS the N = 2 store (bitwise, same batch size)."""
    own = tmp_path / "n2"
    build(own, sd_teacher, prompt_files, num_steps=2, steps_per_slot=4)
    direct = TS.TrajectoryDataset(own)
    cfg = {
        "teacher": teacher_cfg(sd_teacher),
        "trajectories": {**CFG, "num_steps": 2, "steps_per_slot": 4, "store_steps": 4},
    }
    view = TS.TrajectoryDataset.from_config(sd_store[0], cfg, sd_teacher)
    assert view.coarse_timesteps == direct.coarse_timesteps == coarse_timesteps(2)
    assert view.delta_timesteps == direct.delta_timesteps
    for j in range(len(direct)):
        a, b = view[j], direct[j]
        assert a["coarse"].shape[0] == 3 and a["delta"].shape[0] == 2
        for name in ("coarse", "delta", "prompt_embeds"):
            assert torch.equal(a[name], b[name]), (j, name)
    assert TS.store_grid(cfg["trajectories"])["steps_per_slot"] == 2
    base = {
        "data": {"source": "toy"},
        "prompts": {"seed": 0, "num_train": 6},
        "teacher": {**cfg["teacher"], "revision": None, "variant": None},
    }
    assert trajectory_store_key({**base, "trajectories": cfg["trajectories"]}) == trajectory_store_key(
        {**base, "trajectories": CFG}
    )
    with pytest.raises(ValueError, match="store_steps 3 must be a multiple of num_steps 2"):
        TS.store_grid({**cfg["trajectories"], "store_steps": 3})
    with pytest.raises(TS.TrajectoryStoreError, match="steps_per_slot"):  # a store of another fine grid
        TS.TrajectoryDataset.from_config(
            sd_store[0],
            {**cfg, "trajectories": {**cfg["trajectories"], "steps_per_slot": 3, "store_steps": 2}},
            sd_teacher,
        )
