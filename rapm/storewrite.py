"""Writing a trajectory store (its format: :mod:`rapm.store`): the pre-allocated arrays, and a batch's rows.

Rows are written before their done flags, so a trajectory whose flag is set is on disk whatever moment
the writer was killed at (:mod:`rapm.trajectories` computes the rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rapm.shards import index_runs, item_seed
from rapm.store import array_specs


def allocate(zarr, path: Path, attrs: Mapping, frame) -> None:
    """Create the store at ``path`` with every array at full shape (unwritten rows read as NaN / -1 / not done),
    write the seeds and the prompt ids and prompts of ``frame`` (train.csv's rows), then the attributes."""
    from zarr.codecs import Crc32cCodec

    group = zarr.open_group(path, mode="w")
    chunk = attrs["trajectories_per_chunk"]
    arrays = {}
    for name, (shape, dtype) in array_specs(attrs).items():
        fill = {"float32": np.nan, "int64": -1, "uint8": 0}.get(dtype)
        arrays[name] = group.create_array(
            name,
            shape=shape,
            chunks=(chunk, *shape[1:]),
            dtype=dtype,
            fill_value=fill,
            compressors=[Crc32cCodec()],
            config={"write_empty_chunks": True},
        )
    J = attrs["num_trajectories"]
    arrays["seed"][:] = np.array([item_seed(attrs["seed"], j) for j in range(J)], dtype=np.int64)
    arrays["prompt_id"][:] = frame["prompt_id"].to_numpy(dtype=np.int64)
    arrays["prompt"][:] = np.array(frame["caption"].astype(str).tolist(), dtype=object)
    group.attrs.update(attrs)


def write_rows(group, arrays: Mapping, out: Mapping, idx: Sequence[int], b0: int) -> None:
    """Write trajectories ``idx`` of the batch that starts at trajectory ``b0`` (``out``: its arrays by store name,
    :func:`rapm.trajectories.run_batch`) into ``arrays``, then their done flags."""
    for a, b, _ in index_runs(idx):
        for name, arr in arrays.items():
            arr[a:b] = out[name][a - b0 : b - b0]
    for a, b, _ in index_runs(idx):  # flags last: a batch counts only once all its rows are on disk
        group["done"][a:b] = 1
