"""Metrics against training iteration (``python -m rapm curve``): FID (and toy accuracy) of LoRA snapshots.

Training writes a LoRA snapshot every ``train.snapshot_every`` iterations into its state directory and
lists them in ``snapshots.json`` next to its outputs. For each snapshot (and the untrained student,
iteration 0, which is the undistilled teacher at N steps and guidance 1) this samples the first
``--num-images`` evaluation prompts with the row's sampler (image i from the noise of sampling.seed + i,
as in the evaluation) and computes the Fréchet distance in the protocol's features against the
reference images of the same prompts, and on the toy profile the attribute reader's accuracy. It is
a curve for looking at training, on fewer images than the protocol's FID: its values are labelled
with their image count and are not the table's numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rapm.cliargs import add_config_args, add_threads_arg, set_threads, stage_config
from rapm.io import write_json
from rapm.protocol import Protocol, fd_label
from rapm.rows import Row
from rapm.shards import item_seed

log = logging.getLogger(__name__)


def _sample(teacher, row: Row, captions: list[str], seed: int, bs: int) -> np.ndarray:
    """Images of ``captions`` from the teacher as it is, ``bs`` at a time; image k from ``item_seed(seed, k)``."""
    from rapm.pipeline import generate

    return np.concatenate(
        [
            generate(
                teacher,
                captions[i : i + bs],
                [item_seed(seed, k) for k in range(i, min(i + bs, len(captions)))],
                steps=row.steps,
                guidance=row.guidance,
                resolution=row.resolution,
            )
            for i in range(0, len(captions), bs)
        ]
    )


def snapshot_curve(
    cfg: Mapping[str, Any],
    row: Mapping[str, Any],
    snapshots: list[dict],
    prompts_csv: str | Path,
    num_images: int,
    out_json: str | Path,
    out_png: str | Path,
) -> dict[str, Any]:
    from rapm.metrics import frechet_distance, gaussian_stats, resize_all
    from rapm.pipeline import base_weights, fuse_row_lora, restore_base
    from rapm.teacher import load_teacher

    row = Row.from_dict(row)
    prompts = pd.read_csv(prompts_csv, keep_default_na=False).iloc[:num_images]
    captions = list(prompts["caption"])
    fid_cfg = cfg["evaluation"]["fid"]
    res = int(min(fid_cfg["resolutions"]))
    protocol = Protocol.from_config(cfg)
    extract = protocol.extractor()
    ref = gaussian_stats(extract(resize_all(protocol.reference_images(prompts), res)))
    seed, bs = int(cfg["sampling"]["seed"]), int(cfg["sampling"]["batch_size"])
    points = []
    teacher = load_teacher(cfg["teacher"])  # once: each snapshot's LoRA is fused, then the base weights restored
    base = base_weights(teacher)
    for n, snap in enumerate([{"iteration": 0, "lora": None}, *snapshots]):
        if n > 1:
            restore_base(teacher, base)
        if snap["lora"]:
            fuse_row_lora(teacher, row.with_lora(snap["lora"]))
        images = _sample(teacher, row, captions, seed, bs)
        point = {
            "iteration": snap["iteration"],
            "fid": frechet_distance(*gaussian_stats(extract(resize_all(images, res))), *ref),
        }
        acc = protocol.reader_accuracy_of(images, captions)
        if acc is not None:
            point.update(accuracy=acc["all"], colour=acc["colour"])
        log.info("iteration %d: %s", snap["iteration"], point)
        points.append(point)
    result = {
        "row": row.name,
        "images": len(captions),
        "resolution": res,
        "features": fid_cfg["features"],
        "points": points,
    }
    write_json(out_json, result)
    plot_curve(result, out_png)
    return result


def plot_curve(result: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [p["iteration"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(its, [p["fid"] for p in result["points"]], "o-", color="C0")
    ax.set_xlabel("training iteration (iteration 0: the undistilled teacher, guidance 1)")
    ax.set_ylabel(f"{fd_label(result['features'])}, {result['images']} images", color="C0")
    if "accuracy" in result["points"][0]:
        ax2 = ax.twinx()
        ax2.plot(its, [p["colour"] for p in result["points"]], "s--", color="C1")
        ax2.set_ylabel("colour accuracy (reader)", color="C1")
    ax.set_title(f"{result['row']}: metrics against training iteration", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def read_snapshots(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())["snapshots"]


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm curve`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--row", required=True, help="the variant's row file (results/config/rows/<variant>.yaml)")
    p.add_argument("--snapshots", required=True, help="snapshots.json written by `rapm train`")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-png", required=True)
    add_threads_arg(p)


def command(args: argparse.Namespace) -> int:
    from rapm.rows import Row

    cfg = stage_config(args, "data", "teacher", "sampling", "evaluation.fid", "evaluation.reference", "curves")
    set_threads(args.threads)

    snapshot_curve(
        cfg,
        Row.from_file(args.row),
        read_snapshots(args.snapshots),
        args.prompts,
        int(cfg["curves"]["images"]),
        args.out_json,
        args.out_png,
    )
    return 0
