"""Evaluation stage (``python -m rapm evaluate`` / ``reference-stats``): one metrics JSON per row.

Reference statistics come first and are cached (rule ``reference_stats``): the FID features of the
reference images of the evaluation prompts at every protocol resolution. SD profiles: the COCO
val2014 images named by ``file_name`` in eval.csv, read from ``evaluation.reference.images_dir``,
centre-cropped and resized; the toy profile: renders of the evaluation prompts
(:func:`rapm.toy.captions.reference_image`, exactly the images the captions were written for).

A row's metrics: FID at each resolution (generated images centre-cropped and resized the same way),
CLIP score, and on the toy profile the attribute reader's prompt-following accuracy. FID is refused
on fewer images than the protocol asks for (``evaluation.fid.min_images``, default: every
evaluation prompt).

What a distillation optimises is measured against the teacher row's own images (method.md §8), given
with ``teacher_manifests``: image i of every row comes from the same initial noise (sampling.seed + i),
so ``teacher_distance.rmse`` is the mean over images of the pixel RMSE (0-255) between a row's image
and the teacher's image of the same index, and ``teacher_distance.fd`` the Fréchet distance of the
row's features to the teacher's samples' features (first protocol resolution). Intervals
(``intervals``) are 95% bias-corrected percentile-bootstrap intervals over images (``evaluation.bootstrap``
resamples, seeded by the number of images only, so every row of a run draws the same image indices
and the difference of two rows' replicates (``bootstrap_replicates``) is a paired bootstrap of
their difference, which the tables use to mark a difference as significant).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rapm.cliargs import add_config_args, add_threads_arg, set_threads, stage_config
from rapm.manifests import num_images
from rapm.metrics import (
    MetricsError,
    frechet_distance,
    gaussian_stats,
    protocol_summary,
    reference_protocol,
    resize_all,
)
from rapm.protocol import READER_ATTRIBUTES, Protocol, score_means
from rapm.rows import Row
from rapm.stats import bootstrap_indices, interval

log = logging.getLogger(__name__)

METRICS_FORMAT = "rapm-metrics/1"


def pixel_rmse(images: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per-image RMSE (0-255 levels) between images and the teacher's images of the same index (same noise)."""
    if images.shape != teacher.shape:
        raise MetricsError(f"same-noise distance: images {images.shape} and teacher images {teacher.shape} differ")
    diff = images.astype(np.float64) - teacher.astype(np.float64)
    return np.sqrt((diff**2).reshape(len(images), -1).mean(axis=1))


def fd_replicates(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of the Fréchet distance of ``feats`` (resampled by ``idx``) to fixed reference stats."""
    return np.array([frechet_distance(*gaussian_stats(feats[i]), mu_ref, sigma_ref) for i in idx])


def save_feature_stats(path: str | Path, ecfg: Mapping[str, Any], stats: Mapping[Any, tuple]) -> None:
    """``{resolution: (mu, sigma)}`` as ``mu_<res>``, ``sigma_<res>`` (float64) and the protocol they were
    computed under (.npz, atomic): the reference statistics and each row's ``fd_stats.npz``."""
    from rapm.io import atomic_path

    arrays = {}
    for res, (mu, sigma) in stats.items():
        arrays[f"mu_{res}"], arrays[f"sigma_{res}"] = mu, sigma
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, protocol=np.array(json.dumps(reference_protocol(ecfg), sort_keys=True)))


def load_feature_stats(path: str | Path, ecfg: Mapping[str, Any], what: str, fix: str) -> dict[str, tuple]:
    """``{resolution: (mu, sigma)}`` of :func:`save_feature_stats`, refused (naming ``what`` and ``fix``)
    when computed under another protocol."""
    with np.load(path, allow_pickle=False) as f:
        if str(f["protocol"]) != json.dumps(reference_protocol(ecfg), sort_keys=True):
            raise MetricsError(f"{path}: {what} of another protocol; {fix}")
        return {k[3:]: (f[k], f[f"sigma_{k[3:]}"]) for k in f.files if k.startswith("mu_")}


def compute_reference_stats(cfg: Mapping[str, Any], prompts_csv: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the reference statistics (``mu_<res>``, ``sigma_<res>`` per resolution) to ``out`` (.npz)."""
    t0 = time.time()
    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    prompts = prompts.iloc[: num_images(cfg["sampling"], len(prompts))]
    fid = cfg["evaluation"]["fid"]
    protocol = Protocol.from_config(cfg)
    extract = protocol.extractor()
    images = protocol.reference_images(prompts)
    stats = {res: gaussian_stats(extract(resize_all(images, int(res)))) for res in fid["resolutions"]}
    save_feature_stats(out, cfg["evaluation"], stats)
    info = {"images": len(images), "resolutions": list(fid["resolutions"]), "wall_time_s": round(time.time() - t0, 1)}
    log.info("reference statistics of %d images written to %s", len(images), out)
    return info


def evaluate_row(
    cfg: Mapping[str, Any],
    row: Mapping[str, Any],
    manifests: list[str | Path],
    reference: str | Path,
    prompts_csv: str | Path,
    out: str | Path,
    teacher_manifests: list[str | Path] | None = None,
    *,
    teacher_stats: str | Path | None = None,
    stats_out: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of one row's images; writes ``out`` (JSON, validated against the metrics schema).

    ``teacher_manifests``: the teacher row's images, for the same-noise distance and the Fréchet
    distance to the teacher's samples (None for the teacher row itself). ``stats_out``: where to write
    the Gaussian statistics of the row's features at the first resolution (:func:`save_feature_stats`);
    ``teacher_stats``: the teacher row's, read instead of encoding the teacher's images again."""
    from rapm.io import write_json
    from rapm.metrics import clip_score, load_clip

    t0 = time.time()
    row = Row.from_dict(row)
    ecfg = cfg["evaluation"]
    images, table = _row_images(cfg, row, manifests, prompts_csv)
    protocol = Protocol.from_config(cfg)
    clip = load_clip(ecfg["clip"]["model"], ecfg["clip"]["pretrained"])
    extract = protocol.extractor(clip)
    resamples = int(ecfg.get("bootstrap", 0) or 0)
    idx = bootstrap_indices(len(images), resamples) if resamples else None
    replicates: dict[str, np.ndarray] = {}  # same image indices for every row: differences are paired
    fids, first = _fids(ecfg, reference, images, extract, idx, replicates)  # first: (features, (mu, sigma))
    if stats_out is not None:
        save_feature_stats(stats_out, ecfg, {ecfg["fid"]["resolutions"][0]: first[1]})
    captions = list(table["caption"])
    score = clip_score(images, captions, clip, prefix=ecfg["clip"]["prefix"], image_embeddings=first[0])
    result = _record(cfg, row, prompts_csv, len(images), fids, score)
    result["accuracy"] = _reader_accuracy(protocol, images, captions, idx, replicates)
    if teacher_manifests:
        t_stats = read_fd_stats(teacher_stats, ecfg) if teacher_stats else None
        result["teacher_distance"] = _teacher_distance(
            row, ecfg, teacher_manifests, images, captions, extract, first, idx, replicates, t_stats
        )
    if idx is not None:
        result["intervals"], result["bootstrap_replicates"] = _intervals(result, fids, replicates, resamples)
    if "group" in table.columns:  # MSD: per-partition CLIP score and accuracy (FID needs the whole set)
        result["partitions"] = _partitions(table, images, captions, clip, ecfg, protocol, result["accuracy"])
    result["wall_time_s"] = round(time.time() - t0, 1)
    validate_metrics(result)
    write_json(out, result)
    log.info(
        "row %s: FID %s, CLIP %.2f%s",
        row.name,
        fids,
        result["clip_score"],
        f", accuracy {result['accuracy'].get('all', float('nan')):.3f}" if result["accuracy"] else "",
    )
    return result


def _record(
    cfg: Mapping[str, Any], row: Row, prompts_csv: str | Path, num: int, fids: Mapping, clip: float
) -> dict[str, Any]:
    """The metrics record of a row of ``num`` images with its FIDs and CLIP score; the other metrics are added
    to it by :func:`evaluate_row`."""
    return {
        "format": METRICS_FORMAT,
        "row": row.name,
        "kind": row.kind,
        "steps": int(row.steps),
        "guidance": float(row.guidance),
        "lora": row.lora,
        "images": num,
        "init": row.init,
        "fid": fids,
        "clip_score": clip,
        "accuracy": None,
        "protocol": {
            **protocol_summary(cfg["evaluation"]),
            "prompts": str(prompts_csv),
            "images": num,
            "sampling_seed": int(cfg["sampling"]["seed"]),
            "image_seed": "sampling.seed + i",
            "profile": cfg.get("profile"),
        },
        "wall_time_s": None,
    }


def _row_images(cfg: Mapping[str, Any], row: Row, manifests: list[str | Path], prompts_csv: str | Path):
    """(images, table) of a row's shard manifests, refused when fewer than the protocol asks for."""
    from rapm.manifests import read_row_images

    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    required = cfg["evaluation"]["fid"]["min_images"] or num_images(cfg["sampling"], len(prompts))
    images, table = read_row_images(manifests)
    if len(images) < required:
        raise MetricsError(
            f"row {row.name!r}: {len(images)} images, the protocol asks for {required}; FID on fewer "
            "images is biased and not comparable (sample more, or lower evaluation.fid.min_images)"
        )
    return images, table


def _fids(ecfg: Mapping[str, Any], reference: str | Path, images: np.ndarray, extract, idx, replicates: dict):
    """FID at every protocol resolution against the reference statistics, and ``(features, (mu, sigma))`` at
    the first one; adds the bootstrap replicates ``fid_<res>`` to ``replicates`` (when ``idx`` is given)."""
    ref = load_feature_stats(reference, ecfg, "reference statistics", "delete it to recompute")
    fids, first = {}, None
    for res in ecfg["fid"]["resolutions"]:
        feats = extract(resize_all(images, int(res)))
        stats = gaussian_stats(feats)
        first = (feats, stats) if first is None else first
        fids[str(res)] = frechet_distance(*stats, *ref[str(res)])
        if idx is not None:
            replicates[f"fid_{res}"] = fd_replicates(feats, *ref[str(res)], idx)
    return fids, first


def _reader_accuracy(protocol: Protocol, images: np.ndarray, captions: list[str], idx, replicates: dict):
    """The attribute reader's mean accuracies (None where the protocol has no reader); adds the bootstrap
    replicates ``accuracy_<attribute>`` to ``replicates`` (when ``idx`` is given)."""
    scores = protocol.reader_scores(images, captions)
    if scores is None:
        return None
    if idx is not None:
        for k in ("all", *READER_ATTRIBUTES):
            if k in scores:
                replicates[f"accuracy_{k}"] = scores[k][idx].mean(axis=1)
    return score_means(scores)


def read_fd_stats(path: str | Path, ecfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a row's ``fd_stats.npz`` (the first protocol resolution), refused when of another protocol."""
    stats = load_feature_stats(path, ecfg, "feature statistics", "evaluate the teacher row again")
    return stats[str(ecfg["fid"]["resolutions"][0])]


def _teacher_distance(
    row: Row,
    ecfg: Mapping[str, Any],
    teacher_manifests,
    images,
    captions,
    extract,
    first: tuple[np.ndarray, tuple],
    idx,
    replicates: dict,
    t_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Same-noise pixel RMSE to the teacher row's images and the Fréchet distance to their features (first
    protocol resolution; ``first``: the row's features there and their (mu, sigma); ``t_stats``: the
    teacher's statistics, else computed here); adds the bootstrap replicates ``teacher_rmse``,
    ``teacher_fd`` to ``replicates``."""
    from rapm.manifests import read_row_images

    t_images, t_table = read_row_images(teacher_manifests)
    if list(t_table["caption"]) != captions:
        raise MetricsError(
            f"row {row.name!r}: the teacher row's images are of other prompts (or another order); "
            "resample the teacher row"
        )
    rmse = pixel_rmse(images, t_images)
    res0 = int(ecfg["fid"]["resolutions"][0])
    t_mu, t_sigma = t_stats if t_stats is not None else gaussian_stats(extract(resize_all(t_images, res0)))
    distance = {
        "rmse": float(rmse.mean()),
        "fd": frechet_distance(*first[1], t_mu, t_sigma),
        "resolution": res0,
    }
    if idx is not None:
        replicates["teacher_rmse"] = rmse[idx].mean(axis=1)
        replicates["teacher_fd"] = fd_replicates(first[0], t_mu, t_sigma, idx)
    return distance


def _intervals(result: Mapping[str, Any], fids: Mapping, replicates: Mapping, resamples: int) -> tuple[dict, dict]:
    """The 95% intervals of every bootstrapped metric (distances clipped at 0) and the replicates, rounded."""
    estimates = {
        **{f"fid_{r}": v for r, v in fids.items()},
        **{f"accuracy_{k}": v for k, v in (result["accuracy"] or {}).items()},
        **(
            {"teacher_rmse": result["teacher_distance"]["rmse"], "teacher_fd": result["teacher_distance"]["fd"]}
            if "teacher_distance" in result
            else {}
        ),
    }
    cis = {k: interval(v, estimates.get(k)) for k, v in replicates.items()}
    cis = {k: ([max(0.0, lo), max(0.0, hi)] if "fd" in k or "fid" in k else [lo, hi]) for k, (lo, hi) in cis.items()}
    intervals = {"level": 0.95, "resamples": resamples, **cis}
    return intervals, {k: [round(float(x), 6) for x in v] for k, v in replicates.items()}


def _partitions(table: pd.DataFrame, images, captions, clip, ecfg: Mapping[str, Any], protocol: Protocol, accuracy):
    """MSD: CLIP score (and reader accuracy, when the row has one) of each partition's images."""
    from rapm.metrics import clip_score

    partitions = {}
    for k, idx in table.groupby("group").indices.items():
        part = {
            "images": len(idx),
            "clip_score": clip_score(images[idx], [captions[i] for i in idx], clip, prefix=ecfg["clip"]["prefix"]),
        }
        if accuracy is not None:
            part["accuracy"] = protocol.reader_accuracy_of(images[idx], [captions[i] for i in idx])
        partitions[str(k)] = part
    return partitions


def validate_metrics(result: Mapping[str, Any]) -> None:
    """Check a metrics record against ``rapm/schemas/metrics.schema.json``."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "schemas" / "metrics.schema.json").read_text())
    try:
        jsonschema.validate(json.loads(json.dumps(result)), schema)
    except jsonschema.ValidationError as err:
        raise MetricsError(
            f"metrics record does not match its schema: {err.message} at {list(err.absolute_path)}"
        ) from err


# --- command line (registered in rapm.cli) --------------------------------------------------


def reference_stats_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm reference-stats`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out", required=True, help="the .npz to write")
    add_threads_arg(p)


def reference_stats_command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data", "sampling.num_images", "evaluation.fid", "evaluation.reference")
    set_threads(args.threads)

    compute_reference_stats(cfg, args.prompts, args.out)
    return 0


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm evaluate`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--row", required=True, help="the row's config file (results/config/rows/<row>.yaml)")
    p.add_argument("--manifests", nargs="+", required=True, help="the row's shard manifests")
    p.add_argument(
        "--teacher-manifests",
        nargs="*",
        default=[],
        help="the teacher row's shard manifests (same noise): distance to the teacher's images",
    )
    p.add_argument(
        "--teacher-stats",
        nargs="?",
        default=None,
        const=None,
        help="the teacher row's feature statistics (.npz, its --stats-out); none: encode its images",
    )
    p.add_argument("--reference", required=True, help="reference statistics (.npz) of the protocol")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--stats-out", default=None, help="write the row's feature statistics (.npz) here")
    add_threads_arg(p)


def command(args: argparse.Namespace) -> int:
    from rapm.rows import Row

    cfg = stage_config(args, "data", "sampling", "evaluation")
    set_threads(args.threads)

    row = Row.from_file(args.row)
    evaluate_row(
        cfg,
        row,
        args.manifests,
        args.reference,
        args.prompts,
        args.out,
        teacher_manifests=args.teacher_manifests or None,
        teacher_stats=args.teacher_stats,
        stats_out=args.stats_out,
    )
    return 0
