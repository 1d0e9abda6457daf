"""The two PCM-style discriminators of RAPM (method.md §3), sharing the frozen teacher UNet as backbone.

D1 judges relative positions, D2 absolute ones. Both read the same features: the hidden states after
each down block and the mid block (and each up block for SD1.5-family teachers: ``blocks: auto``,
method.md §3) of the teacher UNet, i.e. the student's
own UNet inside :func:`rapm.lora.teacher_mode`, conditioned on the timestep and the text exactly as
the UNet is (SDXL: pooled text embedding and time ids through ``added_cond_kwargs``). Each has its own
small trainable head per feature map (``heads["rel"]``, ``heads["abs"]``):

    h = LReLU(GN(conv1x1(x)));  h = h + LReLU(GN(conv1x1(h)));  logit = conv1x1(h)   (one per position)

The features come from forward hooks on the UNet's own blocks, so SD1.5-, SDXL- and toy-type
``UNet2DConditionModel`` s run through the same code; the forward stops (an internal exception) right
after the last block needed, so with ``[down, mid]`` (SDXL's default) the up blocks are never computed.

Gradients: the UNet is NOT a submodule (``parameters()``/``state_dict()`` hold only the heads) and
its base weights are frozen here; gradients flow through it to the input z (the student's G step)
and to the LoRA weights of whatever produced z, never into the backbone. Re-noising real and fake to
τ before judging (``disc_cfg["renoise"]``, method.md §3) is the caller's job,
:func:`rapm.schedule.renoise`; call this with the noised states and τ.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from rapm.config import section_defaults
from rapm.lora import teacher_mode
from rapm.teacher import unet_dtype

BLOCKS = ("down", "mid", "up")  # in execution order
HEADS = ("rel", "abs")  # D1 (relative positions), D2 (absolute positions)
LEAKY_SLOPE = 0.2


class _StopForward(Exception):
    """Raised by the hook on the last block needed: the rest of the UNet is not computed."""


class DiscriminatorHead(nn.Module):
    """conv → GroupNorm → LeakyReLU, a second such block added residually, then a 1×1 conv to one logit
    per position (method.md §3; PCM's head with 1×1 convolutions)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        groups = max(g for g in range(1, 33) if channels % g == 0)
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU(LEAKY_SLOPE)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU(LEAKY_SLOPE)
        )
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block1(x)
        return self.out(h + self.block2(h))


def default_blocks(unet: nn.Module) -> list[str]:
    """``blocks: auto`` (method.md §3): down + mid for an SDXL-type UNet (``addition_embed_type`` text_time),
    down + mid + up for SD1.5-family UNets (the toy teacher included), as in PCM's released code."""
    config = getattr(unet, "config", None)
    sdxl = getattr(config, "addition_embed_type", None) == "text_time" if config is not None else False
    return ["down", "mid"] if sdxl else ["down", "mid", "up"]


def _disc_cfg(disc_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = section_defaults("train.discriminator")
    unknown = set(disc_cfg or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown train.discriminator key(s) {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(disc_cfg or {})
    blocks = cfg["blocks"]
    if blocks != "auto":
        if isinstance(blocks, str) or not blocks:
            raise ValueError(f"train.discriminator.blocks must be a non-empty list of {BLOCKS}, got {blocks!r}")
        for name in blocks:
            if name not in BLOCKS:
                raise ValueError(f"unknown discriminator block {name!r}; choose from {', '.join(BLOCKS)}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"train.discriminator.blocks lists a block twice: {blocks!r}")
    hc = cfg["head_channels"]
    if isinstance(hc, bool) or not isinstance(hc, int) or hc < 1:
        raise ValueError(f"train.discriminator.head_channels must be a positive integer, got {hc!r}")
    return cfg


class Discriminator(nn.Module):
    """Heads ``rel`` (D1) and ``abs`` (D2) on the frozen UNet backbone (method.md §3).

    ``heads[head][feature_name]`` is the head of one feature map; ``feature_names`` lists the maps in
    order (``down_0``, …, ``mid``, ``up_0``, …) as ``features`` returns them.
    """

    def __init__(self, unet: nn.Module, disc_cfg: Mapping[str, Any] | None = None):
        super().__init__()
        self.cfg = _disc_cfg(disc_cfg)
        if self.cfg["blocks"] == "auto":
            self.cfg["blocks"] = default_blocks(unet)
        self._backbone = (unet,)  # a tuple, so the UNet is not registered as a submodule
        for name, p in unet.named_parameters():  # frozen backbone; the student LoRA stays as it is
            if "lora_" not in name:
                p.requires_grad_(False)
        self._taps = self._tap_points(unet)
        self.feature_names = [name for name, _, _ in self._taps]
        self.heads = nn.ModuleDict(
            {
                head: nn.ModuleDict(
                    {name: DiscriminatorHead(ch, self.cfg["head_channels"]) for name, _, ch in self._taps}
                )
                for head in HEADS
            }
        )

    @property
    def unet(self) -> nn.Module:
        return self._backbone[0]

    def _tap_points(self, unet) -> list[tuple[str, nn.Module, int]]:
        """(name, block, output channels) of the blocks in ``cfg["blocks"]``, in execution order.

        Channels are probed from the modules: the last resnet of a block sets its output width.
        """
        taps = []
        for kind in BLOCKS:
            if kind not in self.cfg["blocks"]:
                continue
            blocks = [unet.mid_block] if kind == "mid" else list(getattr(unet, f"{kind}_blocks"))
            for i, block in enumerate(blocks):
                if block is None:
                    raise ValueError("the UNet has no mid block; drop 'mid' from train.discriminator.blocks")
                taps.append(("mid" if kind == "mid" else f"{kind}_{i}", block, block.resnets[-1].out_channels))
        return taps

    def features(self, z: Tensor, t: Tensor | int, cond) -> list[Tensor]:
        """Hidden states of the teacher UNet (adapter disabled) after each tapped block, for states z
        (B, C, H, W) at timesteps t ((B,) tensor or int) with ``cond`` (a :class:`rapm.conditioning.Conditioning`,
        batch 1 or B). Differentiable in z; the backbone gets no gradient. For the D step on detached
        inputs, wrap this in ``torch.no_grad()`` and apply :meth:`logits` outside it."""
        unet = self.unet
        captured: dict[str, Tensor] = {}
        last = self.feature_names[-1]

        def tap(name):
            def hook(module, args, output):
                captured[name] = output[0] if isinstance(output, tuple) else output
                if name == last:
                    raise _StopForward

            return hook

        if not isinstance(t, Tensor):
            t = torch.full((len(z),), int(t), dtype=torch.long)
        dtype = unet_dtype(unet)
        cond = cond.expand(len(z)).to(z.device, dtype)
        handles = [block.register_forward_hook(tap(name)) for name, block, _ in self._taps]
        try:
            with teacher_mode(unet):
                unet(z.to(dtype), t.to(z.device), **cond.unet_kwargs(), return_dict=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[name] for name in self.feature_names]

    def logits(self, feats: list[Tensor], head: str) -> list[Tensor]:
        """One logit map (B, 1, h, w) per feature map, from the heads of D1 (``"rel"``) or D2 (``"abs"``)."""
        if head not in HEADS:
            raise ValueError(f"unknown discriminator head {head!r}; choose from {', '.join(HEADS)}")
        if len(feats) != len(self.feature_names):
            raise ValueError(f"got {len(feats)} feature maps, the heads expect {len(self.feature_names)}")
        heads = self.heads[head]
        out = []
        for name, f in zip(self.feature_names, feats):
            weight = heads[name].out.weight
            out.append(heads[name](f.to(weight.dtype)))
        return out

    def forward(self, z: Tensor, t: Tensor | int, cond, head: str) -> list[Tensor]:
        """``logits(features(z, t, cond), head)``."""
        if head not in HEADS:  # fail before running the backbone
            raise ValueError(f"unknown discriminator head {head!r}; choose from {', '.join(HEADS)}")
        return self.logits(self.features(z, t, cond), head)
