"""COCO-format captions files (COCO 2014's and the toy dataset's): the schema check and the loader.

``load_captions`` reads one captions file with pycocotools into a tidy, sorted DataFrame; it does not
care whether the file came from COCO (:mod:`rapm.coco`) or the toy dataset (:mod:`rapm.toy.captions`).
"""

from __future__ import annotations

import contextlib
import io
import json
import locale
from pathlib import Path
from typing import Any

import pandas as pd

from rapm.errors import RapmError


class CaptionsFormatError(RapmError, ValueError):
    """A file is not a COCO captions file (JSON with images and annotations)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_captions(data: Any, source: str) -> None:
    """Raise ``CaptionsFormatError`` unless ``data`` follows the COCO captions schema.

    Required: ``images`` (each with integer ``id`` and string ``file_name``) and ``annotations``
    (each with integer ``id``, integer ``image_id`` of a listed image and string ``caption``).
    """

    def fail(why: str) -> CaptionsFormatError:
        return CaptionsFormatError(f"{source}: not a COCO captions file: {why}")

    if not isinstance(data, dict):
        raise fail(f"the top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise fail(f"missing list {key!r}")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)):
            raise fail(f"images[{i}] needs an integer 'id' and a string 'file_name': {img!r:.200}")
        image_ids.add(img["id"])
    if not data["annotations"]:
        raise fail("'annotations' is empty")
    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        if not (
            isinstance(ann, dict)
            and _is_int(ann.get("id"))
            and _is_int(ann.get("image_id"))
            and isinstance(ann.get("caption"), str)
        ):
            raise fail(f"annotations[{i}] needs integer 'id' and 'image_id' and a string 'caption': {ann!r:.200}")
        if ann["image_id"] not in image_ids:
            raise fail(f"annotations[{i}] refers to image_id {ann['image_id']}, which is not in 'images'")
        if ann["id"] in ann_ids:
            raise fail(f"annotations[{i}] repeats annotation id {ann['id']}")
        ann_ids.add(ann["id"])


def check_captions_file(path: str | Path, source: str | None = None) -> None:
    """Parse a JSON file (UTF-8) and check it with :func:`check_captions`."""
    source = source or str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaptionsFormatError(f"{source}: not valid UTF-8 JSON: {err}") from err
    check_captions(data, source)


def normalise_caption(text: str) -> str:
    """Strip and collapse all internal whitespace (spaces, tabs, newlines) to single spaces."""
    return " ".join(text.split())


def _read_coco(path: Path):
    """Load a captions file with pycocotools, silencing its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            return COCO(str(path))
        # COCO() opens the file in the locale's encoding; COCO files are UTF-8.
        coco = COCO()
        with open(path, encoding="utf-8") as f:
            coco.dataset = json.load(f)
        coco.createIndex()
        return coco


def load_captions(path: str | Path) -> pd.DataFrame:
    """Read a COCO captions file with pycocotools.

    Returns one row per caption with columns ``image_id``, ``caption_id`` (the annotation id),
    ``caption`` (whitespace-normalised) and ``file_name``, sorted by (image_id, caption_id), so
    the result does not depend on the order of the JSON arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        coco = _read_coco(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaptionsFormatError(f"{path}: not valid UTF-8 JSON: {err}") from err
    except (AssertionError, KeyError, TypeError) as err:  # pycocotools indexing a foreign file
        raise CaptionsFormatError(f"{path}: not a COCO captions file ({type(err).__name__}: {err})") from err
    check_captions(coco.dataset, str(path))

    anns = coco.loadAnns(coco.getAnnIds())
    images = {img["id"]: img for img in coco.loadImgs(sorted({a["image_id"] for a in anns}))}
    frame = pd.DataFrame(
        {
            "image_id": pd.Series([a["image_id"] for a in anns], dtype="int64"),
            "caption_id": pd.Series([a["id"] for a in anns], dtype="int64"),
            "caption": pd.Series([normalise_caption(a["caption"]) for a in anns], dtype=object),
            "file_name": pd.Series([images[a["image_id"]]["file_name"] for a in anns], dtype=object),
        }
    )
    return frame.sort_values(["image_id", "caption_id"], kind="stable", ignore_index=True)
