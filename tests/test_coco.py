"""Tests of rapm.coco and rapm.download: captions loading, and the fetch from file://, local paths and a loopback HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import zipfile
from pathlib import Path

import pytest

from rapm import captions, coco, download
from rapm.captions import CaptionsFormatError, load_captions
from rapm.coco import FetchError, fetch_captions

# --- fixtures ------------------------------------------------------------------------------


def captions_doc(split: str, image_ids: list[int], per_image: int = 3) -> dict:
    """A small file in the real COCO captions schema (with the official top-level keys)."""
    images = [
        {
            "license": 1,
            "file_name": f"COCO_{split}2014_{i:012d}.jpg",
            "height": 480,
            "width": 640,
            "id": i,
            "date_captured": "2013-11-14 16:28:13",
        }
        for i in image_ids
    ]
    anns = []
    for i in image_ids:
        for k in range(per_image):
            anns.append({"image_id": i, "id": i * 10 + k, "caption": f"{split} image {i} caption {k}"})
    return {"info": {"description": "test"}, "images": images, "licenses": [], "annotations": anns}


def write_json(path: Path, doc: dict) -> bytes:
    data = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.fixture
def originals() -> dict[str, bytes]:
    """Bytes of the two caption files the archive holds."""
    return {
        "captions_train2014.json": json.dumps(captions_doc("train", [9, 3, 7])).encode(),
        "captions_val2014.json": json.dumps(captions_doc("val", [42, 5])).encode(),
    }


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def archive(tmp_path: Path, originals: dict[str, bytes]) -> Path:
    """A miniature annotations_trainval2014.zip, with an extra member that must not be extracted."""
    members = {f"annotations/{name}": data for name, data in originals.items()}
    members["annotations/instances_train2014.json"] = b'{"images": [], "annotations": []}'
    return make_zip(tmp_path / "src" / "annotations_trainval2014.zip", members)


def cfg_for(url: str, sha256: str | None = None, local_path: str | None = None, retries: int = 3) -> dict:
    return {"url": url, "sha256": sha256, "local_path": local_path, "retries": retries, "timeout_s": 5}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_BASE_S", 0.001)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_outputs_equal(out_dir: Path, originals: dict[str, bytes]) -> None:
    for name, data in originals.items():
        assert (out_dir / name).read_bytes() == data
    assert files_in(out_dir) == sorted([*originals, "summary.json"])


# --- load_captions -------------------------------------------------------------------------


def test_load_captions_sorts_normalises_and_is_silent(tmp_path, capsys):
    doc = {
        "images": [{"id": 20, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 7, "image_id": 20, "caption": "  Ein Café\nnear the\t\tRiver  "},
            {"id": 2, "image_id": 20, "caption": "東京の 猫\r\n sleeps 🐈"},
            {"id": 9, "image_id": 3, "caption": "A dog."},
            {"id": 1, "image_id": 3, "caption": "A dog\n\n on  grass. "},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    write_json(path, doc)
    frame = load_captions(path)
    assert list(frame.columns) == ["image_id", "caption_id", "caption", "file_name"]
    assert frame.values.tolist() == [
        [3, 1, "A dog on grass.", "a.jpg"],
        [3, 9, "A dog.", "a.jpg"],
        [20, 2, "東京の 猫 sleeps 🐈", "b.jpg"],
        [20, 7, "Ein Café near the River", "b.jpg"],
    ]
    assert str(frame["image_id"].dtype) == "int64" and str(frame["caption_id"].dtype) == "int64"
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_load_captions_without_utf8_locale(tmp_path, monkeypatch):
    monkeypatch.setattr(captions.locale, "getpreferredencoding", lambda do_setlocale=True: "ISO-8859-1")
    path = tmp_path / "c.json"
    write_json(
        path,
        {
            "images": [{"id": 1, "file_name": "x.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "crème brûlée"}],
        },
    )
    assert load_captions(path)["caption"].tolist() == ["crème brûlée"]


@pytest.mark.parametrize(
    "doc, why",
    [
        ({"images": []}, "missing list 'annotations'"),
        (
            {"images": [{"id": 1, "file_name": "x"}], "annotations": [{"id": 1, "image_id": 2, "caption": "c"}]},
            "image_id 2",
        ),
        ({"images": [{"id": 1, "file_name": "x"}], "annotations": [{"id": 1, "image_id": 1}]}, "'caption'"),
    ],
)
def test_load_captions_rejects_other_schemas(tmp_path, doc, why):
    path = tmp_path / "bad.json"
    write_json(path, doc)
    with pytest.raises(CaptionsFormatError, match=why) as err:
        load_captions(path)
    assert str(path) in str(err.value)


# --- fetch from file:// --------------------------------------------------------------------


def test_fetch_file_url(tmp_path, archive, originals):
    sha = coco.sha256_file(archive)
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = fetch_captions(cfg_for(archive.as_uri(), sha), out_dir=out, cache_dir=cache)
    assert_outputs_equal(out, originals)
    assert files_in(cache) == ["annotations_trainval2014.zip"]
    assert summary["archive_sha256_found"] == sha and summary["archive_verified"] is True
    assert json.loads((out / "summary.json").read_text()) == summary

    # A second run uses the verified cache: the source may be gone.
    archive.unlink()
    (out / "captions_val2014.json").unlink()
    fetch_captions(cfg_for(archive.as_uri(), sha), out_dir=out, cache_dir=cache)
    assert_outputs_equal(out, originals)


def test_fetch_file_url_resumes_partial_download(tmp_path, archive, originals, caplog):
    data = archive.read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    half = len(data) // 2
    (cache / "annotations_trainval2014.zip.part").write_bytes(data[:half])
    with caplog.at_level(logging.INFO, logger="rapm"):
        fetch_captions(cfg_for(archive.as_uri(), coco.sha256_file(archive)), out_dir=tmp_path / "out", cache_dir=cache)
    assert f"at byte {half}" in caplog.text
    assert (cache / "annotations_trainval2014.zip").read_bytes() == data
    assert_outputs_equal(tmp_path / "out", originals)


def test_fetch_checksum_mismatch_removes_download(tmp_path, archive):
    out, cache = tmp_path / "out", tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(FetchError) as err:
        fetch_captions(cfg_for(archive.as_uri(), wrong), out_dir=out, cache_dir=cache)
    message = str(err.value)
    for part in (archive.as_uri(), wrong, coco.sha256_file(archive), f"{archive.stat().st_size} bytes"):
        assert part in message
    assert files_in(out) == []
    assert files_in(cache) == []


def test_fetch_truncated_archive_without_sha(tmp_path, archive, caplog):
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(FetchError, match="corrupt or truncated archive") as err:
        fetch_captions(cfg_for(archive.as_uri(), None), out_dir=out, cache_dir=cache)
    assert "annotations_trainval2014.zip" in str(err.value)
    assert "NOT verified" in caplog.text  # sha256: null is warned about
    assert files_in(out) == []
    assert files_in(cache) == []  # the bad cached archive is gone


def test_fetch_crc_error_in_second_member_leaves_no_outputs(tmp_path, originals):
    members = {f"annotations/{name}": data for name, data in originals.items()}
    path = make_zip(tmp_path / "annotations_trainval2014.zip", members, compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"val image 42 caption 1"') + 1
    raw[at] = ord("V")  # still valid JSON, but the CRC no longer matches
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="CRC") as err:
        fetch_captions(cfg_for(path.as_uri()), out_dir=out, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / path.name) in str(err.value)
    assert files_in(out) == []  # the good train file was not left behind either
    assert files_in(tmp_path / "cache") == []


def test_fetch_archive_missing_member(tmp_path, originals):
    path = make_zip(tmp_path / "a.zip", {"annotations/captions_train2014.json": originals["captions_train2014.json"]})
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="lacks captions_val2014.json"):
        fetch_captions(cfg_for(path.as_uri()), out_dir=out, cache_dir=tmp_path / "cache")
    assert files_in(out) == []


def test_fetch_archive_member_with_wrong_schema(tmp_path, originals):
    members = {
        "annotations/captions_train2014.json": originals["captions_train2014.json"],
        "annotations/captions_val2014.json": b'{"images": []}',
    }
    path = make_zip(tmp_path / "a.zip", members)
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="captions_val2014.json.*missing list 'annotations'"):
        fetch_captions(cfg_for(path.as_uri()), out_dir=out, cache_dir=tmp_path / "cache")
    assert files_in(out) == []


def test_fetch_file_url_not_found(tmp_path):
    with pytest.raises(FetchError, match="no such file"):
        fetch_captions(cfg_for((tmp_path / "nope.zip").as_uri()), out_dir=tmp_path / "o", cache_dir=tmp_path / "c")


# --- local_path ----------------------------------------------------------------------------

UNREACHABLE = "http://127.0.0.1:9/annotations_trainval2014.zip"  # discard port: any download would fail


def test_local_directory(tmp_path, originals):
    src = tmp_path / "coco" / "annotations"
    for name, data in originals.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out, cache = tmp_path / "out", tmp_path / "cache"
    fetch_captions(cfg_for(UNREACHABLE, "1" * 64, local_path=str(src.parent)), out_dir=out, cache_dir=cache)
    assert_outputs_equal(out, originals)
    assert files_in(cache) == []


def test_local_directory_missing_file(tmp_path, originals):
    src = tmp_path / "coco"
    src.mkdir()
    (src / "captions_train2014.json").write_bytes(originals["captions_train2014.json"])
    with pytest.raises(FetchError, match="data.coco.local_path.*captions_val2014.json"):
        fetch_captions(cfg_for(UNREACHABLE, local_path=str(src)), out_dir=tmp_path / "out", cache_dir=tmp_path / "c")
    assert files_in(tmp_path / "out") == []


def test_local_archive(tmp_path, archive, originals):
    out = tmp_path / "out"
    fetch_captions(
        cfg_for(UNREACHABLE, coco.sha256_file(archive), local_path=str(archive)),
        out_dir=out,
        cache_dir=tmp_path / "cache",
    )
    assert_outputs_equal(out, originals)
    assert files_in(tmp_path / "cache") == []


def test_local_archive_checksum_mismatch_keeps_users_file(tmp_path, archive):
    with pytest.raises(FetchError, match="expected 2222"):
        fetch_captions(
            cfg_for(UNREACHABLE, "2" * 64, local_path=str(archive)),
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "cache",
        )
    assert archive.is_file()
    assert files_in(tmp_path / "out") == []


def test_local_path_missing(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FetchError, match=f"data.coco.local_path.*{missing}"):
        fetch_captions(cfg_for(UNREACHABLE, local_path=str(missing)), out_dir=tmp_path / "o", cache_dir=tmp_path / "c")


# --- HTTP: resume, retry, no retry on 404 --------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` at /<mode>/annotations_trainval2014.zip.

    Modes: ``range`` honours Range, ``norange`` ignores it (always 200); both cut the first
    response off halfway. ``down`` always answers 503; anything else is 404.
    """

    payload = b""
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server API
        mode = self.path.strip("/").split("/")[0]
        rng = self.headers.get("Range")
        type(self).requests.append((self.path, rng))
        data = type(self).payload
        if mode not in ("range", "norange", "down") or not self.path.endswith("/annotations_trainval2014.zip"):
            self.send_error(404)
            return
        if mode == "down":
            self.send_error(503)
            return
        start = int(rng.removeprefix("bytes=").rstrip("-")) if (rng and mode == "range") else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        first_request = len(type(self).requests) == 1
        body = data[start:]
        self.wfile.write(body[: len(body) // 2] if first_request else body)
        self.wfile.flush()  # then the connection is closed: the client sees a short body

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    Handler.payload = archive.read_bytes()
    Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_http_drop_then_resume_with_range(tmp_path, server, archive, originals):
    size = archive.stat().st_size
    url = f"{server}/range/annotations_trainval2014.zip"
    out, cache = tmp_path / "out", tmp_path / "cache"
    fetch_captions(cfg_for(url, coco.sha256_file(archive)), out_dir=out, cache_dir=cache)
    assert Handler.requests == [
        ("/range/annotations_trainval2014.zip", None),
        ("/range/annotations_trainval2014.zip", f"bytes={size // 2}-"),
    ]
    assert (cache / "annotations_trainval2014.zip").read_bytes() == archive.read_bytes()
    assert_outputs_equal(out, originals)


def test_http_complete_part_file_is_used(tmp_path, server, archive, originals):
    """A .part that already holds every byte (the run died before the rename): HTTP 416, no re-download."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "annotations_trainval2014.zip.part").write_bytes(archive.read_bytes())
    url = f"{server}/range/annotations_trainval2014.zip"
    Handler.requests.append(("(skip the cut-off first response)", None))
    fetch_captions(cfg_for(url, coco.sha256_file(archive)), out_dir=tmp_path / "out", cache_dir=cache)
    assert Handler.requests[1:] == [("/range/annotations_trainval2014.zip", f"bytes={archive.stat().st_size}-")]
    assert_outputs_equal(tmp_path / "out", originals)


def test_http_server_ignoring_range_restarts(tmp_path, server, archive, originals, caplog):
    url = f"{server}/norange/annotations_trainval2014.zip"
    out, cache = tmp_path / "out", tmp_path / "cache"
    fetch_captions(cfg_for(url, coco.sha256_file(archive)), out_dir=out, cache_dir=cache)
    assert len(Handler.requests) == 2 and Handler.requests[1][1] is not None  # resume asked, refused
    assert "ignored the Range request" in caplog.text
    assert (cache / "annotations_trainval2014.zip").read_bytes() == archive.read_bytes()
    assert_outputs_equal(out, originals)


def test_http_404_is_not_retried(tmp_path, server):
    url = f"{server}/missing/annotations_trainval2014.zip"
    with pytest.raises(FetchError, match="HTTP 404.*not retried"):
        fetch_captions(cfg_for(url, retries=5), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert len(Handler.requests) == 1


def test_http_503_retried_with_exponential_backoff(tmp_path, server, monkeypatch):
    delays = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    url = f"{server}/down/annotations_trainval2014.zip"
    with pytest.raises(FetchError, match="after 4 attempt"):
        fetch_captions(cfg_for(url, retries=4), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert len(Handler.requests) == 4
    assert delays == pytest.approx([0.001, 0.002, 0.004])
    assert files_in(tmp_path / "out") == []
