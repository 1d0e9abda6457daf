"""The student LoRA (rapm.lora): one module for student and teacher, gradients, checkpoints, export.

The export tests are the contract with diffusers: ``pipe.load_lora_weights(file)`` + ``pipe.fuse_lora()``
must bring back EVERY trained module (counted by name, not just "something loaded") at the right
scale (rank 1, alpha 8, non-zero random lora_B), and the fused pipeline's 4-step DDIM (trailing)
sampling at guidance 1.0 must equal our own student sampler. Tolerance: atol 1e-4 + rtol 1e-5 on the
final latents (float32; measured max difference 1.5e-5 on latents of magnitude ~45, while student and
teacher differ by > 10).
"""

from __future__ import annotations

import json

import pytest
import torch

from rapm.lora import (
    PCM_TARGETS,
    STUDENT,
    add_student_lora,
    count_lora_modules,
    enable_gradient_checkpointing,
    export_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    resolve_targets,
    teacher_mode,
)
from rapm.merged import merged_student, use_merged

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = {"rank": 1, "alpha": 8.0, "targets": list(PCM_TARGETS)}
#: modules PCM's target list selects on the tiny SD/SDXL UNets (2 levels, 1 layer per block)
TINY_MODULES = 79


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "toy":
        tinysd = pytest.importorskip("rapm.toy.tinysd")
        torch.manual_seed(0)
        return UNet2DConditionModel(**tinysd.UNET_CONFIG).eval()
    from rapm.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    return (tiny_sd_pipeline if kind == "sd" else tiny_sdxl_pipeline)(seed=0).unet


def _inputs(unet, batch: int = 2):
    """Seeded (z, t, kwargs) for a UNet forward; SDXL-type UNets get pooled text and time ids."""
    gen = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    z = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([999, 249][:batch])
    kwargs = {"encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        }
    return z, t, kwargs


def _randomize(unet, std: float = 0.1, seed: int = 1):
    """Non-zero lora_B (and re-drawn lora_A), so the student differs from the teacher."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_state_dict_params(unet).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * (std if ".lora_B." in name else 0.3))


def lora_state_dict_params(unet):
    return {n: p for n, p in unet.named_parameters() if f".{STUDENT}." in n}


# --- one module: student and teacher ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl", "toy"])
def test_student_starts_as_teacher_and_teacher_mode_is_the_base_model(kind):
    unet = _unet(kind)
    z, t, kw = _inputs(unet)
    with torch.no_grad():
        base = unet(z, t, **kw).sample
    n_targets = len(resolve_targets(unet, PCM_TARGETS))
    add_student_lora(unet, LORA)
    assert count_lora_modules(unet) == n_targets > 0
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora_parameters(unet))
    with torch.no_grad():
        assert torch.equal(unet(z, t, **kw).sample, base)  # lora_B = 0 at init
        _randomize(unet)
        student = unet(z, t, **kw).sample
        with teacher_mode(unet):
            teacher = unet(z, t, **kw).sample
        again = unet(z, t, **kw).sample
    assert torch.equal(teacher, base)
    assert (student - base).abs().max() > 0.1 and torch.equal(again, student)


def test_tiny_unets_adapt_the_expected_modules():
    unet = _unet("sd")
    names = resolve_targets(unet, PCM_TARGETS)
    assert len(names) == TINY_MODULES
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "down_blocks.0.downsamplers.0.conv" in names and "up_blocks.0.upsamplers.0.conv" in names
    assert "conv_in" not in names and "time_embedding.linear_1" not in names


def test_bad_lora_configs_raise():
    unet = _unet("sd")
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['to_qq'\]"):
        add_student_lora(unet, {"targets": ["to_q", "to_qq"]})
    with pytest.raises(ValueError, match="GEGLU"):
        resolve_targets(unet, ["ff.net.0"])
    with pytest.raises(ValueError, match=r"unknown train.lora key\(s\) \['ranks'\]"):
        add_student_lora(unet, {"ranks": 2})
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_student_lora(unet, {"rank": 0})
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        add_student_lora(unet, {"alpha": -1})
    with pytest.raises(ValueError, match="no 'student' LoRA adapter"):
        lora_parameters(unet)
    add_student_lora(unet, LORA)
    with pytest.raises(ValueError, match="already has"):
        add_student_lora(unet, LORA)


def test_teacher_mode_restores_state_and_flags():
    unet = _unet("sd")
    with teacher_mode(unet):  # no adapter yet: the UNet is the teacher already
        pass
    add_student_lora(unet, LORA)
    params = lora_parameters(unet)
    params[0].requires_grad_(False)  # a caller's choice that peft's enable_adapters would overwrite
    layer = next(m for m in unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    with teacher_mode(unet):
        assert layer.disable_adapters
        assert all(p.requires_grad for p in params[1:])
        with teacher_mode(unet):
            pass
        assert layer.disable_adapters  # the inner exit did not re-enable
    assert not layer.disable_adapters
    assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])
    with pytest.raises(RuntimeError), teacher_mode(unet):
        raise RuntimeError
    assert not layer.disable_adapters


def test_teacher_mode_refuses_plain_gradient_checkpointing():
    """diffusers' checkpointing recomputes in backward, after teacher mode exited, i.e. WITH the LoRA."""
    unet = _unet("sd")
    add_student_lora(unet, LORA)
    unet.enable_gradient_checkpointing()
    with torch.no_grad(), teacher_mode(unet):  # nothing is recomputed without grad
        pass
    with pytest.raises(RuntimeError, match="enable_gradient_checkpointing"), teacher_mode(unet):
        pass
    assert not next(m for m in unet.modules() if hasattr(m, "lora_A")).disable_adapters
    enable_gradient_checkpointing(unet)
    with teacher_mode(unet):
        pass


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_student_backward_reaches_only_lora_and_a_step_leaves_the_backbone(kind):
    unet = _unet(kind)
    add_student_lora(unet, LORA)
    _randomize(unet)
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    lora_before = lora_state_dict(unet)
    z, t, kw = _inputs(unet)
    z.requires_grad_(True)
    student = unet(z, t, **kw).sample
    with teacher_mode(unet):  # the G step then runs the frozen backbone on the student's output
        judged = unet(student, t, **kw).sample
    judged.square().mean().backward()  # backward after leaving teacher mode
    assert z.grad is not None and z.grad.abs().sum() > 0
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    lora_names = {n for n, p in unet.named_parameters() if f".{STUDENT}." in n}
    assert with_grad == lora_names  # every LoRA weight, nothing else
    torch.optim.AdamW(lora_parameters(unet), lr=1e-2).step()
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert all(not torch.equal(lora_state_dict(unet)[k], v) for k, v in lora_before.items())


def test_teacher_mode_backward_reaches_the_input_only():
    unet = _unet("sd")
    add_student_lora(unet, LORA)
    _randomize(unet)
    z, t, kw = _inputs(unet)
    z.requires_grad_(True)
    with teacher_mode(unet):
        unet(z, t, **kw).sample.sum().backward()
    assert z.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


# --- merged weights (train.lora.merged) --------------------------------------------------------------


def _cast(value, dtype):
    """Floating tensors of ``value`` (a tensor or nested dict) in ``dtype``."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if value.is_floating_point() else value


def _student_then_judged(unet, z, t, kw, *, slots: int = 2):
    """A G-step-like graph: student passes chained, each judged by the teacher-mode backbone and
    back-propagated on its own (detach #2), plus a second backward through the same student weights."""
    x = z
    for _ in range(slots):
        fake = unet(x, t, **kw).sample
        with teacher_mode(unet):
            judged = unet(fake, t, **kw).sample
        (judged.square().mean() + fake.abs().mean()).backward()
        x = fake.detach()
    return x


@pytest.mark.parametrize("kind", ["sd", "sdxl", "toy"])
def test_merged_student_is_the_peft_student_in_values_and_gradients(kind):
    unet = _unet(kind)
    add_student_lora(unet, LORA)
    _randomize(unet)
    z, t, kw = _inputs(unet)
    names = [n for n, _ in unet.named_parameters()]
    with torch.no_grad():
        peft_out = unet(z, t, **kw).sample
        with teacher_mode(unet):
            teacher_out = unet(z, t, **kw).sample
        with merged_student(unet):
            merged_out = unet(z, t, **kw).sample
            with teacher_mode(unet):  # the teacher inside: the base weights, exactly
                assert torch.equal(unet(z, t, **kw).sample, teacher_out)
            with merged_student(unet):  # nested: a no-op
                assert torch.allclose(unet(z, t, **kw).sample, merged_out, atol=0, rtol=0)
    assert (peft_out - teacher_out).abs().max() > 1e-2  # the student differs from the teacher ...
    # ... and merging keeps it (float32 rounding only; exact in float64 below)
    assert (merged_out - peft_out).norm() < 1e-2 * (peft_out - teacher_out).norm()
    # gradients in float64, where the two orders of summation agree to ~1e-12 (float32 rounding
    # alone leaves up to 0.2% on small LoRA gradients two chained passes deep); a wrong chain rule is O(1)
    unet.double()
    z, kw = _cast(z, torch.float64), _cast(kw, torch.float64)
    for p in lora_parameters(unet):
        p.data = p.data.double()
    last_peft = _student_then_judged(unet, z, t, kw)
    grads_peft = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    with merged_student(unet):
        last_merged = _student_then_judged(unet, z, t, kw)
        assert all(p.grad is None for p in lora_parameters(unet))  # gradients reach the LoRA on exit
    grads_merged = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    torch.testing.assert_close(last_merged, last_peft, rtol=1e-9, atol=1e-9)
    assert set(grads_merged) == set(grads_peft) == {n for n in names if f".{STUDENT}." in n}
    worst = max(float((grads_merged[n] - g).norm() / g.norm()) for n, g in grads_peft.items())
    assert worst < 1e-9, worst
    z, kw = _cast(z, torch.float32), _cast(kw, torch.float32)
    unet.float()
    for p in lora_parameters(unet):
        p.data = p.data.float()
    # nothing left changed: the parameters (objects and order), the adapter flags, the student's output
    assert [n for n, _ in unet.named_parameters()] == names
    assert not any(m._disable_adapters for m in unet.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        assert torch.equal(unet(z, t, **kw).sample, peft_out)


def test_merged_student_restores_on_error_and_use_merged_refuses_what_would_be_wrong():
    unet = _unet("sd")
    add_student_lora(unet, LORA)
    weight = unet.conv_in.weight if not hasattr(unet.conv_in, "base_layer") else unet.conv_in.base_layer.weight
    layer = next(m for m in unet.modules() if hasattr(m, "lora_A"))
    base_weight = layer.get_base_layer().weight
    with pytest.raises(RuntimeError, match="boom"), merged_student(unet):
        assert layer.get_base_layer().weight is not base_weight
        raise RuntimeError("boom")
    assert layer.get_base_layer().weight is base_weight and unet.conv_in.weight is weight
    assert use_merged("auto", unet) and use_merged(True, unet) and not use_merged(False, unet)
    assert not use_merged("auto", unet, checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        use_merged(True, unet, checkpointing=True)
    with pytest.raises(ValueError, match="auto, true or false"):
        use_merged("yes", unet)
    unet.half()
    assert not use_merged("auto", unet)
    with pytest.raises(ValueError, match="float32 UNet"):
        use_merged(True, unet)
    enable_gradient_checkpointing(unet)
    unet.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"), merged_student(unet):
        pass


# --- checkpoints ---------------------------------------------------------------------------------


def test_lora_state_dict_matches_peft_and_round_trips():
    from peft import get_peft_model_state_dict

    unet = _unet("sdxl")
    add_student_lora(unet, LORA)
    _randomize(unet)
    sd = lora_state_dict(unet)
    peft_sd = get_peft_model_state_dict(unet, adapter_name=STUDENT)
    assert sd.keys() == peft_sd.keys() and len(sd) == 2 * TINY_MODULES
    assert all(torch.equal(sd[k], peft_sd[k]) for k in sd)
    z, t, kw = _inputs(unet)
    other = _unet("sdxl")
    add_student_lora(other, LORA)
    load_lora_state_dict(other, sd)
    with torch.no_grad():
        assert torch.equal(other(z, t, **kw).sample, unet(z, t, **kw).sample)
    sd[next(iter(sd))] += 1  # a copy, not a view of the live weights
    assert not torch.equal(sd[next(iter(sd))], lora_state_dict(unet)[next(iter(sd))])
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, dict(list(sd.items())[1:]))
    bad = dict(sd)
    key = next(k for k in bad if ".lora_A." in k)
    bad[key] = torch.zeros(2, *bad[key].shape[1:])
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other, bad)


# --- export: what diffusers loads ----------------------------------------------------------------


def _loaded_modules(unet) -> dict[str, object]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def _random_student(teacher_dir):
    """(the loader config, a teacher of ``teacher_dir`` with a randomised student LoRA): the student differs
    from the teacher, so an export that drops or mis-scales a module shows."""
    from rapm.teacher import load_teacher

    cfg = {"path": str(teacher_dir), "device": "cpu"}
    student = load_teacher(cfg)
    add_student_lora(student.unet, LORA)
    _randomize(student.unet)
    return cfg, student


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_export_reloads_every_module_at_the_right_scale(fixture, request, tmp_path):
    from rapm.conditioning import encode_prompts
    from rapm.schedule import coarse_timesteps, ddim_sample
    from rapm.teacher import load_teacher, unet_eps

    cfg, student = _random_student(request.getfixturevalue(fixture))
    trained = {n for n in _loaded_modules(student.unet)}
    path = tmp_path / "lora.safetensors"
    assert export_lora(student.unet, path, LORA, {"run": "test"}) == len(trained) == TINY_MODULES

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["run"] == "test" and json.loads(meta["rapm.lora"])["alpha"] == 8.0
    assert all(k.startswith("unet.") for k in keys) and len(keys) == 2 * TINY_MODULES

    pipe_owner = load_teacher(cfg)  # a fresh copy of the teacher pipeline
    pipe = pipe_owner.pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))
    loaded = _loaded_modules(pipe.unet)
    assert set(loaded) == trained  # by name: nothing dropped, nothing extra
    pipe.fuse_lora()
    changed = set()
    for name, module in pipe.unet.named_modules():
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        key = name + ".weight"
        if key in before and weight is not None and not torch.equal(weight, before[key]):
            changed.add(name)
    assert changed == trained

    prompt, grid = "a red square above a blue circle", coarse_timesteps(4)
    z = torch.randn(1, *student.latent_shape(), generator=torch.Generator().manual_seed(5))
    cond = encode_prompts(student, [prompt])
    with torch.no_grad():
        ours, _ = ddim_sample(lambda x, t: unet_eps(student, x, t, cond), z, grid, student.alphas_cumprod)
        with teacher_mode(student.unet):
            teacher, _ = ddim_sample(lambda x, t: unet_eps(student, x, t, cond), z, grid, student.alphas_cumprod)
        fused = pipe(prompt, num_inference_steps=4, guidance_scale=1.0, latents=z.clone(), output_type="latent").images
    assert (ours - teacher).abs().max() > 1.0  # the adapter matters, so agreement below is not vacuous
    torch.testing.assert_close(fused, ours, atol=1e-4, rtol=1e-5)


def test_float16_export_is_the_rounded_float32_export(tmp_path):
    from safetensors.torch import load_file

    unet = _unet("sd")
    add_student_lora(unet, LORA)
    _randomize(unet)
    export_lora(unet, tmp_path / "32.safetensors", LORA, {})
    assert export_lora(unet, tmp_path / "16.safetensors", LORA, {}, dtype=torch.float16) == TINY_MODULES
    full, half = load_file(tmp_path / "32.safetensors"), load_file(tmp_path / "16.safetensors")
    assert full.keys() == half.keys() and all(v.dtype == torch.float16 for v in half.values())
    assert all(torch.equal(half[k], full[k].half()) for k in full)
    key = next(k for k in full if ".lora_B." in k)  # alpha/r = 8 folded in before rounding
    module = key.removeprefix("unet.").rsplit(".lora_B.", 1)[0]
    torch.testing.assert_close(full[key], 8 * lora_state_dict(unet)[f"{module}.lora_B.weight"])


def test_export_is_byte_reproducible_and_refuses_weights_not_finite_in_its_dtype(tmp_path):
    from rapm.io import NonFiniteTensorError

    unet = _unet("sd")
    add_student_lora(unet, LORA)
    _randomize(unet)
    meta = {"rapm.config": "{}", "rapm.step": "8", "run": "x"}  # 5 keys with ours: safetensors' order would vary
    export_lora(unet, tmp_path / "a.safetensors", LORA, meta, dtype=torch.float16)
    export_lora(unet, tmp_path / "b.safetensors", LORA, dict(reversed(list(meta.items()))), dtype=torch.float16)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    _randomize(unet, std=1e4)  # finite in float32; lora_B * alpha/r = 8 overflows float16 (max 65504)
    with pytest.raises(NonFiniteTensorError, match=r"tensor 'unet\..*\.lora_B\.weight' \(float16.*±inf") as err:
        export_lora(unet, tmp_path / "c.safetensors", LORA, {}, dtype=torch.float16)
    assert ".lora_B." in err.value.name and not (tmp_path / "c.safetensors").exists()
    export_lora(unet, tmp_path / "c.safetensors", LORA, {})  # float32 holds it


def test_export_checks_config_and_metadata(tmp_path):
    unet = _unet("sd")
    add_student_lora(unet, LORA)
    with pytest.raises(ValueError, match="lora_cfg says 2"):
        export_lora(unet, tmp_path / "a.safetensors", {**LORA, "rank": 2}, {})
    with pytest.raises(ValueError, match="bad keys: \\['format'\\]"):
        export_lora(unet, tmp_path / "a.safetensors", LORA, {"format": "x"})
    with pytest.raises(ValueError, match="bad keys: \\['steps'\\]"):
        export_lora(unet, tmp_path / "a.safetensors", LORA, {"steps": 4})
    with pytest.raises(ValueError, match="unknown LoRA export dtype"):
        export_lora(unet, tmp_path / "a.safetensors", LORA, {}, dtype=torch.int8)
    assert not list(tmp_path.iterdir())


# --- kohya-ss export (sd-scripts, AUTOMATIC1111, ComfyUI) --------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_kohya_export_matches_diffusers_converter_and_reloads_to_the_same_weights(fixture, request, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rapm.kohya import export_kohya
    from rapm.teacher import load_teacher

    cfg, student = _random_student(request.getfixturevalue(fixture))
    ours_path, kohya_path = tmp_path / "lora.safetensors", tmp_path / "lora_kohya.safetensors"
    export_lora(student.unet, ours_path, LORA, {"run": "test"})
    assert export_kohya(ours_path, kohya_path) == TINY_MODULES

    # key mapping: the same as diffusers' own PEFT -> kohya converter (an independent implementation)
    kohya, oracle = load_file(kohya_path), convert_state_dict_to_kohya(load_file(ours_path))
    assert set(kohya) == set(oracle) and len(kohya) == 3 * TINY_MODULES
    for k, v in oracle.items():
        assert torch.equal(kohya[k], v.to(kohya[k].dtype)) if k.endswith(".alpha") else torch.equal(kohya[k], v), k
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {1.0}  # rank 1: scale alpha/rank = 1
    with safe_open(str(kohya_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["run"]) == ("1", "1", "test")

    # diffusers reads the kohya file (its non-diffusers LoRA loader) to the same fused UNet
    fused = {}
    for name, path in (("ours", ours_path), ("kohya", kohya_path)):
        pipe = load_teacher(cfg).pipe
        base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused[name] = pipe.unet.state_dict()
    changed = [k for k in base if not torch.equal(fused["ours"][k], base[k])]
    assert len(changed) == TINY_MODULES  # every adapted module's weight moved
    for k in base:
        torch.testing.assert_close(fused["kohya"][k], fused["ours"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert (
        kohya_path.read_bytes()
        == (export_kohya(ours_path, tmp_path / "again.safetensors"), (tmp_path / "again.safetensors").read_bytes())[1]
    )


def test_merged_weights_are_reused_only_while_the_lora_is_unchanged():
    """W + sBA is computed once per LoRA state: a second pass on the same weights reuses the tensors, an
    in-place change, a fused AdamW step (whose missing version bump the trainer adds) or a replaced
    storage recompute them (rapm.objective.optimizers' hook adds the missing bump); the results equal a fresh merge."""
    from torch.autograd.graph import increment_version

    unet = _unet("toy")
    add_student_lora(unet, LORA)
    _randomize(unet)
    z, t, kw = _inputs(unet)
    layer = next(m for m in unet.modules() if hasattr(m, "lora_A"))

    def merged_weight():
        with torch.no_grad(), merged_student(unet):
            return layer.get_base_layer().weight

    first = merged_weight()
    assert merged_weight() is first  # unchanged LoRA: the same tensor
    with merged_student(unet):  # under grad: a new leaf over the same values, gradients still reach the LoRA
        leaf = layer.get_base_layer().weight
        assert leaf is not first and leaf.requires_grad and torch.equal(leaf, first)
        unet(z, t, **kw).sample.square().mean().backward()
    params = lora_parameters(unet)
    assert all(p.grad is not None for p in params)
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    opt.step()
    assert merged_weight() is first  # fused AdamW wrote without bumping the versions: stale ...
    increment_version(params)  # ... hence the optimisers' hook
    second = merged_weight()
    from rapm.objective import optimizers

    optim = {"student_lr": 0.1, "student_betas": [0.9, 0.999], "student_weight_decay": 0.0}
    optim.update(disc_lr=0.1, disc_betas=[0.9, 0.999], disc_weight_decay=0.0)
    opt_g, _ = optimizers(optim, params, [torch.nn.Parameter(torch.zeros(1))])
    versions = [p._version for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt_g.step()
    assert all(p._version > v for p, v in zip(params, versions))
    assert merged_weight() is not second  # the hook's bump: recomputed after the step
    second = merged_weight()
    b = layer.lora_B[STUDENT].weight
    expected = torch.addmm(
        layer.get_base_layer().weight.view(len(b), -1),
        b.view(len(b), -1),
        layer.lora_A[STUDENT].weight.view(layer.lora_A[STUDENT].weight.shape[0], -1),
        alpha=float(layer.scaling[STUDENT]),
    ).view(first.shape)
    assert second is not first and torch.equal(second, expected) and not torch.equal(second, first)
    with torch.no_grad():
        b.add_(1.0)  # an ordinary in-place write bumps the version itself
    third = merged_weight()
    assert not torch.equal(third, second)
    for p in params:
        p.data = p.data.clone()  # new storage: the cached views are rebuilt and follow it
    fourth = merged_weight()
    assert fourth is not third and torch.equal(fourth, third)
    with torch.no_grad():
        layer.lora_B[STUDENT].weight.add_(1.0)
    assert not torch.equal(merged_weight(), fourth)
