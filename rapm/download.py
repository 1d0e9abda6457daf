"""Resumable, retried download of one URL (http, https or file) to a local file.

Bytes go to ``<dest>.part`` while incomplete; a later call continues it with an HTTP ``Range``
request, transient errors are retried with exponential backoff, and only a complete file is
renamed to ``dest``. Nothing here knows what is downloaded; :mod:`rapm.coco` uses it for the
annotations archive.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

import rapm
from rapm.errors import RapmError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Delay before retry k (k = 1, 2, ...) is BACKOFF_BASE_S * 2**(k-1), capped at BACKOFF_MAX_S.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
_USER_AGENT = f"rapm/{rapm.__version__} (python-urllib)"


class FetchError(RapmError, RuntimeError):
    """A download (or, in :mod:`rapm.coco`, the verification or extraction of what it fetched) failed."""


@dataclass
class _Source:
    """An open byte stream positioned at ``start``; ``total`` is the full size when known."""

    stream: IO[bytes]
    start: int
    total: int | None


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes a-b/total`` (or ``bytes */total``)."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _open_http(url: str, offset: int, timeout_s: float) -> _Source:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is at least as long as the resource
            _, total = _content_range(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                return _Source(io.BytesIO(b""), offset, total)
            log.warning("%s: server rejected the range at byte %d; restarting the download", url, offset)
            return _open_http(url, 0, timeout_s)
        raise
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if resp.status == 206:
        first, total = _content_range(resp.headers.get("Content-Range"))
        if first != offset:
            resp.close()
            log.warning("%s: server answered a range starting at %s, not %d; restarting", url, first, offset)
            return _open_http(url, 0, timeout_s)
        return _Source(resp, offset, total if total is not None else (offset + length if length is not None else None))
    if offset:
        log.warning("%s: server ignored the Range request (HTTP %d); restarting from byte 0", url, resp.status)
    return _Source(resp, 0, length)


def _open_file(url: str, offset: int) -> _Source:
    parts = urllib.parse.urlsplit(url)
    path = Path(urllib.request.url2pathname(parts.path))
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{url}: file:// URLs must name a local path (host {parts.netloc!r} is not supported)")
    if not path.is_file():
        raise FetchError(f"{url}: no such file: {path}")
    size = path.stat().st_size
    if offset > size:
        log.warning("%s: partial download is longer than the source; restarting", url)
        offset = 0
    stream = open(path, "rb")
    stream.seek(offset)
    return _Source(stream, offset, size)


def _is_transient(err: BaseException) -> bool:
    """Whether a failed attempt is worth retrying (network trouble, not a wrong URL)."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code in (408, 429) or 500 <= err.code < 600
    if isinstance(err, urllib.error.URLError):
        return not isinstance(err.reason, ssl.SSLCertVerificationError)
    return isinstance(err, (TimeoutError, ConnectionError, http.client.HTTPException))


def _attempt(url: str, part: Path, timeout_s: float) -> None:
    """One download attempt: continue ``part`` from its current size to the end of ``url``."""
    offset = part.stat().st_size if part.exists() else 0
    if offset:
        log.info("%s: resuming %s at byte %d", url, part.name, offset)
    source = _open_file(url, offset) if url.startswith("file:") else _open_http(url, offset, timeout_s)
    written = source.start
    with (
        source.stream,
        open(part, "ab" if source.start else "wb") as out,
        tqdm(
            total=source.total,
            initial=source.start,
            desc=part.name.removesuffix(".part"),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            mininterval=1.0,
        ) as bar,
    ):
        while chunk := source.stream.read(CHUNK_BYTES):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    if source.total is not None and written != source.total:
        if written > source.total:
            part.unlink()  # longer than the resource: start over on the next attempt
        raise ConnectionError(f"connection closed at byte {written} of {source.total}")


def download(
    url: str, dest: str | Path, *, retries: int = 5, timeout_s: float = 60.0, backoff_s: float | None = None
) -> Path:
    """Download ``url`` (http, https or file) to ``dest``, resumably.

    Bytes go to ``<dest>.part``; an existing ``.part`` is continued (HTTP ``Range``; a server
    that answers 200 instead of 206 makes the download start over). Transient errors (URLError,
    timeouts, connection resets, truncated bodies, HTTP 408/429/5xx) are retried up to
    ``retries`` attempts in all, waiting ``backoff_s * 2**(k-1)`` seconds before retry k
    (``backoff_s`` defaults to ``BACKOFF_BASE_S``). Other errors (HTTP 404, 403, ...) fail at
    once. On success the ``.part`` file is renamed to ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    base = BACKOFF_BASE_S if backoff_s is None else backoff_s
    for attempt in range(1, retries + 1):
        try:
            _attempt(url, part, timeout_s)
            break
        except Exception as err:  # noqa: BLE001 - classified right below
            if not _is_transient(err):
                if isinstance(err, urllib.error.HTTPError):
                    raise FetchError(f"{url}: HTTP {err.code} {err.reason} (not retried)") from err
                raise
            if attempt == retries:
                raise FetchError(
                    f"{url}: download failed after {retries} attempt(s): {type(err).__name__}: {err}; "
                    f"{part} is kept, so running again resumes it"
                ) from err
            delay = min(base * 2 ** (attempt - 1), BACKOFF_MAX_S)
            log.warning(
                "%s: attempt %d/%d failed (%s: %s); retrying in %.3g s",
                url,
                attempt,
                retries,
                type(err).__name__,
                err,
                delay,
            )
            time.sleep(delay)
    os.replace(part, dest)
    return dest
