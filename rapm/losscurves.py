"""Loss curves of the trained variants: one panel per loss term, one line per training run.

``rapm loss-curves`` (rule ``loss_curves``, in the Snakemake report under "Training") reads each run's
``losses.jsonl`` (one record per iteration, :data:`rapm.train.LOSS_TERMS`) and draws the running mean
over ``window`` iterations against the iteration, so a reader sees at a glance whether the
discriminators separate real from fake (hinge below 2) and whether the student's terms move.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rapm.errors import RapmError

#: what each term of a losses.jsonl record is (method.md §2-§4)
TERMS = {
    "d_rel": "D hinge, relative",
    "d_abs": "D hinge, absolute",
    "g_rel": "G adversarial, relative",
    "g_abs": "G adversarial, absolute",
    "reg": "G regression",
}


def run_name(path: str | Path) -> str:
    """``results/train/<variant>/losses.jsonl`` -> ``<variant>``; an MSD student's -> ``<variant>/s<k>``."""
    parts = Path(path).parts
    if len(parts) >= 4 and parts[-3] == "students":
        return f"{parts[-4]}/s{parts[-2]}"
    return parts[-2]


def read_losses(path: str | Path) -> dict[str, np.ndarray]:
    """term -> (iteration, value) pairs of one losses.jsonl (terms missing from a record are skipped)."""
    series: dict[str, list[tuple[int, float]]] = {t: [] for t in TERMS}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RapmError(f"{path}, line {i + 1}: not a JSON record ({err})") from err
        step = int(record.get("step", i))
        for t in TERMS:
            if t in record:
                series[t].append((step, float(record[t])))
    return {t: np.asarray(v, dtype=float).reshape(-1, 2) for t, v in series.items() if v}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(losses: Sequence[str | Path], out: str | Path, window: int = 25) -> dict[str, Mapping]:
    """Draw every run of ``losses`` into one PNG ``out``; returns run -> term -> last running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapm.io import atomic_path

    runs = {run_name(p): read_losses(p) for p in losses}
    terms = [t for t in TERMS if any(t in r for r in runs.values())]
    fig, axes = plt.subplots(1, max(len(terms), 1), figsize=(3.2 * max(len(terms), 1), 2.8), squeeze=False)
    last: dict[str, dict[str, float]] = {name: {} for name in runs}
    for ax, term in zip(axes[0], terms):
        for name, series in runs.items():
            if term in series:
                smooth = running_mean(series[term][:, 1], window)
                ax.plot(series[term][:, 0], smooth, label=name, linewidth=1)
                last[name][term] = float(smooth[-1])
        ax.set_title(TERMS[term], fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"loss terms, running mean over {window} iterations", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return last


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm loss-curves`` (registered in :mod:`rapm.cli`)."""
    p.add_argument("--losses", nargs="+", required=True, help="losses.jsonl files written by `rapm train`")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--window", type=int, default=25, help="iterations in each running mean")


def command(args: argparse.Namespace) -> int:

    last = plot_loss_curves(args.losses, args.out, window=args.window)
    for name, terms in last.items():
        print(f"{name}: " + ", ".join(f"{t} {v:.3f}" for t, v in terms.items()))
    return 0
