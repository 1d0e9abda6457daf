"""Training replicates (``<variant>-seed<r>``) merged into one row per variant: each metric's mean over seeds,
its standard deviation over seeds and bootstrap replicates and intervals that resample seeds and images; and
a metric's value in a row by its replicate key (:func:`metric_value`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rapm.config import split_replicate
from rapm.rows import TRAINED_KINDS
from rapm.stats import interval, seed_replicates


def metric_value(m: Mapping, replicate: str):
    """The value of metric ``replicate`` (a key of ``bootstrap_replicates``: fid_<res>, teacher_rmse,
    teacher_fd, accuracy_<attribute>) in one row's metrics."""
    if replicate.startswith("fid_"):
        return (m.get("fid") or {}).get(replicate[4:])
    if replicate.startswith("teacher_"):
        return (m.get("teacher_distance") or {}).get(replicate[8:])
    if replicate.startswith("accuracy_"):
        return (m.get("accuracy") or {}).get(replicate[9:])
    return m.get(replicate)


def _mean_tree(values: Sequence):
    """The element-wise mean of equally shaped metric trees (dicts of numbers); other leaves: the first's."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _mean_tree([v[k] for v in values]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.mean([float(v) for v in values]))
    return first


def combine_replicates(group: Sequence[Mapping], variant: str) -> dict:
    """One row for the training replicates (seeds) of ``variant``: each metric's mean over seeds, its
    standard deviation over seeds (``seed_sd``), bootstrap replicates of the mean that resample seeds and
    images (:func:`rapm.stats.seed_replicates`) and their bias-corrected 95% intervals."""
    if len(group) == 1:
        return {**group[0], "row": variant, "seeds": 1}
    out = {**group[0], "row": variant, "seeds": len(group)}
    for key in ("fid", "teacher_distance", "accuracy", "clip_score"):
        if group[0].get(key) is not None:
            out[key] = _mean_tree([m[key] for m in group])
    reps = {
        k: [m["bootstrap_replicates"][k] for m in group]
        for k in group[0].get("bootstrap_replicates") or {}
        if all(k in (m.get("bootstrap_replicates") or {}) for m in group)
    }
    out["bootstrap_replicates"] = {k: [round(float(x), 6) for x in seed_replicates(v)] for k, v in reps.items()}
    out["intervals"] = {
        **(group[0].get("intervals") or {}),
        **{k: interval(v, metric_value(out, k)) for k, v in out["bootstrap_replicates"].items()},
    }
    out["seed_sd"] = {
        k: float(np.std([float(metric_value(m, k)) for m in group], ddof=1))
        for k in reps
        if all(metric_value(m, k) is not None for m in group)
    }
    return out


def group_replicates(metrics: Sequence[Mapping]) -> list[dict]:
    """The rows with every student variant's replicates (``<variant>-seed<r>``) merged into one row
    (:func:`combine_replicates`), in the order of each variant's first replicate."""
    groups: dict[str, list[Mapping]] = {}
    for m in metrics:
        name = split_replicate(m["row"])[0] if m["kind"] in TRAINED_KINDS else m["row"]
        groups.setdefault(name, []).append(m)
    return [combine_replicates(g, name) if g[0]["kind"] in TRAINED_KINDS else dict(g[0]) for name, g in groups.items()]
