"""Model builders that need no download.

``build_tiny_pipeline(name, seed)`` dispatches on a string to the tiny random-weight pipelines of
:mod:`rapm.models.tiny` (``"sd15"`` or ``"sdxl"``); tests and the toy profile use them in place of
real checkpoints, through the same teacher code path (:mod:`rapm.teacher`).
"""

from __future__ import annotations

from rapm.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

TINY_BUILDERS = {"sd15": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}


def build_tiny_pipeline(name: str, seed: int = 0, **kwargs):
    """A tiny random-weight diffusers pipeline of family ``name`` (``"sd15"`` or ``"sdxl"``)."""
    try:
        builder = TINY_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose one of {sorted(TINY_BUILDERS)}") from None
    return builder(seed, **kwargs)


__all__ = ["TINY_BUILDERS", "build_tiny_pipeline", "tiny_sd_pipeline", "tiny_sdxl_pipeline"]
