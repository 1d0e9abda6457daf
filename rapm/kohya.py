"""The kohya-ss form of an exported LoRA (sd-scripts, AUTOMATIC1111, ComfyUI): ``rapm export-kohya``.

:func:`rapm.lora.export_lora` writes diffusers/peft names; this module renames them and adds kohya's
per-module ``alpha`` and ``ss_network_*`` metadata. Safetensors in and out: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor


def kohya_state_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of an :func:`export_lora` file under kohya-ss names (sd-scripts, AUTOMATIC1111, ComfyUI).

    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` become ``lora_unet_<module with dots as
    underscores>.lora_down.weight`` / ``.lora_up.weight``, plus ``.alpha`` per module. lora_B already
    carries the scale alpha/r (:func:`export_lora`), so ``alpha`` is the rank: kohya's scale alpha/rank
    is then 1 and the file applies the same update. Conv modules keep peft's shapes, which are kohya's
    (down ``(r, in, k, k)``, up ``(out, r, 1, 1)``).
    """
    import re

    out: dict[str, Tensor] = {}
    for key in sorted(tensors):
        m = re.fullmatch(r"unet\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ValueError(f"{key}: not a LoRA weight of a rapm export (unet.<module>.lora_A/lora_B.weight)")
        name = "lora_unet_" + m.group(1).replace(".", "_")
        value = tensors[key]
        out[f"{name}.lora_{'down' if m.group(2) == 'A' else 'up'}.weight"] = value
        if m.group(2) == "A":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]), dtype=value.dtype)
    return out


def export_kohya(lora: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the kohya-ss form (:func:`kohya_state_dict`) of the exported LoRA file ``lora`` to ``out``
    (deterministic bytes, atomic; rapm's metadata kept, kohya's ``ss_network_*`` keys added). Returns
    the number of LoRA modules."""
    from safetensors import safe_open

    from rapm.io import save_safetensors

    with safe_open(str(lora), framework="pt") as f:  # safetensors only: nothing is unpickled
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    kohya = kohya_state_dict(tensors)
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{lora}: LoRA modules of ranks {sorted(ranks)}; kohya's metadata holds one rank")
    rank = ranks.pop()
    metadata.update(
        {
            "format": "pt",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
        }
    )
    save_safetensors(kohya, Path(out), metadata)
    return sum(1 for k in kohya if k.endswith(".alpha"))


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm export-kohya`` (registered in :mod:`rapm.cli`)."""
    p.add_argument("lora", help="lora.safetensors written by `rapm train`")
    p.add_argument("out", help="the kohya-ss file to write, e.g. results/train/rapm/lora_kohya.safetensors")


def command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rapm.errors import RapmError

    if not Path(args.lora).is_file():
        raise RapmError(f"{args.lora}: LoRA file not found")
    try:
        n = export_kohya(args.lora, args.out)
    except Exception as err:  # not a safetensors file, or not a rapm LoRA (names the key)
        raise RapmError(f"{args.lora}: not a LoRA written by `rapm train`: {err}") from err
    print(f"{args.out}: {n} LoRA modules in kohya-ss form")
    return 0
