"""Training passes on merged weights (``train.lora.merged``): the student's forward with ONE weight W + s B A
per adapted layer instead of peft's extra branch (:func:`merged_student`; :func:`use_merged` decides).

The same function as the peft student (:mod:`rapm.lora`) to float rounding, with a bare UNet's ops (the toy's
update at 1.35x its bare passes instead of 1.55x; not used for SD1.5/SDXL, where it would cost more). Inside
:func:`merged_student`, :func:`rapm.lora.teacher_mode` switches the base layers back to the teacher's weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from rapm.lora import _MERGED, STUDENT, _checkpointed_blocks, _peft_layers

#: UNets above this many parameters train through peft's adapter forward under ``train.lora.merged: auto``
MERGED_AUTO_MAX_PARAMETERS = 50_000_000


def use_merged(setting: bool | str, unet: nn.Module, *, checkpointing: bool = False) -> bool:
    """Whether the student's forward runs on merged weights (:func:`merged_student`), from ``train.lora.merged``.

    ``auto``: yes for a float32 UNet of at most :data:`MERGED_AUTO_MAX_PARAMETERS` parameters without
    gradient checkpointing. There every op is cheap and the adapter's extra ops and wrappers cost as much as
    the network (the toy: a peft forward is 2.4x a bare one); on SD1.5/SDXL shapes the adapter costs a few
    percent while the merged path's full-size weight gradients cost a third more backward FLOPs and a
    copy of the adapted weights. ``true`` asks for it and is refused where it would be wrong: a UNet
    whose weights are not float32 (the rank-1 update would be rounded away in the sum) or gradient
    checkpointing (the recomputation would not see the weight switch of :func:`rapm.lora.teacher_mode`).
    """
    if setting is False:
        return False
    dtypes = {p.dtype for n, p in unet.named_parameters() if ".lora_" not in n}
    if setting == "auto":
        size = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
        return dtypes == {torch.float32} and not checkpointing and size <= MERGED_AUTO_MAX_PARAMETERS
    if setting is not True:
        raise ValueError(f"train.lora.merged must be auto, true or false, got {setting!r}")
    if dtypes != {torch.float32}:
        raise ValueError(
            f"train.lora.merged: true needs a float32 UNet (its weights are {sorted(map(str, dtypes))}): "
            "the LoRA update would be rounded away in W + BA; set it to auto or false"
        )
    if checkpointing:
        raise ValueError(
            "train.lora.merged: true cannot be combined with train.gradient_checkpointing; "
            "set one of them to false (merged: auto turns itself off)"
        )
    return True


def _merge_parts(unet: nn.Module) -> list[tuple]:
    """(peft layer, base layer, teacher weight, lora_A, lora_B, scale, W, A, B as 2-D views) per adapted
    layer, cached like :func:`_peft_layers` (optimisers update the parameters in place, so the views stay
    theirs; rebuilt when a parameter's storage was replaced)."""
    layers = _peft_layers(unet)
    cached = unet.__dict__.get("_rapm_merge_parts")
    if (
        cached is not None
        and cached[0] is layers
        and all(t2.data_ptr() == t.data_ptr() for part in cached[1] for t, t2 in zip(part[2:5], part[6:9]))
    ):
        return cached[1]
    parts = []
    with torch.no_grad():
        for m in layers:
            base = m.get_base_layer()
            if getattr(base, "groups", 1) != 1:
                raise ValueError(f"merged_student: {type(base).__name__} with groups={base.groups} is not supported")
            w, a, b = base.weight, m.lora_A[STUDENT].weight, m.lora_B[STUDENT].weight
            flat = [t.view(t.shape[0], -1) for t in (w, a, b)]
            parts.append((m, base, w, a, b, float(m.scaling[STUDENT]), *flat))
    unet.__dict__["_rapm_merge_parts"] = (layers, parts)
    unet.__dict__.pop("_rapm_merged_values", None)
    return parts


def bump_versions(opt: torch.optim.Optimizer, *_) -> None:
    """Optimiser step post-hook: bump the version counters of its parameters, which PyTorch's fused AdamW
    leaves unchanged when it writes them (:func:`_merged_values` reuses merged weights on them)."""
    torch.autograd.graph.increment_version([p for group in opt.param_groups for p in group["params"]])


def _merged_values(unet: nn.Module, parts: list[tuple]) -> list[torch.Tensor]:
    """W + s B A of every part (no graph), recomputed only when a LoRA weight changed since the last call
    (the in-place version counters of W, A and B): the D step's roll-out and the G step of one update see the
    same LoRA and get the same tensors, computed once. Every writer must bump the counters: in-place ops
    and ``load_state_dict`` do; PyTorch's fused AdamW does not (:func:`rapm.objective.optimizers` adds
    the hook :func:`bump_versions`); a write through ``.data`` is not seen."""
    versions = tuple(t._version for part in parts for t in part[2:5])
    cached = unet.__dict__.get("_rapm_merged_values")
    if cached is not None and cached[0] == versions:
        return cached[1]
    with torch.no_grad():
        values = [torch.addmm(w2, b2, a2, alpha=scale).view(w.shape) for _, _, w, _, _, scale, w2, a2, b2 in parts]
    unet.__dict__["_rapm_merged_values"] = (versions, values)
    return values


@contextlib.contextmanager
def merged_student(unet: nn.Module) -> Iterator[nn.Module]:
    """Inside, each adapted layer computes with ONE merged weight W + s B A (s = alpha/r) instead of
    peft's extra branch: the same function (to float rounding), with the ops and Python of a bare UNet.

    The merged weights are computed on entry, or reused while W, A and B are unchanged. Under grad each
    is a leaf that collects the gradient G of every student pass inside (several backward calls are
    fine); on a normal exit the LoRA gradients follow from it, dL/dB = s G Aᵀ and dL/dA = s Bᵀ G
    (accumulated into ``.grad``), so the optimiser step comes after the block.
    :func:`rapm.lora.teacher_mode` inside switches the base layers back to the teacher's weights. Nested
    calls are no-ops; nothing is left changed on exit (the parameters, their order, the adapter flags).
    Float32 UNets without gradient checkpointing only (:func:`use_merged` decides).
    """
    layers = _peft_layers(unet)
    if not layers or unet.__dict__.get(_MERGED) is not None:
        yield unet
        return
    grad = torch.is_grad_enabled()
    if grad and any(getattr(m, "gradient_checkpointing", False) for m in _checkpointed_blocks(unet)):
        raise RuntimeError("merged_student cannot run with gradient checkpointing (train.lora.merged)")
    parts = _merge_parts(unet)
    # (base layer, teacher weight, merged leaf), the order of ``parts``; under grad each leaf is a new
    # tensor object (its own .grad) over the shared values, which nothing writes to
    values = _merged_values(unet, parts)
    entries = [(p[1], p[2], v.detach().requires_grad_(True) if grad else v) for p, v in zip(parts, values)]
    flags = [m._disable_adapters for m in layers]
    for m in layers:
        m.__dict__["_disable_adapters"] = True
    for base, _, leaf in entries:
        base._parameters["weight"] = None  # hidden, key (and so the parameter order) kept
        base.__dict__["weight"] = leaf
    unet.__dict__[_MERGED] = entries
    try:
        yield unet
    finally:
        del unet.__dict__[_MERGED]
        for base, weight, _ in entries:
            del base.__dict__["weight"]
            base._parameters["weight"] = weight
        for m, off in zip(layers, flags):
            m.__dict__["_disable_adapters"] = off
    if not grad:
        return
    with torch.no_grad():
        for (_, _, _, a, b, scale, _, a2, b2), (_, _, leaf) in zip(parts, entries):
            if leaf.grad is None:
                continue
            g = leaf.grad.view(leaf.shape[0], -1).to(a.dtype)
            for param, value in ((b, (g @ a2.t()).view(b.shape)), (a, (b2.t() @ g).view(a.shape))):
                if not param.requires_grad:
                    continue
                value = value.mul_(scale) if scale != 1.0 else value
                if param.grad is None:
                    param.grad = value
                else:
                    param.grad.add_(value)
