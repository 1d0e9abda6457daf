"""File output primitives (bottom layer: imports nothing of rapm but :mod:`rapm.errors`).

* :func:`atomic_path`: write a file under a temporary name in its final folder, rename it into place
  only when the block succeeds; the file gets the mode the process's umask gives
  (``0o666 & ~umask``), whatever the writer did (safetensors' own ``save_file`` writes through a
  0600 temporary file).
* :func:`save_safetensors`: the one safetensors writer of the project. safetensors 0.8 serialises
  its metadata from a hash map, so two identical runs give files with different bytes; this writes
  the format itself, deterministically: an 8-byte little-endian header length, the JSON header
  (compact, UTF-8; ``__metadata__`` first with its keys sorted, then one entry per tensor in data
  order), padded with spaces to a multiple of 8 bytes as safetensors pads, then the raw tensor bytes.
  Data order is safetensors' own (its dtype enum, i.e. alignment, descending, then name), so every
  tensor stays aligned and a file with at most one metadata key is byte-identical to
  ``safetensors.torch.save_file``'s (``tests/test_io.py`` checks that).
  ``require_finite`` refuses NaN/±inf in floating tensors before anything is written.
* :func:`write_text`, :func:`write_json`: atomic text and JSON files (the one JSON format of the project:
  indented, sorted keys, trailing newline; ``indent=None`` for compact files).
* :func:`optimizer_tensors`, :func:`load_optimizer_tensors`: an optimizer's state as flat tensors for
  safetensors checkpoints, and back.
* :func:`write_summary`: the one writer of a stage's summary JSON (trajectory shards and manifest,
  training, the COCO fetch): the stage's own fields plus ``stage``, ``versions``, ``peak_rss_mb``,
  ``peak_gpu_mb`` (:func:`resource_fields`) and the SHA-256 of its final outputs.
* :func:`library_versions`, :func:`peak_rss_mb`: what a stage summary records about its environment.
* :func:`sha256_file`, :func:`umask_mode`, :func:`apply_umask_mode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import resource
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rapm.errors import RapmError

CHUNK_BYTES = 1 << 20


class NonFiniteTensorError(RapmError, ValueError):
    """A tensor to be written holds NaN or ±inf values (nothing was written)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def umask_mode() -> int:
    """The mode a new regular file gets from this process's umask: ``0o666 & ~umask``."""
    try:  # Linux >= 4.7: read it without changing it (os.umask is process-wide, not thread-safe)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask_mode(paths: Iterable[str | Path]) -> None:
    """Give each regular file in ``paths`` the umask's mode (for files a library wrote as 0600)."""
    mode = umask_mode()
    for p in paths:
        if Path(p).is_file():
            os.chmod(p, mode)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` if the block succeeds.

    The caller writes the temporary path. On an exception it is removed and ``final`` is left
    untouched, so readers only ever see complete files. A written file gets :func:`umask_mode`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, umask_mode())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); ``fsync``: flush to disk first."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def write_json(
    path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = True, fsync: bool = False
) -> Path:
    """Write ``data`` as JSON with a trailing newline, atomically: a reader sees the old file or the whole new
    one. ``indent=None`` writes compact separators (``,`` and ``:``)."""
    separators = None if indent is not None else (",", ":")
    return write_text(
        path, json.dumps(data, indent=indent, sort_keys=sort_keys, separators=separators) + "\n", fsync=fsync
    )


#: the libraries a stage summary records by default (``rapm`` itself included)
LIBRARIES = ("torch", "diffusers", "transformers", "zarr", "numpy", "rapm")


def library_versions(libraries: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """``{"python": ..., <library>: <__version__>, ...}`` for each importable name in ``libraries``."""
    out = {"python": platform.python_version()}
    for name in libraries:
        out[name] = str(importlib.import_module(name).__version__)
    return out


#: CPU features whose presence changes which MKL / oneDNN kernels run, and so the last bits of a result
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")


def machine() -> dict[str, Any]:
    """The processor a result was computed on: ``cpu`` (its model name), ``isa`` (which of :data:`ISA_FLAGS` it
    has), ``torch_cpu_capability`` (the kernels torch dispatches to; only where torch is imported). Results are
    bit-identical run to run on one kind of CPU, not across kinds (docs/findings.md)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    out = {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch.backends, "cpu"):
        out["torch_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resource_fields(device: Any = None) -> dict[str, float | None]:
    """``peak_rss_mb`` of this process and ``peak_gpu_mb`` (CUDA max allocated; None off CUDA), rounded to 0.1."""
    gpu = None
    if device is not None and str(device).startswith("cuda"):
        import torch

        gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": gpu}


def write_summary(
    path: str | Path,
    stage: str,
    fields: Mapping[str, Any],
    *,
    outputs: Iterable[str | Path] = (),
    device: Any = None,
    libraries: Iterable[str] = LIBRARIES,
) -> dict[str, Any]:
    """Write a stage's summary to ``path`` (:func:`write_json`) and return it.

    The summary is ``fields`` plus, where ``fields`` does not set them already: ``stage``, the
    :func:`resource_fields` of ``device``, ``versions`` (:func:`library_versions` of ``libraries``) and
    ``machine`` (:func:`machine`); ``sha256`` gains ``{file name: sha256}`` of each path in ``outputs``.
    """
    summary = {"stage": stage, **fields}
    for key, value in resource_fields(device).items():
        summary.setdefault(key, value)
    if "versions" not in summary:
        summary["versions"] = library_versions(libraries)
    if "machine" not in summary:
        summary["machine"] = machine()
    outputs = [Path(p) for p in outputs]
    if outputs:
        summary["sha256"] = {**summary.get("sha256", {}), **{p.name: sha256_file(p) for p in outputs}}
    write_json(path, summary)
    return summary


def optimizer_tensors(prefix: str, opt) -> dict[str, Any]:
    """A torch optimizer's state as flat tensors ``<prefix>.<param index>.<name>`` (safetensors has no nesting)."""
    import torch

    out = {}
    for pid, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{prefix}.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(prefix: str, opt, tensors: Mapping[str, Any]) -> None:
    """Inverse of :func:`optimizer_tensors`: load the ``<prefix>.*`` tensors into ``opt`` (its param groups stay)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


# --- safetensors -----------------------------------------------------------------------------------

_TORCH_DTYPES = {  # torch dtype name -> safetensors dtype
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_NUMPY_DTYPES = {  # numpy dtype name -> safetensors dtype
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def _as_bytes(name: str, value: Any) -> tuple[str, list[int], Any]:
    """(safetensors dtype, shape, the data as a flat uint8 numpy view)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        dtype = _NUMPY_DTYPES.get(arr.dtype.name)
        if dtype is None or not arr.dtype.isnative:
            raise ValueError(f"tensor {name!r}: numpy dtype {arr.dtype} cannot be written to safetensors")
        return dtype, list(arr.shape), arr.reshape(-1).view(np.uint8)
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"tensor {name!r}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    t = value.detach().to("cpu").contiguous()
    dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"tensor {name!r}: torch dtype {t.dtype} cannot be written to safetensors")
    return dtype, list(t.shape), t.reshape(-1).view(torch.uint8).numpy()


def non_finite_count(value: Any) -> tuple[int, int]:
    """(NaN count, ±inf count) of a torch tensor or numpy array; (0, 0) for non-floating dtypes."""
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or np.isfinite(value).all():
            return 0, 0
        return int(np.isnan(value).sum()), int(np.isinf(value).sum())
    import torch

    value = value.detach()
    if not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return 0, 0
    return int(torch.isnan(value).sum()), int(torch.isinf(value).sum())


#: safetensors' ``Dtype`` enum order (increasing alignment); data is laid out in descending order, then by name
_DTYPE_ORDER = {
    d: i
    for i, d in enumerate(
        (
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "F64",
            "I64",
            "U64",
        )
    )
}


def _encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
    """(header bytes including the 8-byte length and padding, [(name, uint8 buffer)] in data order)."""
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; bad keys: {bad}")
    if "__metadata__" in tensors:
        raise ValueError("'__metadata__' cannot be a tensor name")
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        dtype, shape, data = _as_bytes(name, value)
        entries.append((name, dtype, shape, data))
    entries.sort(key=lambda e: (-_DTYPE_ORDER[e[1]], e[0]))  # safetensors' own data order
    header: dict[str, Any] = {}
    if meta:
        header["__metadata__"] = {k: meta[k] for k in sorted(meta)}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, [(name, data) for name, _, _, data in entries]


def save_safetensors(
    tensors: Mapping[str, Any],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    require_finite: bool = False,
) -> Path:
    """Write ``tensors`` (torch tensors or numpy arrays) and ``metadata`` (str → str) to ``path``:
    deterministic bytes (see the module docstring), atomic (:func:`atomic_path`), mode from the umask,
    fsynced. ``require_finite``: raise :class:`NonFiniteTensorError` naming the first floating tensor
    (by name) that holds NaN/±inf, before anything is written. Readable by ``safetensors.safe_open``,
    ``safetensors.torch.load_file`` and ``safetensors.numpy.load_file``."""
    if sys.byteorder != "little":  # safetensors is little-endian; so far no big-endian machine to test on
        raise RuntimeError("rapm.io.save_safetensors writes native byte order and needs a little-endian machine")
    path = Path(path)
    if require_finite:
        for name in sorted(tensors):
            n_nan, n_inf = non_finite_count(tensors[name])
            if n_nan or n_inf:
                value = tensors[name]
                raise NonFiniteTensorError(
                    f"tensor {name!r} ({str(value.dtype).removeprefix('torch.')}, shape {tuple(value.shape)}) holds "
                    f"{n_nan} NaN and {n_inf} ±inf values; {path} was not written",
                    name,
                )
    head, data = _encode(tensors, metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for _, buf in data:
                f.write(memoryview(buf))
            f.flush()
            os.fsync(f.fileno())
    return path
