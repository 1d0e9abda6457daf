"""RAPM training (rapm.objective, rapm.train): what the method pins, and a robust, resumable job.

Tiny random-weight SD1.5/SDXL teachers (conftest), trajectory stores of four prompts on a grid of
N = 4 coarse slots with M = 2 fine steps each, built here with rapm.trajectories.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rapm import store as TS
from rapm import trajectories as T
from rapm.config import validate, write_yaml
from rapm.objective import generator_slot_loss, load_batch, slot_weights
from rapm.train import CHECKPOINT, Trainer, TrainingError, iteration_indices, train, update_kinds

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a green triangle", "two yellow squares", "a small blue square"]
TRAJ = {"num_steps": 4, "steps_per_slot": 2, "guidance": 7.5, "num_trajectories": None, "seed": 3, "batch_size": 2}


def make_cfg(teacher_dir, **train):
    base = {
        "iterations": 8,
        "checkpoint_every": 2,
        "validate_every": 0,
        "validation_images": 2,
        "log_every": 4,
        "optim": {"student_lr": 1e-3, "disc_lr": 1e-3},
        "export_dtype": "float32",
    }
    for key, value in train.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(
        {
            "profile": "test",
            "teacher": {"path": str(teacher_dir), "type": "auto", "dtype": "float32", "device": "cpu"},
            "trajectories": TRAJ,
            "train": base,
        },
        partial=True,
    )


def build_store(directory: Path, teacher_dir) -> Path:
    rows = "".join(f'{i},{100 + i},{1000 + i},"{p}",COCO_train2014_{100 + i:012d}.jpg\n' for i, p in enumerate(PROMPTS))
    data = ("prompt_id,image_id,caption_id,caption,file_name\n" + rows).encode()
    directory.mkdir(parents=True)
    (directory / "train.csv").write_bytes(data)
    manifest = {"outputs": {"train.csv": {"rows": len(PROMPTS), "sha256": hashlib.sha256(data).hexdigest()}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_cfg(teacher_dir)
    store = directory / "store"
    T.init_store(
        store, cfg["teacher"], cfg["trajectories"], directory / "train.csv", directory / "manifest.json", key="t"
    )
    summary = T.compute_shard(store, cfg["teacher"], cfg["trajectories"], 0, progress=False)
    (store / "shards").mkdir()
    (store / "shards" / "0-of-1.json").write_text(json.dumps(summary))
    T.gather(store, [store / "shards" / "0-of-1.json"], store / "manifest.json")
    return store


@pytest.fixture(scope="module")
def sd_store(tiny_sd_dir, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("train-sd") / "data", tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl_store(tiny_sdxl_dir, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("train-sdxl") / "data", tiny_sdxl_dir)


def trainer(teacher_dir, store, state_dir, **train_cfg) -> Trainer:
    return Trainer(make_cfg(teacher_dir, **train_cfg), store, state_dir)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, after) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def lora_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in tr.teacher.unet.named_parameters() if p.grad is not None}


# --- pure pieces ------------------------------------------------------------------------------------


def test_slot_weight_schedules():
    assert slot_weights("uniform", 4) == [1.0, 1.0, 1.0, 1.0]
    assert slot_weights("increasing", 4) == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert slot_weights("decreasing", 4) == pytest.approx([1.6, 1.2, 0.8, 0.4])
    assert slot_weights([0, 0, 1, 2], 4) == [0.0, 0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="3 weights for N = 4"):
        slot_weights([1, 1, 1], 4)
    with pytest.raises(ValueError, match="unknown slot weight schedule 'linear'"):
        slot_weights("linear", 4)


def test_generator_slot_loss_pinned_and_zeroed_terms():
    rel = [torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]]), torch.tensor([[[[0.25]]]])]
    ab = [torch.tensor([[[[1.5, -0.5]]]])]
    # hinge_G(rel) = mean(mean(relu(1 - x)) per map) = mean(((0.5 + 2 + 0 + 1) / 4), 0.75) = 0.8125
    # hinge_G(abs) = (0 + 1.5) / 2 = 0.75
    out = generator_slot_loss(rel, ab, weight=2.0, lambda_rel=1.0, lambda_abs=0.5)
    assert float(out["g_rel"]) == pytest.approx(2.0 * 0.8125)
    assert float(out["g_abs"]) == pytest.approx(2.0 * 0.5 * 0.75)
    only_rel = generator_slot_loss(rel, None, weight=1.0, lambda_rel=1.0, lambda_abs=0.0)
    assert float(only_rel["g_abs"]) == 0.0 and float(only_rel["g_rel"]) == pytest.approx(0.8125)


def test_iteration_randomness_depends_only_on_seed_and_iteration():
    assert iteration_indices(0, 5, 100, 3) == iteration_indices(0, 5, 100, 3)
    assert iteration_indices(0, 5, 100, 3) != iteration_indices(0, 6, 100, 3)
    assert update_kinds("alternate", 0) == ("d",) and update_kinds("alternate", 1) == ("g",)
    assert update_kinds("d_then_g", 1) == ("d", "g")


# --- gradients ---------------------------------------------------------------------------------------


def test_student_step_changes_only_lora_and_d_step_only_heads(tiny_sd_dir, sd_store, tmp_path):
    tr = trainer(tiny_sd_dir, sd_store, tmp_path)
    unet_before, heads_before = snapshot(tr.teacher.unet), snapshot(tr.disc)
    tr.step = 0  # even: discriminator update
    tr.run_iteration()
    unet_mid, heads_mid = snapshot(tr.teacher.unet), snapshot(tr.disc)
    assert changed(unet_before, unet_mid) == set(), "the D step touched the UNet"
    assert changed(heads_before, heads_mid), "the D step did not update the heads"
    tr.step = 1  # odd: student update
    tr.run_iteration()
    unet_after, heads_after = snapshot(tr.teacher.unet), snapshot(tr.disc)
    moved = changed(unet_mid, unet_after)
    assert moved and all(".lora_" in k for k in moved), sorted(moved)[:5]
    assert changed(heads_mid, heads_after) == set(), "the student step touched the heads"
    assert sum(".lora_B." in k for k in moved) == 79  # every adapted module's lora_B moved off zero


def test_relative_only_and_absolute_only_zero_the_other_term(tiny_sd_dir, sd_store, tmp_path):
    for zero, kept in (("lambda_abs", "rel"), ("lambda_rel", "abs")):
        tr = trainer(tiny_sd_dir, sd_store, tmp_path / zero, losses={zero: 0.0})
        other = "abs" if kept == "rel" else "rel"
        batch = load_batch(tr.dataset, [0], "cpu")
        noise = tr.rapm.draw_noise(0, 0, 1, batch.coarse.shape[2:])
        d = tr.rapm.discriminator_loss(batch, noise)
        assert float(d[f"d_{other}"].detach()) == 0.0 and float(d[f"d_{kept}"].detach()) > 0
        d["loss"].backward()
        assert all(p.grad is None for p in tr.disc.heads[other].parameters())
        assert any(p.grad is not None for p in tr.disc.heads[kept].parameters())
        g = tr.rapm.generator_backward(batch, noise)
        assert float(g[f"g_{other}"]) == 0.0 and float(g[f"g_{kept}"]) > 0


# --- detach semantics --------------------------------------------------------------------------------


def _last_slot_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    batch = load_batch(tr.dataset, [1], "cpu")
    noise = tr.rapm.draw_noise(0, 1, 1, batch.coarse.shape[2:])
    tr.opt_g.zero_grad(set_to_none=True)
    tr.rapm.generator_backward(batch, noise)
    return lora_grads(tr), batch, noise


def _prime_lora(tr: Trainer) -> None:
    """Non-zero LoRA weights (lora_B starts at 0, which would hide gradients through earlier slots)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.opt_g.param_groups[0]["params"]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_detach_rollout_cuts_the_gradient_through_earlier_slots(tiny_sd_dir, sd_store, tmp_path):
    """Only the last slot has weight: with detach #2 its gradient equals that of one student step from the
    detached state z_1; without it, gradient also flows through z_1 into the earlier slots' LoRA use."""
    grads = {}
    for detach in (True, False):
        tr = trainer(
            tiny_sd_dir, sd_store, tmp_path / str(detach), detach_rollout=detach, losses={"slot_weights": [0, 0, 0, 1]}
        )
        _prime_lora(tr)
        grads[detach], batch, noise = _last_slot_grads(tr)
        if detach:  # the oracle: roll out without grad to z_1, then one step with grad and the same loss
            r = tr.rapm
            with torch.no_grad():
                z = batch.coarse[:, 0]
                for k in range(3):
                    z = r.student_step(z, r.coarse_t[k], r.coarse_t[k + 1], batch.cond)
            tr.opt_g.zero_grad(set_to_none=True)
            fake = r.student_step(z, r.coarse_t[3], r.coarse_t[4], batch.cond)
            x, tau = r._noised(fake, 3, "fake", noise)
            feats = r._features(x, tau, batch.cond)
            loss = sum(
                generator_slot_loss(
                    r._logits(feats, "rel"), r._logits(feats, "abs"), weight=1.0, lambda_rel=1.0, lambda_abs=1.0
                ).values()
            )
            loss.backward()
            oracle = lora_grads(tr)
            assert grads[True].keys() == oracle.keys()
            for k in oracle:
                torch.testing.assert_close(grads[True][k], oracle[k], rtol=1e-5, atol=1e-8)
    diff = max(float((grads[True][k] - grads[False][k]).abs().max()) for k in grads[True])
    assert diff > 1e-6, "switching detach #2 off did not change the gradient"


def test_relative_target_is_detached_unless_detach_target_is_off(tiny_sd_dir, sd_store, tmp_path):
    grads = {}
    for detach in (True, False):
        tr = trainer(
            tiny_sd_dir, sd_store, tmp_path / str(detach), detach_target=detach, losses={"regression_rel": 1.0}
        )
        _prime_lora(tr)
        batch = load_batch(tr.dataset, [2], "cpu")
        target = tr.rapm.relative_target(batch, 1)
        assert target.requires_grad is (not detach)
        grads[detach], _, _ = _last_slot_grads(tr)
    diff = max(float((grads[True][k] - grads[False][k]).abs().max()) for k in grads[True])
    assert diff > 1e-6, "switching detach #1 off did not change the gradient of the regression term"


def test_regression_off_never_computes_the_target_in_the_student_step(tiny_sd_dir, sd_store, tmp_path):
    tr = trainer(tiny_sd_dir, sd_store, tmp_path)
    tr.step = 1
    record = tr.run_iteration()
    assert record["g_unet_calls"] == 8  # 4 student steps + 4 backbone passes, no target step
    assert record["reg"] == 0.0
    tr.step = 0
    record = tr.run_iteration()
    assert record["d_unet_calls"] == 6 and record["d_unet_rows"] == 20  # 4 targets in 1 call + 4 student + 12 rows in 1


def test_regression_terms_are_separate_and_the_targets_one_call(tiny_sd_dir, sd_store, tmp_path):
    """regression_abs needs no relative target; regression_rel (detach #1 on) adds ONE batched target call."""
    for losses, calls in (({"regression_abs": 1.0}, 8), ({"regression_rel": 1.0}, 9)):
        tr = trainer(tiny_sd_dir, sd_store, tmp_path / str(calls), losses=losses)
        tr.step = 1
        record = tr.run_iteration()
        assert record["g_unet_calls"] == calls and record["reg"] > 0
    only_abs = trainer(
        tiny_sd_dir, sd_store, tmp_path / "a", losses={"regression_abs": 1.0, "lambda_rel": 0.0, "lambda_abs": 0.0}
    )
    _prime_lora(only_abs)
    batch = load_batch(only_abs.dataset, [1], "cpu")
    noise = only_abs.rapm.draw_noise(0, 1, 1, batch.coarse.shape[2:])
    out = only_abs.rapm.generator_backward(batch, noise, backward=False)
    from rapm.losses import pseudo_huber

    z, expected = batch.coarse[:, 0], 0.0
    with torch.no_grad():
        for k in range(4):  # the oracle: the roll-out and pseudo-Huber to the stored states, by hand
            z = only_abs.rapm.student_step(z, only_abs.rapm.coarse_t[k], only_abs.rapm.coarse_t[k + 1], batch.cond)
            expected += float(pseudo_huber(z, batch.coarse[:, k + 1], 1e-3))
    assert float(out["reg"]) == pytest.approx(expected, rel=1e-5)


def _per_slot_discriminator_loss(r, batch, noise):
    """The D loss as the first release computed it: per slot, a target call, a student call, a backbone call."""
    from rapm.conditioning import Conditioning
    from rapm.losses import d_hinge

    z, B = batch.coarse[:, 0], len(batch.indices)
    terms = {"rel": [], "abs": []}
    with torch.no_grad():
        for k in range(r.num_steps):
            fake = r.student_step(z, r.coarse_t[k], r.coarse_t[k + 1], batch.cond)
            inputs = [
                r._noised(fake, k, "fake", noise),
                r._noised(r.relative_target(batch, k, grad=False), k, "rel", noise),
                r._noised(batch.coarse[:, k + 1], k, "abs", noise),
            ]
            feats = r._features(
                torch.cat([x for x, _ in inputs]), torch.cat([t for _, t in inputs]), Conditioning.cat([batch.cond] * 3)
            )
            z = fake
            chunks = list(zip(*[f.split(B) for f in feats]))
            for row, head in ((1, "rel"), (2, "abs")):
                terms[head].append(d_hinge(r._logits(list(chunks[row]), head), r._logits(list(chunks[0]), head)))
    return {f"d_{h}": torch.stack(v).mean() for h, v in terms.items()}


@pytest.mark.parametrize("renoise_tau", ["shared", "independent"])
def test_batched_discriminator_step_equals_the_per_slot_computation(tiny_sd_dir, sd_store, tmp_path, renoise_tau):
    tr = trainer(tiny_sd_dir, sd_store, tmp_path, discriminator={"renoise_tau": renoise_tau})
    _prime_lora(tr)
    batch = load_batch(tr.dataset, [0, 3], "cpu")
    noise = tr.rapm.draw_noise(0, 4, 2, batch.coarse.shape[2:])
    if renoise_tau == "shared":  # one tau per slot for the fake and both reals, each its own noise
        assert torch.equal(noise.tau["fake"], noise.tau["rel"]) and torch.equal(noise.tau["fake"], noise.tau["abs"])
        assert not torch.equal(noise.eps["fake"], noise.eps["rel"])
    else:
        assert not torch.equal(noise.tau["fake"], noise.tau["rel"])
    batched = tr.rapm.discriminator_loss(batch, noise)
    reference = _per_slot_discriminator_loss(tr.rapm, batch, noise)
    for name in ("d_rel", "d_abs"):  # equal up to the UNet's batch non-invariance (float32 rounding)
        assert float(batched[name]) == pytest.approx(float(reference[name]), abs=1e-5), name
    batched["loss"].backward()
    assert all(p.grad is not None for p in tr.disc.parameters())


def test_swap_real_fake_sabotage_swaps_the_hinge_sides(tiny_sd_dir, sd_store, tmp_path):
    tr = trainer(tiny_sd_dir, sd_store, tmp_path / "ok")
    bad = trainer(tiny_sd_dir, sd_store, tmp_path / "bad", sabotage=["swap_real_fake"])
    batch = load_batch(tr.dataset, [1], "cpu")
    noise = tr.rapm.draw_noise(0, 2, 1, batch.coarse.shape[2:])
    ok, swapped = tr.rapm.discriminator_loss(batch, noise), bad.rapm.discriminator_loss(batch, noise)
    assert float(ok["d_abs"]) != pytest.approx(float(swapped["d_abs"]), abs=1e-6)


def test_shuffle_prompts_sabotage_pairs_each_trajectory_with_the_next_prompt(tiny_sd_dir, sd_store, tmp_path):
    bad = trainer(tiny_sd_dir, sd_store, tmp_path, sabotage=["shuffle_prompts"])
    batch = bad.batch([1, 3])
    assert torch.equal(batch.coarse, load_batch(bad.dataset, [1, 3], "cpu").coarse)
    assert torch.equal(batch.cond.prompt_embeds, load_batch(bad.dataset, [2, 0], "cpu").cond.prompt_embeds)


# --- the job -------------------------------------------------------------------------------------------


def test_train_writes_outputs_and_a_usable_summary(tiny_sd_dir, sd_store, tmp_path):
    summary = train(make_cfg(tiny_sd_dir), sd_store, tmp_path / "out", tmp_path / "state")
    out = tmp_path / "out"
    for name in ("lora.safetensors", "summary.json", "losses.jsonl", "validation.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(8))
    assert all({"d_rel", "d_abs"} <= r.keys() for r in lines[0::2]) and all(
        {"g_rel", "g_abs"} <= r.keys() for r in lines[1::2]
    )
    assert summary["lora_modules"] == 79 and summary["iterations"] == 8
    assert summary["unet_evaluations_per_update"]["g"]["unet_calls"] == 8.0
    assert summary["peak_rss_mb"] > 0 and summary["config"]["train"]["iterations"] == 8
    # a finished run does nothing more when run again, and gives the same LoRA
    from safetensors import safe_open

    def read(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    meta, first = read(out / "lora.safetensors")
    assert json.loads(meta["rapm.config"])["train"]["iterations"] == 8 and meta["rapm.step"] == "8"
    train(make_cfg(tiny_sd_dir), sd_store, out, tmp_path / "state")
    meta2, again = read(out / "lora.safetensors")
    assert meta2 == meta and again.keys() == first.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_cosine_student_lr_and_the_moving_average_the_export_uses(tiny_sd_dir, sd_store, tmp_path):
    from rapm.lora import lora_state_dict

    tr = trainer(tiny_sd_dir, sd_store, tmp_path, iterations=8, ema_decay=0.5, optim={"student_lr_schedule": "cosine"})
    assert [round(tr.student_lr() / 1e-3, 6) for tr.step in (0, 2, 4, 6)] == [1.0, 0.853553, 0.5, 0.146447]
    tr.step = 0
    ema = lora_state_dict(tr.teacher.unet)  # the average starts at the initial weights
    for _ in range(4):  # d, g, d, g: the average moves after each student update only
        before = lora_state_dict(tr.teacher.unet)
        record = tr.run_iteration()
        after = lora_state_dict(tr.teacher.unet)
        if "g_rel" in record:
            assert tr.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * tr.step / 8)))
            ema = {k: 0.5 * ema[k] + 0.5 * after[k] for k in ema}
        else:
            assert all(torch.equal(before[k], after[k]) for k in before)
        tr.step += 1
    got = {name[5:]: e for (name, _), e in zip(tr._named_g, tr._ema)}
    assert got.keys() == ema.keys() and all(torch.allclose(got[k], ema[k], atol=1e-7, rtol=0) for k in ema)
    assert any(not torch.allclose(after[k], ema[k]) for k in ema)  # raw and average differ here
    # the export holds the average (lora_B scaled by alpha / r = 1 here); the raw weights come back after it
    from safetensors.torch import load_file

    tr.export(tmp_path / "lora.safetensors")
    exported = load_file(tmp_path / "lora.safetensors")
    assert all(torch.allclose(exported[f"unet.{k}"], ema[k], atol=1e-7, rtol=0) for k in ema)
    assert all(torch.equal(v, after[k]) for k, v in lora_state_dict(tr.teacher.unet).items())


def test_a_resumed_run_with_a_moving_average_equals_an_uninterrupted_one(tiny_sd_dir, sd_store, tmp_path):
    cfg = make_cfg(tiny_sd_dir, iterations=8, ema_decay=0.9, optim={"student_lr_schedule": "cosine"})
    train(cfg, sd_store, tmp_path / "a", tmp_path / "a.state")
    assert train(cfg, sd_store, tmp_path / "b", tmp_path / "b.state", max_iterations=3) is None
    train(cfg, sd_store, tmp_path / "b", tmp_path / "b.state")
    assert (tmp_path / "a" / "lora.safetensors").read_bytes() == (tmp_path / "b" / "lora.safetensors").read_bytes()
    plain = make_cfg(tiny_sd_dir, iterations=8)
    train(plain, sd_store, tmp_path / "c", tmp_path / "c.state")
    assert (tmp_path / "a" / "lora.safetensors").read_bytes() != (tmp_path / "c" / "lora.safetensors").read_bytes()


def test_threads_given_win_over_train_num_threads(tiny_sd_dir, sd_store, tmp_path):
    """One source for the thread count: --threads (the rule's threads) when given, else train.num_threads."""
    before = torch.get_num_threads()
    try:
        for name, threads, expected in (("given", 1, 1), ("config", None, 2)):
            (tmp_path / name).mkdir()
            Trainer(make_cfg(tiny_sd_dir, num_threads=2), sd_store, tmp_path / name, threads=threads)
            assert torch.get_num_threads() == expected, name
    finally:
        torch.set_num_threads(before)


def test_checkpoint_of_another_config_is_refused(tiny_sd_dir, sd_store, tmp_path):
    train(make_cfg(tiny_sd_dir, iterations=2), sd_store, tmp_path / "out", tmp_path / "state")
    with pytest.raises(TrainingError, match="different configuration"):
        train(
            make_cfg(tiny_sd_dir, iterations=2, losses={"lambda_rel": 0.5}),
            sd_store,
            tmp_path / "out",
            tmp_path / "state",
        )


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(
    tiny_sd_dir, sd_store, tmp_path, monkeypatch
):
    from rapm import objective

    state = tmp_path / "state"
    train(make_cfg(tiny_sd_dir, iterations=4), sd_store, tmp_path / "out", state, max_iterations=2)
    before = (state / CHECKPOINT).read_bytes()
    real = objective.RAPM.discriminator_loss

    def poisoned(self, batch, noise):
        out = real(self, batch, noise)
        out["d_abs"] = out["d_abs"] * float("nan")
        return out

    monkeypatch.setattr(objective.RAPM, "discriminator_loss", poisoned)
    with pytest.raises(TrainingError, match=r"iteration 2: term 'd_abs' = nan"):
        train(make_cfg(tiny_sd_dir, iterations=4), sd_store, tmp_path / "out", state)
    assert (state / CHECKPOINT).read_bytes() == before


def test_two_runs_give_byte_identical_loras_with_the_umask_mode_and_their_sha256(tiny_sd_dir, sd_store, tmp_path):
    old = os.umask(0o022)
    try:
        for name, mask, prompts in (("a", 0o022, sd_store.parent / "train.csv"), ("b", 0o027, None)):
            os.umask(mask)
            summary = train(
                make_cfg(tiny_sd_dir, iterations=2, export_dtype="float16"),
                sd_store,
                tmp_path / name,
                tmp_path / f"{name}.state",
                prompts=prompts,
            )
            lora = tmp_path / name / "lora.safetensors"
            for path in (lora, tmp_path / name / "summary.json", tmp_path / f"{name}.state" / CHECKPOINT):
                assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
            assert summary["sha256"] == {"lora.safetensors": hashlib.sha256(lora.read_bytes()).hexdigest()}
            assert json.loads((tmp_path / name / "summary.json").read_text())["sha256"] == summary["sha256"]
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "lora.safetensors").read_bytes() == (tmp_path / "b" / "lora.safetensors").read_bytes()


def test_weights_beyond_the_export_dtype_stop_before_anything_is_finished(tiny_sd_dir, sd_store, tmp_path):
    """student_lr 1e6: the float32 LoRA is finite, its float16 export is not; nothing is written as finished."""
    cfg = make_cfg(tiny_sd_dir, iterations=2, export_dtype="float16", optim={"student_lr": 1e6})
    with pytest.raises(
        TrainingError,
        match=r"the LoRA after 2 iterations is not finite in train\.export_dtype float16: "
        r"tensor 'unet\..*\.lora_B\.weight' \(float16.*±inf",
    ):
        train(cfg, sd_store, tmp_path / "out", tmp_path / "state")
    assert not (tmp_path / "out" / "lora.safetensors").exists() and not (tmp_path / "out" / "summary.json").exists()


def test_non_finite_weights_after_an_update_stop_naming_tensor_and_iteration(tiny_sd_dir, sd_store, tmp_path):
    from safetensors import safe_open
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []

    def poison(opt, args, kwargs):  # the 3rd update is iteration 2's (alternate: D on even iterations)
        steps.append(opt)
        if len(steps) == 3:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(
            TrainingError,
            match=r"non-finite discriminator weights after the update of iteration 2: "
            r"tensor 'heads\.[^']+' holds 1 NaN and 0 ±inf",
        ):
            train(make_cfg(tiny_sd_dir, iterations=4), sd_store, tmp_path / "out", tmp_path / "state")
    finally:
        handle.remove()
    with safe_open(str(tmp_path / "state" / CHECKPOINT), framework="pt") as f:
        assert f.metadata()["step"] == "2"  # the last good checkpoint
    assert not (tmp_path / "out" / "lora.safetensors").exists() and not (tmp_path / "out" / "summary.json").exists()


def test_a_torn_last_log_line_is_dropped_and_a_corrupt_one_is_named(tiny_sd_dir, sd_store, tmp_path):
    state, cfg = tmp_path / "state", make_cfg(tiny_sd_dir, iterations=4)
    assert train(cfg, sd_store, tmp_path / "out", state, max_iterations=2) is None
    log_path = state / "losses.jsonl"
    with log_path.open("a") as f:
        f.write('{"d_abs": 0.69, "d_rel": 0.7, "st')  # killed in the middle of a write
    train(cfg, sd_store, tmp_path / "out", state)
    assert [json.loads(x)["step"] for x in (tmp_path / "out" / "losses.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    lines = log_path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    log_path.write_text("".join(lines))
    with pytest.raises(TrainingError, match=r"losses\.jsonl, line 2: not a loss-log record"):
        train(cfg, sd_store, tmp_path / "out", state)


def test_a_store_of_another_prompt_set_is_refused(tiny_sd_dir, sd_store, tmp_path):
    from rapm.cli import main
    from rapm.store import TrajectoryStoreError

    where = re.escape(str(sd_store / "store.zarr"))
    cfg = {**make_cfg(tiny_sd_dir), "prompts": {"seed": 0, "num_train": 24, "num_eval": 4}}  # num_trajectories: null
    with pytest.raises(
        TrajectoryStoreError, match=rf"{where} .*attribute 'num_trajectories' differs \(store: 4, requested: 24\)"
    ):
        Trainer(cfg, sd_store, tmp_path / "state")
    edited = tmp_path / "train.csv"
    edited.write_bytes((sd_store.parent / "train.csv").read_bytes().replace(b"green", b"purple"))
    with pytest.raises(TrajectoryStoreError, match=rf"{where} .*attribute 'prompts\.train_csv_sha256' differs"):
        Trainer(make_cfg(tiny_sd_dir), sd_store, tmp_path / "state", prompts=edited)
    cfg_path = tmp_path / "cfg.yaml"
    write_yaml(make_cfg(tiny_sd_dir), cfg_path)
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg_path),
                "--trajectories",
                str(sd_store),
                "--out-dir",
                str(tmp_path / "out"),
                "--state-dir",
                str(tmp_path / "state"),
                "--prompts",
                str(edited),
            ]
        )
        == 1
    )
    assert not (tmp_path / "out").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import rapm.train as t
    kill_at = int(sys.argv[1])
    real = t.Trainer.run_iteration
    def run_iteration(self):
        if self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self)
    t.Trainer.run_iteration = run_iteration
    from rapm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_and_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_sd_dir, sd_store, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    write_yaml(make_cfg(tiny_sd_dir, iterations=9, checkpoint_every=4, num_threads=1), cfg_path)
    (tmp_path / "killer.py").write_text(KILLER)

    def run(name, kill_at):
        args = [
            "train",
            "--config",
            str(cfg_path),
            "--trajectories",
            str(sd_store),
            "--out-dir",
            str(tmp_path / name),
            "--state-dir",
            str(tmp_path / f"{name}.state"),
            "--threads",
            "1",
        ]
        return subprocess.run(
            [sys.executable, str(tmp_path / "killer.py"), str(kill_at), *args], capture_output=True, text=True, cwd=ROOT
        )

    assert run("straight", -1).returncode == 0
    killed = run("resumed", 6)  # after the checkpoint at 4, mid-way to the next one
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()
    resumed = run("resumed", -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at iteration 4" in resumed.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # byte-identical files across processes (safetensors' own writer orders metadata per process)
    assert (tmp_path / "straight" / "lora.safetensors").read_bytes() == (
        tmp_path / "resumed" / "lora.safetensors"
    ).read_bytes()
    sha = [json.loads((tmp_path / n / "summary.json").read_text())["sha256"] for n in ("straight", "resumed")]
    assert sha[0] == sha[1]
    sa = load_file(tmp_path / "straight.state" / CHECKPOINT)
    sb = load_file(tmp_path / "resumed.state" / CHECKPOINT)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # heads and both optimiser states too
    log_a = [json.loads(x) for x in (tmp_path / "straight" / "losses.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(log_a) == strip(log_b)


# --- output users can use ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_exported_lora_loads_in_diffusers_and_reproduces_rapm_sampler(kind, request, tmp_path):
    teacher_dir = request.getfixturevalue("tiny_sd_dir" if kind == "sd15" else "tiny_sdxl_dir")
    store = request.getfixturevalue("sd_store" if kind == "sd15" else "sdxl_store")
    cfg = make_cfg(teacher_dir, iterations=4)
    train(cfg, store, tmp_path / "out", tmp_path / "state")
    tr = Trainer(cfg, store, tmp_path / "state")
    assert tr.load_checkpoint()
    batch = load_batch(tr.dataset, [0, 1], "cpu")
    ours = tr.rapm.sample(batch.coarse[:, 0], batch.cond)

    from rapm.teacher import load_teacher

    pipe = load_teacher(cfg["teacher"]).pipe
    pipe.load_lora_weights(str(tmp_path / "out" / "lora.safetensors"))
    n_modules = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    assert n_modules == 79
    pipe.fuse_lora()
    prompts = [tr.dataset[0]["prompt"], tr.dataset[1]["prompt"]]
    extra = {"height": tr.teacher.resolution, "width": tr.teacher.resolution} if kind == "sdxl" else {}
    latents = pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=1.0,
        latents=batch.coarse[:, 0].clone(),
        output_type="latent",
        **extra,
    ).images
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
    # and the LoRA is not a no-op: the plain teacher's 4 steps differ
    plain = (
        load_teacher(cfg["teacher"])
        .pipe(
            prompts,
            num_inference_steps=4,
            guidance_scale=1.0,
            latents=batch.coarse[:, 0].clone(),
            output_type="latent",
            **extra,
        )
        .images
    )
    assert float((plain - ours).abs().max()) > 1e-3


def test_missing_inputs_are_named_before_the_teacher_is_loaded(tiny_sd_dir, sd_store, tmp_path, monkeypatch):
    import rapm.teacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the inputs were checked")

    monkeypatch.setattr(rapm.teacher, "load_teacher", no_teacher)
    with pytest.raises(TS.TrajectoryStoreError, match=r"nonexistent/store\.zarr: no trajectory store here"):
        Trainer(make_cfg(tiny_sd_dir), tmp_path / "nonexistent", tmp_path / "state")
    with pytest.raises(TrainingError, match=r"train\.csv: not found"):
        Trainer(make_cfg(tiny_sd_dir), sd_store, tmp_path / "state", prompts=tmp_path / "train.csv")
