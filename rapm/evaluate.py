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
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rapm.metrics import (MetricsError, center_crop_resize, feature_extractor, frechet_distance, gaussian_stats,
                          protocol_summary, resize_all)
from rapm.sample import num_images

log = logging.getLogger(__name__)

METRICS_FORMAT = "rapm-metrics/1"


def reference_images(cfg: Mapping[str, Any], prompts: pd.DataFrame) -> np.ndarray:
    """uint8 (n, H, W, 3) reference images of the evaluation prompts (native size; resized later)."""
    if cfg["data"]["source"] == "toy":
        from rapm.toy.captions import reference_image

        size = int(cfg["data"]["toy"]["image_size"])
        return np.stack([reference_image(c, int(i), size) for c, i in zip(prompts["caption"], prompts["image_id"])])
    from PIL import Image

    root = cfg["evaluation"]["reference"]["images_dir"]
    if not root:
        raise MetricsError("evaluation.reference.images_dir is not set: FID of the SD profiles needs the COCO val2014 "
                           "images (val2014/COCO_val2014_*.jpg from images.cocodataset.org/zips/val2014.zip)")
    largest = max(int(r) for r in cfg["evaluation"]["fid"]["resolutions"])
    out = []
    for name in prompts["file_name"]:
        path = Path(root) / name
        if not path.is_file():
            raise MetricsError(f"{path}: reference image of an evaluation prompt not found in evaluation.reference.images_dir")
        out.append(center_crop_resize(np.asarray(Image.open(path).convert("RGB")), largest))
    return np.stack(out)


def toy_accuracy(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """The attribute reader's accuracies of toy images against the scenes of their captions (without ``n``)."""
    from rapm.toy.reader import accuracy
    from rapm.toy.scene import parse_caption

    return {k: float(v) for k, v in accuracy(images, [parse_caption(c) for c in captions]).items() if k != "n"}


def compute_reference_stats(cfg: Mapping[str, Any], prompts_csv: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the reference statistics (``mu_<res>``, ``sigma_<res>`` per resolution) to ``out`` (.npz)."""
    t0 = time.time()
    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    prompts = prompts.iloc[:num_images(cfg["sampling"], len(prompts))]
    fid = cfg["evaluation"]["fid"]
    extract = feature_extractor(fid["features"], inception_weights=fid["inception_weights"])
    images = reference_images(cfg, prompts)
    arrays = {}
    for res in fid["resolutions"]:
        mu, sigma = gaussian_stats(extract(resize_all(images, int(res))))
        arrays[f"mu_{res}"], arrays[f"sigma_{res}"] = mu, sigma
    from rapm.coco import atomic_path

    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, protocol=np.array(json.dumps(protocol_summary(cfg["evaluation"]), sort_keys=True)))
    info = {"images": len(images), "resolutions": list(fid["resolutions"]), "wall_time_s": round(time.time() - t0, 1)}
    log.info("reference statistics of %d images written to %s", len(images), out)
    return info


def evaluate_row(cfg: Mapping[str, Any], row: Mapping[str, Any], manifests: list[str | Path],
                 reference: str | Path, prompts_csv: str | Path, out: str | Path) -> dict[str, Any]:
    """Metrics of one row's images; writes ``out`` (JSON, validated against the metrics schema)."""
    from rapm.metrics import clip_score, load_clip
    from rapm.sample import read_row_images
    from rapm.trajectories import write_json

    t0 = time.time()
    ecfg = cfg["evaluation"]
    prompts = pd.read_csv(prompts_csv, keep_default_na=False)
    required = ecfg["fid"]["min_images"] or num_images(cfg["sampling"], len(prompts))
    images, table = read_row_images(manifests)
    if len(images) < required:
        raise MetricsError(f"row {row['name']!r}: {len(images)} images, the protocol asks for {required}; FID on fewer "
                           "images is biased and not comparable (sample more, or lower evaluation.fid.min_images)")
    extract = feature_extractor(ecfg["fid"]["features"], inception_weights=ecfg["fid"]["inception_weights"])
    with np.load(reference, allow_pickle=False) as ref:
        if str(ref["protocol"]) != json.dumps(protocol_summary(ecfg), sort_keys=True):
            raise MetricsError(f"{reference}: reference statistics of another protocol; delete it to recompute")
        fids = {}
        for res in ecfg["fid"]["resolutions"]:
            mu, sigma = gaussian_stats(extract(resize_all(images, int(res))))
            fids[str(res)] = frechet_distance(mu, sigma, ref[f"mu_{res}"], ref[f"sigma_{res}"])
    clip = load_clip(ecfg["clip"]["model"], ecfg["clip"]["pretrained"])
    captions = list(table["caption"])
    result: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "row": row["name"], "kind": row["kind"], "steps": int(row["steps"]), "guidance": float(row["guidance"]),
        "lora": row.get("lora"), "images": len(images),
        "fid": fids,
        "clip_score": clip_score(images, captions, clip, prefix=ecfg["clip"]["prefix"]),
        "accuracy": None,
        "protocol": {**protocol_summary(ecfg), "prompts": str(prompts_csv), "images": len(images),
                     "sampling_seed": int(cfg["sampling"]["seed"]), "image_seed": "sampling.seed + i",
                     "profile": cfg.get("profile")},
        "wall_time_s": None,
    }
    if cfg["data"]["source"] == "toy" and ecfg["reader_accuracy"]:
        result["accuracy"] = toy_accuracy(images, captions)
    if "group" in table.columns:  # MSD: per-partition CLIP score and accuracy (FID needs the whole set)
        result["partitions"] = {}
        for k, idx in table.groupby("group").indices.items():
            part = {"images": len(idx), "clip_score": clip_score(images[idx], [captions[i] for i in idx], clip,
                                                                 prefix=ecfg["clip"]["prefix"])}
            if result["accuracy"] is not None:
                part["accuracy"] = toy_accuracy(images[idx], [captions[i] for i in idx])
            result["partitions"][str(k)] = part
    result["wall_time_s"] = round(time.time() - t0, 1)
    validate_metrics(result)
    write_json(out, result)
    log.info("row %s: FID %s, CLIP %.2f%s", row["name"], fids, result["clip_score"],
             f", accuracy {result['accuracy'].get('all', float('nan')):.3f}" if result["accuracy"] else "")
    return result


def validate_metrics(result: Mapping[str, Any]) -> None:
    """Check a metrics record against ``rapm/schemas/metrics.schema.json``."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "schemas" / "metrics.schema.json").read_text())
    try:
        jsonschema.validate(json.loads(json.dumps(result)), schema)
    except jsonschema.ValidationError as err:
        raise MetricsError(f"metrics record does not match its schema: {err.message} at {list(err.absolute_path)}") from err
