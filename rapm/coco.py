"""COCO 2014 captions: resumable, verified download of the annotations archive, and loading.

``fetch_captions`` produces ``captions_train2014.json`` and ``captions_val2014.json`` in an
output directory, from one of three sources (``data.coco`` in the config):

* ``local_path`` is a directory holding the two files: they are validated and copied in;
* ``local_path`` is a local copy of the archive: its SHA-256 is checked, the two files extracted;
* otherwise ``url`` is downloaded into ``cache_dir`` by :func:`rapm.download.download`
  (``<archive>.part`` while incomplete, resumed with HTTP ``Range`` requests, retried with
  exponential backoff on transient errors), verified against ``sha256`` and extracted.

Every output is written under a temporary name in the output directory and renamed into place
only after both files have been read in full and validated, so a failure never leaves a
partial or half-trusted file behind. The captions format (checking and loading a captions file) is
:mod:`rapm.captions`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import rapm
from rapm.captions import CaptionsFormatError, check_captions_file
from rapm.cliargs import add_config_args, stage_config
from rapm.download import CHUNK_BYTES, FetchError, download
from rapm.io import atomic_path, sha256_file, write_summary

log = logging.getLogger(__name__)

CAPTION_FILES = ("captions_train2014.json", "captions_val2014.json")
DEFAULT_ARCHIVE_NAME = "annotations_trainval2014.zip"


# --- verify and extract --------------------------------------------------------------------


def verify_sha256(path: Path, expected: str | None, origin: str, *, remove_bad: bool) -> str:
    """Return the file's SHA-256; raise ``FetchError`` if it differs from ``expected``.

    ``expected=None`` skips the check with a warning. ``remove_bad`` deletes a mismatching file
    (a cached download), so a later run does not trust it.
    """
    found = sha256_file(path)
    if expected is None:
        log.warning("%s: no data.coco.sha256 configured; NOT verified (found sha256 %s)", path, found)
        return found
    if found != expected.lower():
        size = path.stat().st_size
        if remove_bad:
            path.unlink(missing_ok=True)
        raise FetchError(
            f"{origin}: SHA-256 mismatch for {path.name} ({size} bytes): expected {expected}, found {found}"
            + ("; the file was removed" if remove_bad else "")
        )
    log.info("%s: sha256 verified (%s)", path.name, found)
    return found


def _find_members(zf: zipfile.ZipFile, archive: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive members holding the caption files, located by basename."""
    found: dict[str, list[zipfile.ZipInfo]] = {name: [] for name in CAPTION_FILES}
    for info in zf.infolist():
        name = PurePosixPath(info.filename).name
        if name in found and not info.is_dir():
            found[name].append(info)
    missing = [name for name, infos in found.items() if not infos]
    if missing:
        raise FetchError(
            f"{archive}: archive lacks {', '.join(missing)} "
            f"(it holds {len(zf.infolist())} members, e.g. {zf.namelist()[:5]})"
        )
    ambiguous = {name: [i.filename for i in infos] for name, infos in found.items() if len(infos) > 1}
    if ambiguous:
        raise FetchError(f"{archive}: several members match: {ambiguous}")
    return {name: infos[0] for name, infos in found.items()}


def extract_captions(archive: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Extract and validate the two caption files from ``archive`` into ``out_dir``.

    Both are written to temporary names and renamed only once both are complete and valid;
    any failure (not a zip, truncated, CRC error, missing member, bad JSON) raises
    ``FetchError`` naming the archive and leaves no output behind.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    outputs = {name: out_dir / name for name in CAPTION_FILES}
    try:
        with zipfile.ZipFile(archive) as zf, contextlib.ExitStack() as stack:
            for name, info in _find_members(zf, archive).items():
                tmp = stack.enter_context(atomic_path(outputs[name]))
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)  # the CRC is checked at the end
                check_captions_file(tmp, source=f"{archive}:{info.filename}")
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise FetchError(f"{archive}: corrupt or truncated archive: {type(err).__name__}: {err}") from err
    except CaptionsFormatError as err:
        raise FetchError(f"{archive}: {err}") from err
    return outputs


def _copy_captions_dir(src_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Validate and copy the two caption files from a directory (or its ``annotations/``)."""
    sources = {}
    for name in CAPTION_FILES:
        candidates = [src_dir / name, src_dir / "annotations" / name]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise FetchError(
                f"data.coco.local_path: directory {src_dir} has no {name} "
                f"(looked for {', '.join(map(str, candidates))})"
            )
        sources[name] = hit
    outputs = {name: out_dir / name for name in CAPTION_FILES}
    with contextlib.ExitStack() as stack:
        for name, src in sources.items():
            try:
                check_captions_file(src)
            except CaptionsFormatError as err:
                raise FetchError(f"data.coco.local_path: {err}") from err
            tmp = stack.enter_context(atomic_path(outputs[name]))
            shutil.copyfile(src, tmp)
    return outputs


# --- the stage -----------------------------------------------------------------------------


def archive_name(url: str) -> str:
    """File name of the archive a URL points to (used for the cache)."""
    return PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or DEFAULT_ARCHIVE_NAME


def _cached_archive(coco_cfg: Mapping[str, Any], cache_dir: Path) -> tuple[Path, str]:
    """The archive in ``cache_dir`` and its SHA-256, verified; downloaded (or resumed) when needed."""
    url, expected = coco_cfg["url"], coco_cfg.get("sha256")
    archive = cache_dir / archive_name(url)
    if archive.is_file():
        found = sha256_file(archive)
        if expected is None or found == expected.lower():
            log.info("using cached %s", archive)
            if expected is None:
                log.warning("%s: no data.coco.sha256 configured; NOT verified (found sha256 %s)", archive, found)
            return archive, found
        log.warning("cached %s does not match data.coco.sha256; removing it and downloading again", archive)
        archive.unlink()
    log.info("downloading %s to %s", url, archive)
    download(url, archive, retries=int(coco_cfg.get("retries", 5)), timeout_s=float(coco_cfg.get("timeout_s", 60)))
    return archive, verify_sha256(archive, expected, url, remove_bad=True)


def fetch_captions(coco_cfg: Mapping[str, Any], out_dir: str | Path, cache_dir: str | Path) -> dict[str, Any]:
    """Produce ``captions_train2014.json`` and ``captions_val2014.json`` in ``out_dir``.

    ``coco_cfg`` is the ``data.coco`` config section (url, sha256, local_path, retries,
    timeout_s). Writes ``summary.json`` next to the captions (source, hashes, sizes, wall time)
    and returns the same dictionary. Raises ``FetchError`` on any failure.
    """
    started = time.monotonic()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    expected = coco_cfg.get("sha256")
    local = coco_cfg.get("local_path")
    archive: Path | None = None
    archive_sha: str | None = None

    if local is not None:
        local_path = Path(local)
        if local_path.is_dir():
            log.info("copying captions from directory %s (data.coco.local_path)", local_path)
            outputs = _copy_captions_dir(local_path, out_dir)
        elif local_path.is_file():
            log.info("extracting captions from local archive %s (data.coco.local_path)", local_path)
            archive = local_path
            archive_sha = verify_sha256(local_path, expected, "data.coco.local_path", remove_bad=False)
            outputs = extract_captions(local_path, out_dir)  # never delete the user's own file
        else:
            raise FetchError(f"data.coco.local_path: no such file or directory: {local_path}")
    else:
        archive, archive_sha = _cached_archive(coco_cfg, cache_dir)
        try:
            outputs = extract_captions(archive, out_dir)
        except FetchError:
            archive.unlink(missing_ok=True)
            log.error("removed the unusable cached archive %s", archive)
            raise

    summary = {
        "rapm_version": rapm.__version__,
        "source": str(local) if local is not None else coco_cfg["url"],
        "archive": None if archive is None else archive.name,
        "archive_sha256_expected": expected,
        "archive_sha256_found": archive_sha,
        "archive_verified": archive is not None and expected is not None,
        "files": {name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for name, path in outputs.items()},
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    summary = write_summary(out_dir / "summary.json", "fetch-coco", summary, libraries=("rapm", "pandas"))
    log.info("wrote %s to %s", ", ".join(CAPTION_FILES), out_dir)
    return summary


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm fetch-coco`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--out-dir", required=True, help="where captions_{train,val}2014.json are written")
    p.add_argument(
        "--cache-dir", required=True, help="where the archive is downloaded (kept across runs so a download resumes)"
    )


def command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data.coco")
    fetch_captions(cfg["data"]["coco"], out_dir=args.out_dir, cache_dir=args.cache_dir)
    return 0
