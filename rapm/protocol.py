"""The evaluation protocol of a profile, as one object built from the config.

Stages ask a :class:`Protocol` instead of branching on ``data.source``: which features the Fréchet
distance uses and what the tables call it (``FID`` on Inception features, ``FD (toy CLIP
features)`` otherwise), which reference images it is measured against (COCO val2014 images from
``evaluation.reference.images_dir``, or on the toy profile renders of the evaluation prompts, exactly
the images their captions were written for), and whether the attribute reader's prompt-following
accuracy applies (``evaluation.reader_accuracy``, which only the toy captions can be read for).
It imports no torch until a method needs it (the tables stage only asks for labels and notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

#: the attributes the reader scores, in table order
READER_ATTRIBUTES = ("colour", "shape", "position")


def fd_label(features: str) -> str:
    """The name of the Fréchet distance in ``features``: ``FID`` only on Inception features."""
    return "FID" if features == "inception" else "FD (toy CLIP features)"


def score_means(scores: Mapping[str, np.ndarray] | None) -> dict[str, float] | None:
    """``{key: mean}`` of per-image scores (None stays None)."""
    return None if scores is None else {k: float(v.mean()) for k, v in scores.items()}


@dataclass(frozen=True)
class Protocol:
    features: str  # evaluation.fid.features
    inception_weights: str | None  # evaluation.fid.inception_weights
    resolutions: tuple[int, ...]  # evaluation.fid.resolutions
    renders: bool  # reference images are renders of the prompts (toy) rather than files in images_dir
    render_size: int | None  # data.toy.image_size on the toy profile
    images_dir: str | None  # evaluation.reference.images_dir
    reader_accuracy: bool  # the attribute reader scores prompt following
    clip_model: str | None = None  # evaluation.clip.model
    clip_pretrained: str | None = None  # evaluation.clip.pretrained

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Protocol:
        """From a config with ``data.source`` and ``evaluation`` (``data.toy.image_size`` where renders are needed)."""
        ecfg, toy = cfg["evaluation"], cfg["data"]["source"] == "toy"
        size = cfg["data"].get("toy", {}).get("image_size") if toy else None
        return cls(
            features=ecfg["fid"]["features"],
            inception_weights=ecfg["fid"]["inception_weights"],
            resolutions=tuple(int(r) for r in ecfg["fid"]["resolutions"]),
            renders=toy,
            render_size=None if size is None else int(size),
            images_dir=ecfg["reference"]["images_dir"],
            reader_accuracy=toy and bool(ecfg["reader_accuracy"]),
            clip_model=ecfg["clip"]["model"],
            clip_pretrained=ecfg["clip"]["pretrained"],
        )

    @property
    def fd_label(self) -> str:
        return fd_label(self.features)

    def extractor(self, clip: tuple | None = None):
        """The feature extractor of the Fréchet distance (:func:`rapm.metrics.feature_extractor`).

        ``clip``: the CLIP-score model already loaded (:func:`rapm.metrics.load_clip`); where the FD
        features are that model's image embeddings (toy CLIP features, CLIP score by the shipped toy
        CLIP) it is used instead of loading the same weights a second time."""
        from rapm.metrics import TOY_CLIP, feature_extractor

        shared = self.features == "toyclip" and (self.clip_model, self.clip_pretrained) == (TOY_CLIP, None)
        model = clip[0] if clip is not None and shared else None
        return feature_extractor(self.features, inception_weights=self.inception_weights, model=model)

    def reference_images(self, prompts: pd.DataFrame) -> np.ndarray:
        """uint8 (n, H, W, 3) reference images of the evaluation prompts (native size; resized later)."""
        from rapm.metrics import MetricsError, center_crop_resize  # torch: not imported by the tables stage

        if self.renders:
            from rapm.toy.captions import reference_image

            if self.render_size is None:
                raise MetricsError("reference renders need data.toy.image_size, which this config lacks")
            return np.stack(
                [reference_image(c, int(i), self.render_size) for c, i in zip(prompts["caption"], prompts["image_id"])]
            )
        from PIL import Image

        if not self.images_dir:
            raise MetricsError(
                "evaluation.reference.images_dir is not set: FID of the SD profiles needs the COCO "
                "val2014 images (val2014/COCO_val2014_*.jpg from images.cocodataset.org/zips/val2014.zip)"
            )
        out = []
        for name in prompts["file_name"]:
            path = Path(self.images_dir) / name
            if not path.is_file():
                raise MetricsError(
                    f"{path}: reference image of an evaluation prompt not found in evaluation.reference.images_dir"
                )
            out.append(center_crop_resize(np.asarray(Image.open(path).convert("RGB")), max(self.resolutions)))
        return np.stack(out)

    def reader_scores(self, images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray] | None:
        """Per-image reader scores {``all``, attribute: (n,) floats} (:func:`rapm.toy.reader.scores`), or None
        where the reader does not apply."""
        if not self.reader_accuracy:
            return None
        from rapm.toy.reader import scores
        from rapm.toy.scene import parse_caption

        return scores(images, [parse_caption(c) for c in captions])

    def reader_accuracy_of(self, images: np.ndarray, captions: list[str]) -> dict[str, float] | None:
        """The means of :meth:`reader_scores`."""
        return score_means(self.reader_scores(images, captions))

    def table_notes(self) -> list[str]:
        """Footnotes the tables add for this protocol."""
        if not self.renders:
            return []
        return [
            "Toy profile: the Fréchet distance uses the toy CLIP's image features (not Inception) and the "
            "reference images are renders of the evaluation prompts"
            + ("; accuracy is the attribute reader's prompt following" if self.reader_accuracy else "")
            + ". None of these numbers is comparable to the published rows below."
        ]

    @property
    def published_heading(self) -> str:
        """How the tables introduce the published rows."""
        return (
            "Published reference rows"
            + (" (a separate block: other models, data and protocols)" if self.renders else "")
            + ":"
        )
