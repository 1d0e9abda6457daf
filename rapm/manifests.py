"""A row's sampled images as the sampling stage leaves them: how many a row has, and reading its shard
manifests (image index, prompt, seed, PNG file) back into one array, for evaluation and grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rapm.errors import SamplingError


def num_images(sampling_cfg: Mapping[str, Any], num_prompts: int) -> int:
    """Images per row: ``sampling.num_images`` (at most the number of evaluation prompts), or all of them."""
    n = sampling_cfg.get("num_images")
    return num_prompts if n is None else min(int(n), num_prompts)


def read_row_images(manifests: list[str | Path]) -> tuple[np.ndarray, pd.DataFrame]:
    """All images of a row (uint8 (n, H, W, 3), in index order) and their manifest rows."""
    from PIL import Image

    tables = []
    for m in manifests:
        t = pd.read_csv(m, keep_default_na=False)
        t["path"] = [str(Path(m).parent / f) for f in t["file"]]
        tables.append(t)
    table = pd.concat(tables).sort_values("index").reset_index(drop=True)
    if list(table["index"]) != list(range(len(table))):
        raise SamplingError(f"shard manifests {manifests} do not cover images 0..{len(table) - 1} exactly once")
    images = []
    for p in table["path"]:
        if not Path(p).is_file():
            raise SamplingError(f"{p}: image listed in its shard manifest is missing; rerun the sample_images job")
        images.append(np.asarray(Image.open(p).convert("RGB")))
    return np.stack(images), table
