"""rapm.io (the one safetensors writer: deterministic bytes, atomic, umask mode; atomic text and JSON; versions; optimizer state), rapm.shards, rapm.device."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from rapm.io import NonFiniteTensorError, atomic_path, save_safetensors, umask_mode


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 2, generator=g),
        "a16": torch.randn(5, generator=g).half(),
        "steps": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "i16": torch.arange(4, dtype=torch.int16),
        "u8": torch.arange(3, dtype=torch.uint8),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"x": 'é\n"/\\\x01 ☃'}])
def test_bytes_equal_safetensors_own_writer_when_its_order_is_unambiguous(metadata, tmp_path):
    """With at most one metadata key safetensors' hash-map order does not matter: the files must be identical."""
    from safetensors.torch import save_file

    data = tensors()
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "ref.safetensors"), metadata=metadata)
    save_safetensors(data, tmp_path / "ours.safetensors", metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_many_metadata_keys_give_the_same_bytes_in_any_order_and_load_everywhere(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    data, meta = tensors(), {f"key{i}": f"value {i}" for i in range(8)}
    save_safetensors(data, tmp_path / "a.safetensors", meta)
    save_safetensors(dict(reversed(list(data.items()))), tmp_path / "b.safetensors", dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and sorted(f.keys()) == sorted(data)
    loaded = load_file(tmp_path / "a.safetensors")
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in data.items())


def test_numpy_arrays(tmp_path):
    from safetensors.numpy import load_file

    arrays = {
        "center": np.arange(5, dtype=np.float64),
        "medians": np.ones((2, 2), np.float32),
        "ids": np.arange(3, dtype=np.int64),
    }
    save_safetensors(arrays, tmp_path / "r.safetensors", {"rapm.router": "{}"})
    loaded = load_file(tmp_path / "r.safetensors")
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in arrays.items())


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_file_mode_comes_from_the_umask(mask, mode, umask, tmp_path):
    umask(mask)
    assert umask_mode() == mode
    path = save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    with atomic_path(tmp_path / "y.txt") as tmp:
        tmp.write_text("y")
        os.chmod(tmp, 0o600)  # what safetensors' own save_file does to its temporary file
    assert stat.S_IMODE((tmp_path / "y.txt").stat().st_mode) == mode


def test_non_finite_tensor_is_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"x": torch.ones(2)}, path)
    before = path.read_bytes()
    bad = {
        "fine": torch.ones(3),
        "bad": torch.tensor([1.0, float("inf"), float("nan")]).half(),
        "ints": torch.arange(3),
    }
    with pytest.raises(
        NonFiniteTensorError, match=r"tensor 'bad' \(float16, shape \(3,\)\) holds 1 NaN and 1 ±inf"
    ) as err:
        save_safetensors(bad, path, require_finite=True)
    assert err.value.name == "bad" and path.read_bytes() == before
    save_safetensors(bad, tmp_path / "unchecked.safetensors")  # the check is opt-in
    with pytest.raises(TypeError, match="tensor 'x'"):
        save_safetensors({"x": [1.0]}, path)
    with pytest.raises(ValueError, match="bad keys"):
        save_safetensors({"x": torch.ones(1)}, path, {"n": 1})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "unchecked.safetensors",
        "x.safetensors",
    ]


def test_write_json_formats_and_replaces_atomically(tmp_path):
    from rapm.io import write_json

    path = write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_json(path, {"z": "é", "a": 1}, indent=None, sort_keys=False)  # compact, order kept, ASCII-escaped
    assert path.read_bytes() == b'{"z":"\\u00e9","a":1}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert path.read_bytes() == b'{"z":"\\u00e9","a":1}\n'  # a failed write leaves the old file


def test_library_versions_and_peak_rss():
    import platform

    from rapm.io import library_versions, peak_rss_mb

    v = library_versions(("torch", "numpy"))
    assert v == {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    with pytest.raises(ModuleNotFoundError):
        library_versions(("no_such_library_rapm",))
    assert 10 < peak_rss_mb() < 1e6


def test_machine_names_the_cpu_and_the_instruction_sets_that_pick_kernels(monkeypatch, tmp_path):
    from rapm import io

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f amx_tile\n")
    real_path = io.Path
    monkeypatch.setattr(io, "Path", lambda p, *a: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p, *a))
    m = io.machine()
    assert m["cpu"] == "Test CPU 9000" and m["isa"] == ["avx2", "avx512f", "amx_tile"]
    assert m["torch_cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())


def test_write_summary_adds_the_common_fields_and_keeps_the_stages_own(tmp_path):
    import hashlib
    import json
    import platform

    from rapm.io import machine, write_summary

    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"weights")
    summary = write_summary(
        tmp_path / "summary.json",
        "train",
        {"iterations": 3, "sha256": {"x": "y"}},
        outputs=[out],
        device="cpu",
        libraries=("numpy",),
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["stage"] == "train" and summary["iterations"] == 3
    assert summary["versions"] == {"python": platform.python_version(), "numpy": np.__version__}
    assert summary["sha256"] == {"x": "y", "lora.safetensors": hashlib.sha256(b"weights").hexdigest()}
    assert summary["peak_gpu_mb"] is None and 10 < summary["peak_rss_mb"] < 1e6
    assert summary["machine"] == machine() and summary["machine"]["cpu"]
    kept = write_summary(tmp_path / "s2.json", "shard", {"peak_rss_mb": 1.5, "versions": {"zarr": "3"}})
    assert kept["peak_rss_mb"] == 1.5 and kept["versions"] == {"zarr": "3"}  # the stage's own values win
    assert "sha256" not in kept


def test_optimizer_tensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    from rapm.io import load_optimizer_tensors, optimizer_tensors

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    save_safetensors(optimizer_tensors("opt", opt), tmp_path / "o.safetensors")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    load_optimizer_tensors("opt", opt2, load_file(tmp_path / "o.safetensors"))
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) == 2
    for pid in a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(a[pid][name]), torch.as_tensor(b[pid][name])), (pid, name)


@pytest.mark.parametrize("unit", [1, 3, 8])
def test_shard_range_partitions_balanced_whole_units(unit):
    from rapm.shards import shard_range

    for n in range(0, 40):
        for shards in range(1, 7):
            ranges = [shard_range(n, shards, s, unit) for s in range(shards)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
            assert all(lo % unit == 0 for lo, _ in ranges)  # whole units
            sizes = [-(-(hi - lo) // unit) for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="outside"):
        shard_range(5, 2, 2)


def test_item_seed_and_sampling_shards_use_the_shared_functions():
    from rapm.sample import SamplingError
    from rapm.sample import shard_range as sampling_shards
    from rapm.shards import item_seed

    assert item_seed(7, 3) == 10 and isinstance(item_seed(np.int64(1), np.int64(2)), int)
    assert sampling_shards(10, 3, 1) == (3, 6)
    with pytest.raises(SamplingError, match="outside"):
        sampling_shards(10, 3, 3)


def test_resolve_device_names_the_key():
    from rapm.device import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="toy_teacher.device is 'tpu'"):
        resolve_device("tpu", key="toy_teacher.device")
    with pytest.raises(DeviceError):
        resolve_device("cpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:0")
