"""The PCM-style discriminators (rapm.discriminator, method.md §3) on the tiny SD1.5-, SDXL- and toy UNets.

Checked: the features are the teacher UNet's own hidden states (adapter disabled, up blocks skipped
unless asked), conditioned on t and text (SDXL: pooled text and time ids too); D1/D2 heads are
separate and are the only parameters; gradients reach the input z and the student's LoRA, never the
backbone, whose weights an optimiser step leaves bit-identical.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rapm.conditioning import Conditioning
from rapm.discriminator import HEADS, Discriminator
from rapm.lora import add_student_lora, enable_gradient_checkpointing, lora_parameters, teacher_mode
from rapm.losses import d_hinge, g_hinge

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = {"rank": 1, "alpha": 8.0}


def _unet(kind: str, lora: bool = True):
    from diffusers import UNet2DConditionModel

    if kind == "toy":
        tinysd = pytest.importorskip("rapm.toy.tinysd")
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**tinysd.UNET_CONFIG).eval()
    else:
        from rapm.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

        unet = (tiny_sd_pipeline if kind == "sd" else tiny_sdxl_pipeline)(seed=0).unet
    if lora:
        add_student_lora(unet, LORA)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lora_parameters(unet):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet


def _inputs(unet, batch: int = 2, seed: int = 3):
    """Seeded states z, timesteps t and a Conditioning (SDXL-type: pooled embeds and time ids)."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    z = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([900, 300][:batch])
    embeds = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    if unet.config.addition_embed_type != "text_time":
        return z, t, Conditioning(embeds)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
    return z, t, Conditioning(embeds, torch.randn(batch, pooled, generator=gen), ids)


def _reference_features(unet, z, t, cond) -> dict[str, torch.Tensor]:
    """Block outputs of one ordinary, complete forward of the base UNet (no early stop)."""
    out, handles = {}, []
    blocks = [(f"down_{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid", unet.mid_block)]
    blocks += [(f"up_{i}", b) for i, b in enumerate(unet.up_blocks)]
    for name, block in blocks:
        handles.append(
            block.register_forward_hook(
                lambda m, a, o, name=name: out.__setitem__(name, o[0] if isinstance(o, tuple) else o)
            )
        )
    with teacher_mode(unet):
        unet(z, t, **cond.unet_kwargs())
    for h in handles:
        h.remove()
    return out


# --- features ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl", "toy"])
def test_features_are_the_teacher_block_outputs(kind):
    unet = _unet(kind)
    z, t, cond = _inputs(unet)
    with torch.no_grad():
        ref = _reference_features(unet, z, t, cond)
        student_before = unet(z, t, **cond.unet_kwargs()).sample
        for blocks in (["down", "mid"], ["down", "mid", "up"], ["mid"], ["up"]):
            disc = Discriminator(unet, {"blocks": blocks})
            feats = disc.features(z, t, cond)
            expected = [n for n in ref if n.split("_")[0] in blocks]
            assert disc.feature_names == expected
            for name, f in zip(expected, feats):
                assert torch.equal(f, ref[name]), name
            logits = disc(z, t, cond, "rel")
            assert [tuple(l.shape) for l in logits] == [(2, 1, *f.shape[2:]) for f in feats]
        # the adapter is back on after the discriminator ran: the student is unchanged
        assert torch.equal(unet(z, t, **cond.unet_kwargs()).sample, student_before)
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    # DEFAULT blocks "auto" (method.md §3): SDXL down + mid, SD1.5-family (the toy too) down + mid + up
    expected = n_down + 1 if kind == "sdxl" else n_down + 1 + n_up
    assert len(Discriminator(unet, {}).feature_names) == expected


def test_features_ignore_the_student_lora():
    """With the adapter disabled the backbone IS the teacher: same features as a UNet without LoRA."""
    with_lora, plain = _unet("sd"), _unet("sd", lora=False)
    z, t, cond = _inputs(plain)
    with torch.no_grad():
        a = Discriminator(with_lora, {}).features(z, t, cond)
        b = Discriminator(plain, {}).features(z, t, cond)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_up_blocks_run_only_when_asked_and_hooks_are_removed():
    unet = _unet("sd")
    z, t, cond = _inputs(unet)
    calls = []
    probe = unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        Discriminator(unet, {"blocks": ["down", "mid"]}).features(z, t, cond)
        assert calls == []
        Discriminator(unet, {"blocks": ["down", "up"]}).features(z, t, cond)
        assert calls == [1]
    probe.remove()
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert all(not b._forward_hooks for b in blocks)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_conditioning_reaches_the_backbone(kind):
    unet = _unet(kind)
    disc = Discriminator(unet, {"blocks": ["down", "mid"]})
    z, t, cond = _inputs(unet)
    with torch.no_grad():
        mid = disc.features(z, t, cond)[-1]
        assert not torch.equal(disc.features(z, t + 50, cond)[-1], mid)
        assert not torch.equal(
            disc.features(z, t, dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds * 0.5))[-1], mid
        )
        if kind == "sdxl":
            assert not torch.equal(
                disc.features(z, t, dataclasses.replace(cond, pooled_embeds=-cond.pooled_embeds))[-1], mid
            )
            assert not torch.equal(
                disc.features(z, t, dataclasses.replace(cond, add_time_ids=cond.add_time_ids * 2))[-1], mid
            )
        # an int timestep and a batch-1 conditioning broadcast like the UNet's own arguments
        one = Conditioning(**{k: v[:1] for k, v in cond.tensors().items()})
        same = disc.features(z, torch.tensor([700, 700]), one.expand(2))
        assert all(torch.equal(a, b) for a, b in zip(disc.features(z, 700, one), same))


# --- heads and parameters ------------------------------------------------------------------------


def test_heads_are_separate_and_the_only_parameters():
    unet = _unet("sdxl")
    torch.manual_seed(0)
    disc = Discriminator(unet, {"blocks": ["down", "mid", "up"], "head_channels": 16})
    assert "unet" not in dict(disc.named_children()) and all(k.startswith("heads.") for k in disc.state_dict())
    n_maps = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert set(disc.heads) == set(HEADS) and all(len(disc.heads[h]) == n_maps for h in HEADS)
    rel, abs_ = set(map(id, disc.heads["rel"].parameters())), set(map(id, disc.heads["abs"].parameters()))
    assert not rel & abs_ and rel | abs_ == set(map(id, disc.parameters()))
    assert not set(map(id, unet.parameters())) & set(map(id, disc.parameters()))
    head = disc.heads["rel"]["mid"]
    assert head.block1[0].in_channels == unet.config.block_out_channels[-1] and head.out.out_channels == 1
    assert head.block1[1].num_groups == 16 and head.block1[0].kernel_size == (1, 1)
    z, t, cond = _inputs(unet)
    with torch.no_grad():
        feats = disc.features(z, t, cond)
        assert not torch.equal(disc.logits(feats, "rel")[0], disc.logits(feats, "abs")[0])


def test_head_is_the_documented_residual_stack():
    from rapm.discriminator import DiscriminatorHead

    torch.manual_seed(0)
    head = DiscriminatorHead(8, 32)
    x = torch.randn(2, 8, 3, 3)
    h = torch.nn.functional.leaky_relu(head.block1[1](head.block1[0](x)), 0.2)
    h = h + torch.nn.functional.leaky_relu(head.block2[1](head.block2[0](h)), 0.2)
    torch.testing.assert_close(head(x), head.out(h))


def test_bad_configs_raise():
    unet = _unet("sd", lora=False)
    with pytest.raises(ValueError, match="unknown discriminator block 'middle'"):
        Discriminator(unet, {"blocks": ["down", "middle"]})
    with pytest.raises(ValueError, match="non-empty list"):
        Discriminator(unet, {"blocks": []})
    with pytest.raises(ValueError, match="twice"):
        Discriminator(unet, {"blocks": ["mid", "mid"]})
    with pytest.raises(ValueError, match=r"unknown train.discriminator key\(s\) \['head'\]"):
        Discriminator(unet, {"head": 3})
    with pytest.raises(ValueError, match="head_channels"):
        Discriminator(unet, {"head_channels": 0})
    disc = Discriminator(unet, {})
    z, t, cond = _inputs(unet)
    with pytest.raises(ValueError, match="unknown discriminator head 'relative'"):
        disc(z, t, cond, "relative")
    with pytest.raises(ValueError, match="feature maps"):
        disc.logits([torch.zeros(1)], "abs")


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_d_step_reaches_only_its_heads_and_leaves_the_backbone(kind):
    unet = _unet(kind)
    disc = Discriminator(unet, {})
    before = {k: v.clone() for k, v in unet.state_dict().items()}  # base AND LoRA weights
    z, t, cond = _inputs(unet)
    real = z + 0.1
    fake = unet(z, t, **cond.unet_kwargs()).sample  # a student output, detached below (sg[fake])
    loss = d_hinge(disc(real, t, cond, "rel"), disc(fake.detach(), t, cond, "rel"))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads["rel"].parameters())
    assert all(p.grad is None for p in disc.heads["abs"].parameters())
    assert all(p.grad is None for p in unet.parameters())
    heads_before = {k: v.clone() for k, v in disc.state_dict().items()}
    torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.0, 0.999)).step()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert any(not torch.equal(v, heads_before[k]) for k, v in disc.state_dict().items() if ".rel." in k)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_g_step_backpropagates_through_the_frozen_backbone(kind):
    unet = _unet(kind)
    disc = Discriminator(unet, {"blocks": ["down", "mid", "up"]})
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    z, t, cond = _inputs(unet)
    z.requires_grad_(True)
    fake = unet(z, t, **cond.unet_kwargs()).sample  # student step, adapter enabled
    judged = fake.detach().requires_grad_(True)
    g_hinge(disc(judged, t, cond, "abs")).backward(retain_graph=True)
    assert judged.grad is not None and judged.grad.abs().sum() > 0  # gradient reaches the judged input
    assert all(p.grad is None for p in unet.parameters())
    g_hinge(disc(fake, t, cond, "abs")).backward()
    assert z.grad.abs().sum() > 0
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)  # the student's LoRA, nothing of the backbone
    assert len(with_grad) == len(lora_parameters(unet))
    torch.optim.AdamW(lora_parameters(unet), lr=1e-2).step()
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


def test_a_plain_unet_is_frozen_as_backbone():
    """Without a student adapter (e.g. a discriminator-only run) the backbone is frozen all the same."""
    unet = _unet("sd", lora=False)
    unet.requires_grad_(True)
    disc = Discriminator(unet, {})
    assert not any(p.requires_grad for p in unet.parameters())
    z, t, cond = _inputs(unet)
    z.requires_grad_(True)
    g_hinge(disc(z, t, cond, "rel")).backward()
    assert z.grad.abs().sum() > 0 and all(p.grad is None for p in unet.parameters())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_g_step_gradients_are_exact_with_gradient_checkpointing(kind):
    """The backbone pass (teacher mode) is recomputed in backward after the mode has exited; rapm's
    checkpointing recomputes it with the adapter off again, so gradients equal those without."""

    def grads(checkpointing: bool):
        unet = _unet(kind)
        if checkpointing:
            enable_gradient_checkpointing(unet)
            unet.train()
        torch.manual_seed(0)
        disc = Discriminator(unet, {"blocks": ["down", "mid", "up"]})
        z, t, cond = _inputs(unet, batch=1)
        z.requires_grad_(True)
        fake = unet(z, t, **cond.unet_kwargs()).sample
        g_hinge(disc(fake, t, cond, "abs")).backward()
        return [z.grad] + [p.grad for p in lora_parameters(unet)]

    plain, checkpointed = grads(False), grads(True)
    assert plain[0].abs().sum() > 0 and len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
