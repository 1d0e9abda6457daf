"""Intervals: the percentile bootstrap over images and its extension over training seeds (numpy only).

Every row's metrics carry bootstrap replicates drawn with the same image indices
(:func:`bootstrap_indices`), so the difference of two rows' replicates is a paired bootstrap of their
difference. A variant trained with several seeds (``replicates``) is summarised by its mean over seeds;
:func:`seed_replicates` resamples the seeds too (a two-level bootstrap: seeds with replacement, then the
images of replicate b), so its interval holds both the seed-to-seed and the image-to-image spread.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) image indices drawn with replacement by a seeded generator (the same for every row)."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray, estimate: float | None = None) -> list[float]:
    """The 95% interval [2.5%, 97.5%] of bootstrap replicates, shifted by the bootstrap's bias when the
    full-sample ``estimate`` is given (bias-corrected percentile interval: the replicates' spread around
    the estimate). FD needs it: a resample repeats images, which inflates FD by far more than its spread
    at a few hundred images; for means (accuracy, RMSE) the shift is ~0. FD intervals are clipped at 0."""
    values = np.asarray(values, dtype=np.float64)
    shift = 0.0 if estimate is None else float(estimate) - float(values.mean())
    return [float(np.percentile(values, 2.5)) + shift, float(np.percentile(values, 97.5)) + shift]


def seed_replicates(per_seed: Sequence[Sequence[float]], seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of the mean over seeds: ``per_seed[s][b]`` is seed s's replicate b (the same image
    indices for every s); replicate b of the mean draws S seeds with replacement (a seeded generator) and
    averages their replicate b. With one seed it is that seed's replicates."""
    values = np.asarray(per_seed, dtype=np.float64)  # (S, B)
    n_seeds, resamples = values.shape
    if n_seeds == 1:
        return values[0]
    draw = np.random.default_rng([seed, n_seeds, resamples]).integers(0, n_seeds, size=(resamples, n_seeds))
    return values[draw, np.arange(resamples)[:, None]].mean(axis=1)
