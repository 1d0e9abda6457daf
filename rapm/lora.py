"""The student: the teacher UNet plus a peft LoRA adapter (method.md, "Notation" and §4 "LoRA").

ONE module serves as student and teacher: :func:`add_student_lora` attaches the adapter
:data:`STUDENT` (lora_B = 0, so the student starts equal to the teacher) and freezes every base
weight; inside :func:`teacher_mode` the adapter is disabled and the same module IS the teacher (and
the discriminator backbone, method.md §3). No second copy of the UNet exists.

Two traps of the peft/diffusers stack (docs/platform-notes.md, "peft LoRA traps") are avoided here:

- :func:`export_lora` writes the peft state dict as is, prefixed ``unet.``; the diffusers training
  scripts' ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` loses the attention
  LoRA on reload when conv/ff/proj modules are targeted too (79 → 47 modules on the tiny UNets);
- ``lora_alpha`` is not in a peft state dict, and diffusers reloads an adapter at alpha = rank; so the
  scale alpha/r is folded into lora_B on export. ``tests/test_lora.py`` reloads the file with
  ``pipe.load_lora_weights`` + ``pipe.fuse_lora`` and checks module counts and 4-step samples.

Training passes may run on merged weights instead of peft's adapter branch (``train.lora.merged``,
:mod:`rapm.merged`): the same function to float rounding, with a bare UNet's ops (the toy's update
at 1.35x its bare passes instead of 1.55x; not used for SD1.5/SDXL, where it would cost more).

peft's ``enable_adapters`` also sets ``requires_grad`` on adapter weights (True on enable, False on
disable); :func:`teacher_mode` does not call it: it flips only each layer's disable flag (layers found
once and cached), so it has no side effect and costs microseconds whatever the size of the UNet.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from rapm.config import section_defaults

STUDENT = "student"

#: PCM's LoRA targets (method.md §4), module-name suffixes as peft matches them (the schema's
#: ``train.lora.targets`` default)
PCM_TARGETS = tuple(section_defaults("train.lora")["targets"])
#: safetensors metadata keys written by :func:`export_lora` (callers may not set them).
RESERVED_METADATA = ("format", "lora_adapter_metadata", "rapm.lora")


def _lora_cfg(lora_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = section_defaults("train.lora")
    unknown = set(lora_cfg or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown train.lora key(s) {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(lora_cfg or {})
    if isinstance(cfg["rank"], bool) or not isinstance(cfg["rank"], int) or cfg["rank"] < 1:
        raise ValueError(f"train.lora.rank must be a positive integer, got {cfg['rank']!r}")
    if isinstance(cfg["alpha"], bool) or not isinstance(cfg["alpha"], (int, float)) or not cfg["alpha"] > 0:
        raise ValueError(f"train.lora.alpha must be a positive number, got {cfg['alpha']!r}")
    if isinstance(cfg["targets"], str) or not cfg["targets"]:
        raise ValueError(f"train.lora.targets must be a non-empty list of module names, got {cfg['targets']!r}")
    return cfg


def resolve_targets(unet: nn.Module, targets) -> list[str]:
    """Full names of the modules of ``unet`` that the target suffixes select (peft's matching rule:
    the name equals the target or ends with ``"." + target``). Every target must select at least one
    module, and only ``nn.Linear``/``nn.Conv2d`` may be selected; else ``ValueError``."""
    names, hits = [], {t: 0 for t in targets}
    for name, module in unet.named_modules():
        matched = [t for t in targets if name == t or name.endswith("." + t)]
        if not matched:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"LoRA target {matched[0]!r} selects {name}, a {type(module).__name__}; "
                "only Linear and Conv2d layers can carry the student LoRA"
            )
        names.append(name)
        for t in matched:
            hits[t] += 1
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"unknown LoRA target(s) {missing}: no module of the UNet is named so")
    return names


def _peft_layers(unet: nn.Module) -> list[nn.Module]:
    """The peft tuner layers of ``unet``, found by one walk of its modules and cached on the UNet.

    The cache is keyed by the adapters the UNet carries (``peft_config``), so adding an adapter
    (:func:`add_student_lora`) finds the new layers; :func:`teacher_mode` and the discriminator call
    this several times per update, and walking an SDXL UNet's ~6,000 modules each time cost 0.3 s.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(unet, "peft_config", {}) or {}))
    cached = unet.__dict__.get("_rapm_peft_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        unet.__dict__["_rapm_peft_layers"] = cached  # a plain attribute: not a submodule, not in state_dict
    return cached[1]


def _checkpointed_blocks(unet: nn.Module) -> list[nn.Module]:
    """The modules that have a ``gradient_checkpointing`` switch (diffusers' blocks), cached like
    :func:`_peft_layers`; whether checkpointing is on is read from them at each call."""
    cached = unet.__dict__.get("_rapm_ckpt_blocks")
    if cached is None:
        cached = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
        unet.__dict__["_rapm_ckpt_blocks"] = cached
    return cached


def _student_params(unet: nn.Module) -> dict[str, nn.Parameter]:
    """{peft state-dict name: parameter} of the student adapter, e.g. ``….conv1.lora_A.weight``."""
    out = {}
    for name, p in unet.named_parameters():
        for part in (".lora_A.", ".lora_B."):
            if part + STUDENT + "." in name:
                out[name.replace(part + STUDENT + ".", part)] = p
    if not out:
        raise ValueError(f"the UNet has no {STUDENT!r} LoRA adapter; call add_student_lora first")
    return out


def add_student_lora(unet: nn.Module, lora_cfg: Mapping[str, Any] | None) -> None:
    """Attach the student adapter (method.md §4): rank r, lora_alpha, the resolved targets.

    lora_B starts at zero (peft's default init), so the student equals the teacher at step 0. All
    base weights get ``requires_grad=False``; the LoRA weights are trainable and kept in float32 even
    on a float16/bfloat16 UNet (peft casts activations to them and back).
    """
    from peft import LoraConfig

    cfg = _lora_cfg(lora_cfg)
    if STUDENT in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has a {STUDENT!r} adapter")
    config = LoraConfig(
        r=cfg["rank"],
        lora_alpha=cfg["alpha"],
        target_modules=resolve_targets(unet, cfg["targets"]),
        init_lora_weights=True,
    )
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=STUDENT)
    unet.set_adapter(STUDENT)
    for p in _student_params(unet).values():
        p.data = p.data.float()
        p.requires_grad_(True)


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The student's trainable parameters (lora_A and lora_B of every adapted module)."""
    return list(_student_params(unet).values())


def count_lora_modules(unet: nn.Module) -> int:
    """Number of modules that carry the student adapter."""
    return sum(1 for k in _student_params(unet) if ".lora_A." in k)


@contextlib.contextmanager
def teacher_mode(unet: nn.Module) -> Iterator[nn.Module]:
    """Adapter disabled inside: the module IS the teacher (method.md, "Notation"). On exit the previous
    state is restored (nesting works). A UNet without adapters is the teacher already.

    Only each cached peft layer's ``_disable_adapters`` flag flips (what peft's ``enable_adapters``
    sets and its forward reads; written to the instance dict, skipping ``nn.Module.__setattr__``); ``requires_grad`` is never touched, so there is nothing to restore
    and the cost does not grow with the number of parameters (peft's ``disable_adapters`` walks every
    module and rewrites every adapter weight's ``requires_grad``). Inside :func:`rapm.merged.merged_student`
    the base layers' weights are switched back to the teacher's instead.
    """
    layers = _peft_layers(unet)
    if not layers:
        yield unet
        return
    merged = unet.__dict__.get(_MERGED)
    if merged is not None:
        before = [base.__dict__["weight"] for base, _, _ in merged]
        for base, weight, _ in merged:
            base.__dict__["weight"] = weight
        try:
            yield unet
        finally:
            for (base, _, _), w in zip(merged, before):
                base.__dict__["weight"] = w
        return
    _check_checkpointing(unet)
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m.__dict__["_disable_adapters"] = True
    try:
        yield unet
    finally:
        for m, off in zip(layers, before):
            m.__dict__["_disable_adapters"] = off


_MERGED = "_rapm_merged"  # the UNet's plain attribute holding the merged weights inside rapm.merged.merged_student


@contextlib.contextmanager
def _adapter_state(layers: list[nn.Module], disabled: list[bool]) -> Iterator[None]:
    """Set each peft layer's adapters on/off as recorded (the flag :func:`teacher_mode` flips), restoring after."""
    before = [m._disable_adapters for m in layers]
    try:
        for m, off in zip(layers, disabled):
            m.__dict__["_disable_adapters"] = off
        yield
    finally:
        for m, off in zip(layers, before):
            m.__dict__["_disable_adapters"] = off


def _adapter_aware_checkpoint(module, *args):
    """``torch.utils.checkpoint`` (non-reentrant) that recomputes ``module`` in backward with its
    adapters on or off as they were in forward: the teacher-mode backbone pass of the G step is
    back-propagated after :func:`teacher_mode` has exited, and without this its recomputation would
    run the student's LoRA (diffusers' default function fails with ``CheckpointError``)."""
    from torch.utils.checkpoint import checkpoint

    layers = _peft_layers(module) if isinstance(module, nn.Module) else []
    if not layers:
        return checkpoint(module, *args, use_reentrant=False)
    disabled = [m._disable_adapters for m in layers]
    return checkpoint(
        module,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _adapter_state(layers, disabled)),
    )


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Gradient checkpointing that is correct across :func:`teacher_mode` (use instead of
    ``unet.enable_gradient_checkpointing()``, which :func:`teacher_mode` refuses under grad)."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_adapter_aware_checkpoint)


def _check_checkpointing(unet: nn.Module) -> None:
    if not torch.is_grad_enabled():
        return
    funcs = {
        getattr(m, "_gradient_checkpointing_func", None)
        for m in _checkpointed_blocks(unet)
        if getattr(m, "gradient_checkpointing", False)
    }
    if funcs - {_adapter_aware_checkpoint}:
        raise RuntimeError(
            "gradient checkpointing is on with a function that would recompute the teacher-mode pass "
            "with the student LoRA enabled; turn it on with rapm.lora.enable_gradient_checkpointing(unet)"
        )


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the student LoRA weights under peft's names (``get_peft_model_state_dict``)."""
    return {k: p.detach().clone() for k, p in _student_params(unet).items()}


def load_lora_state_dict(unet: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy ``state_dict`` (from :func:`lora_state_dict`) into the student adapter; keys and shapes must match exactly."""
    params = _student_params(unet)
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match the student adapter: missing {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for k, p in params.items():
            if tuple(state_dict[k].shape) != tuple(p.shape):
                raise ValueError(f"LoRA weight {k}: shape {tuple(state_dict[k].shape)} != {tuple(p.shape)}")
            p.copy_(state_dict[k])


def export_lora(
    unet: nn.Module,
    path: str | os.PathLike,
    lora_cfg: Mapping[str, Any] | None,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Write ``lora.safetensors`` for diffusers' ``pipe.load_lora_weights(path)`` + ``pipe.fuse_lora()``.

    Keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft names), each lora_B multiplied by
    its module's scale alpha/r (in float32), so the file is exact at diffusers' reload scale 1. Stored
    in ``dtype``: float32 by default; float16 halves the file (SDXL rank 1: 12.5 → 6.3 MB, the
    paper's "about 7 MB").
    ``lora_cfg`` must describe the adapter (checked); it and ``metadata`` (str → str, the caller's
    config and provenance) go into the safetensors metadata, ours under ``rapm.lora``. Written
    atomically with deterministic bytes (:func:`rapm.io.save_safetensors`); every tensor must be finite
    in ``dtype`` (a float32 weight beyond float16's range is inf once cast), else
    :class:`rapm.io.NonFiniteTensorError` names it and nothing is written. Returns the number of LoRA
    modules written.
    """
    from rapm.io import save_safetensors

    cfg = _lora_cfg(lora_cfg)
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str) or k in RESERVED_METADATA]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unknown LoRA export dtype {dtype!r}; use torch.float32, float16 or bfloat16")
    if bad:
        raise ValueError(f"metadata must map str to str and avoid {RESERVED_METADATA}; bad keys: {bad}")
    scales = {}
    for name, module in unet.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and STUDENT in scaling:
            r, alpha = module.r[STUDENT], module.lora_alpha[STUDENT]
            if (r, float(alpha)) != (cfg["rank"], float(cfg["alpha"])):
                raise ValueError(
                    f"{name}: adapter has rank {r}, alpha {alpha}; lora_cfg says {cfg['rank']}, {cfg['alpha']}"
                )
            scales[name] = scaling[STUDENT]
    tensors = {}
    for key, value in lora_state_dict(unet).items():
        module_name = key.rsplit(".lora_", 1)[0]
        if ".lora_B." in key:
            value = value.float() * scales[module_name]
        tensors["unet." + key] = value.float().to(dtype).contiguous().cpu()
    n_modules = sum(1 for k in tensors if ".lora_A." in k)
    info = {
        "rank": cfg["rank"],
        "alpha": cfg["alpha"],
        "targets": list(cfg["targets"]),
        "alpha_folded_into_lora_B": True,
        "modules": n_modules,
        "dtype": str(dtype).removeprefix("torch."),
    }
    save_safetensors(
        tensors, Path(path), {"format": "pt", "rapm.lora": json.dumps(info), **metadata}, require_finite=True
    )
    return n_modules
