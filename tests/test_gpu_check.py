"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end on the CPU at tiny shapes.

Its ``main`` runs in-process once with ``--device cpu --tiny --out <tmp>``; the tests read the Markdown
table it wrote: every row is there, every timing is a finite positive number, the UNet calls per update
equal what the objective really makes (counted here with our own forward pre-hook around the same public
RAPM calls, on teachers loaded through rapm.teacher.load_teacher), the trajectory and sampling calls
follow from the grids, the bf16-vs-fp32 differences are finite and small, and the fp16 teacher stays
finite for 20 iterations. No GPU, no network.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
UPDATE_ROWS = {  # row name -> (teacher fixture, gradient checkpointing, update kind)
    "SDXL D update, checkpointing": ("tiny_sdxl_dir", True, "d"),
    "SDXL G update, checkpointing": ("tiny_sdxl_dir", True, "g"),
    "SD1.5 D update, checkpointing": ("tiny_sd_dir", True, "d"),
    "SD1.5 G update, checkpointing": ("tiny_sd_dir", True, "g"),
    "SD1.5 D update, no checkpointing": ("tiny_sd_dir", False, "d"),
    "SD1.5 G update, no checkpointing": ("tiny_sd_dir", False, "g"),
}
TRAJECTORY_ROWS = ["SD1.5 trajectories", "SDXL trajectories"]
SAMPLING_ROWS = ["SD1.5 4-step sampling", "SDXL 4-step sampling"]
NUMERIC_ROWS = ["bf16 vs fp32 G step", "fp16 teacher training"]
TIMING_ROWS = [*UPDATE_ROWS, *TRAJECTORY_ROWS, *SAMPLING_ROWS]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(lines before the table, {row name: {column: cell}}) of the check's Markdown."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # noqa: E731
    columns = split(lines[start])
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(columns, split(line)))
        rows[cells["row"]] = cells
    return lines[:start], rows


def _number(cell: str) -> float:
    """The leading number of a cell such as ``0.131`` or ``7.61 updates/s``."""
    match = re.match(r"[-+]?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", cell)
    assert match, f"not a number: {cell!r}"
    return float(match.group().replace(",", ""))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "table.md"
    assert _load_script().main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    return _parse(out.read_text(encoding="utf-8"))


def test_header_names_device_torch_date_and_random_weights(table):
    header = "\n".join(table[0])
    assert "CPU" in header and f"torch {torch.__version__}" in header
    assert re.search(r"\d{4}-\d{2}-\d{2}", header), header
    assert "random weights" in header and "tiny shapes" in header and "says nothing about GPU speed" in header


def test_every_row_is_there(table):
    rows = table[1]
    missing = [n for n in [*TIMING_ROWS, *NUMERIC_ROWS] if n not in rows]
    assert not missing, f"rows missing: {missing}; table has {sorted(rows)}"
    assert {"SD1.5 config dtypes", "SDXL config dtypes"} <= set(rows)


@pytest.mark.parametrize("name", TIMING_ROWS)
def test_timing_cells_are_finite_positive_numbers(table, name):
    cells = table[1][name]
    assert not cells["result"].startswith("error"), cells
    for column in ("median s", "rate"):
        value = _number(cells[column])
        assert math.isfinite(value) and value > 0, (column, cells)


def _counted_calls(teacher_dir, checkpointing: bool) -> dict[str, int]:
    """UNet forwards of one D and one G update, counted with our own hook around the public RAPM calls."""
    from rapm.conditioning import Conditioning
    from rapm.config import validate
    from rapm.discriminator import Discriminator
    from rapm.lora import add_student_lora, enable_gradient_checkpointing
    from rapm.objective import RAPM, Batch
    from rapm.schedule import coarse_timesteps, delta_timesteps
    from rapm.teacher import load_teacher

    teacher = load_teacher({"path": str(teacher_dir), "dtype": "float32", "device": "cpu"})
    cfg = validate({"train": {"mixed_precision": "bf16", "gradient_checkpointing": checkpointing}}, partial=True)[
        "train"
    ]
    n, m = (validate({"trajectories": {}}, partial=True)["trajectories"][k] for k in ("num_steps", "steps_per_slot"))
    unet = teacher.unet
    add_student_lora(unet, cfg["lora"])
    disc = Discriminator(unet, cfg["discriminator"])
    if checkpointing:
        enable_gradient_checkpointing(unet)
    unet.train()
    rapm = RAPM(teacher, disc, coarse_timesteps(n), delta_timesteps(n, m), cfg)
    c, side = unet.config.in_channels, unet.config.sample_size
    cond = {"prompt_embeds": torch.randn(1, 77, unet.config.cross_attention_dim)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond.update(pooled_embeds=torch.randn(1, pooled), add_time_ids=torch.randn(1, 6))
    batch = Batch(torch.randn(1, n + 1, c, side, side), torch.randn(1, n, c, side, side), Conditioning(**cond), [0])
    noise = rapm.draw_noise(0, 0, 1, (c, side, side))
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        rapm.discriminator_loss(batch, noise)["loss"].backward()
        d = len(calls)
        rapm.generator_backward(batch, noise)
        g = len(calls) - d
    finally:
        handle.remove()
    return {"d": d, "g": g}


def test_unet_calls_equal_what_the_objective_makes(table, request):
    counted = {}
    for name, (fixture, checkpointing, kind) in UPDATE_ROWS.items():
        key = (fixture, checkpointing)
        if key not in counted:
            counted[key] = _counted_calls(request.getfixturevalue(fixture), checkpointing)
        assert int(table[1][name]["UNet calls"]) == counted[key][kind], (name, counted[key])
    assert all(v["g"] > 0 and v["d"] > 0 for v in counted.values())


def test_trajectory_and_sampling_calls_follow_from_the_grids(table):
    from rapm.config import validate
    from rapm.schedule import fine_timesteps

    t = validate({"trajectories": {}}, partial=True)["trajectories"]
    guided_steps = len(fine_timesteps(t["num_steps"], t["steps_per_slot"])) - 1  # no evaluation at the final time
    for name in TRAJECTORY_ROWS:
        assert int(table[1][name]["UNet calls"]) == guided_steps, table[1][name]
    for name in SAMPLING_ROWS:
        assert int(table[1][name]["UNet calls"]) == t["num_steps"], table[1][name]


def test_bf16_against_fp32_differences_are_finite_and_small(table):
    result = table[1]["bf16 vs fp32 G step"]["result"]
    match = re.search(r"loss rel diff (\S+); grad rel diff (\S+)", result)
    assert match, result
    for value in map(float, match.groups()):
        assert math.isfinite(value) and 0 < value < 0.1, result  # > 0: the bf16 pass really ran in bf16


def test_fp16_teacher_stays_finite_for_20_iterations(table):
    result = table[1]["fp16 teacher training"]["result"]
    match = re.search(r"(\d+)/(\d+) finite iterations", result)
    assert match, result
    finite, total = map(int, match.groups())
    assert total >= 20 and finite >= 20, result
