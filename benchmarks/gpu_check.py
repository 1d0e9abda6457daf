"""GPU check of RAPM at the SD1.5 / SDXL shapes with random weights: speed, memory and numerics in ONE Markdown table.

    bash benchmarks/gpu_check.sh                                         # a GPU: every row, < 8 min on one H100/H200
    python benchmarks/gpu_check.py --device cpu --tiny --out check.md    # CPU smoke run at tiny shapes (< 1 min)

Rows (docs/results/gpu.md says what each one is for):

- ``D update`` / ``G update``: one discriminator / student update of RAPM as rapm.train makes it (the iteration's
  noise, rapm.objective.RAPM's loss and backward, gradient clipping, AdamW), batch 1, N = 4, bf16 autocast. SDXL at
  1024 px (128×128 latents) with gradient checkpointing (rapm.lora.enable_gradient_checkpointing); SD1.5 at 512 px
  (64×64) with and without it. Median seconds per update after warm-up, peak GPU memory
  (torch.cuda.max_memory_allocated, weights included), UNet calls per update (a forward pre-hook on the UNet).
- ``trajectories``: rapm.trajectories.run_batch (text encoding, guided DDIM on the fine grid, the kept states
  copied to the CPU) at the config's N, M, w and batch size: trajectories/s and hours for 1,000 trajectories.
- ``4-step sampling``: rapm.sample.generate (the diffusers pipeline: text encoders, 4 UNet steps at guidance 1,
  VAE decode): images/s and hours for 30,000 images.
- ``bf16 vs fp32 G step``: one G step's loss and flattened LoRA gradient with bf16 autocast against float32 (TF32
  off), same weights and inputs: relative differences.
- ``fp16 teacher training``: float16 UNet weights, float32 LoRA and heads, 20 iterations of the alternate schedule;
  the number of iterations whose loss, gradient norm and updated weights are all finite.
- ``config dtypes``: one D and one G update with the teacher.dtype and train.mixed_precision of config/sd15.yaml and
  config/sdxl.yaml, to show the profiles' combination runs.

Every row is wrapped: a failure (out of memory, an unsupported dtype) becomes an error cell and the check goes on;
a row that would start after ``--budget-s`` is skipped; the table is rewritten after every row, so a run killed
by its timeout still leaves the rows it finished. Weights are random (no downloads), so the numbers say
nothing about image quality, only about cost and numerical health.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rapm.benchmarking import (
    CallCounter,
    device_name,
    exact_float32,
    free_memory,
    peak_memory_bytes,
    random_batch,
    random_teacher,
    rapm_setup,
    relative_difference,
    reset_peak_memory,
    timed,
    unet_teacher,
    update,
)

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"sd15": "SD1.5", "sdxl": "SDXL"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = ("row", "shape", "settings", "median s", "rate", "peak GPU memory", "UNet calls", "result")
FP16_ITERATIONS = 20
SAMPLES_PER_ROW = 30_000  # images per table row (method.md §6)
TRAJECTORIES = 1_000  # J of the paper


@dataclass
class Row:
    """One table row; ``seconds`` is the median per unit (update, trajectory batch, sampling batch)."""

    name: str
    shape: str = ""
    settings: str = ""
    seconds: float | None = None
    rate: str = ""
    peak_bytes: int | None = None
    calls: str = ""
    result: str = ""
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, name: str, err: BaseException | str, **kw) -> Row:
        text = err if isinstance(err, str) else f"error: {type(err).__name__}: {err}"
        return cls(name, error=" ".join(str(text).split())[:240], **kw)


def update_row_name(model: str, kind: str, checkpointing: bool) -> str:
    return f"{LABELS[model]} {kind.upper()} update, {'checkpointing' if checkpointing else 'no checkpointing'}"


# --- the check --------------------------------------------------------------------------------------


class Check:
    """Settings, the rows measured so far, and where they go."""

    def __init__(self, args: argparse.Namespace):
        from rapm.config import validate

        self.args, self.tiny = args, args.tiny
        self.device = torch.device(args.device)
        self.on_gpu = self.device.type == "cuda"
        self.weights_dtype = DTYPES[args.weights_dtype]
        self.pipeline_dtype = DTYPES[args.pipeline_dtype or ("float16" if self.on_gpu else "float32")]
        self.repeats = args.repeats or (2 if args.tiny else 5)
        self.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
        defaults = validate({"trajectories": {}, "train": {}}, partial=True)
        self.traj_cfg, self.train_cfg = defaults["trajectories"], defaults["train"]
        self.num_steps, self.steps_per_slot = int(self.traj_cfg["num_steps"]), int(self.traj_cfg["steps_per_slot"])
        self.budget_s = args.budget_s if args.budget_s is not None else (420.0 if self.on_gpu else math.inf)
        self.start = time.monotonic()
        self.rows: dict[str, Row] = {}
        self.order: list[str] = []
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def shape(self, teacher) -> str:
        c, h, w = teacher.latent_shape()
        return f"{'tiny ' if self.tiny else ''}{LABELS[teacher.type]} {teacher.resolution} px ({c}×{h}×{w})"

    def peak_cell(self, row: Row) -> str:
        if not self.on_gpu:
            return "n/a (CPU)"
        return "–" if row.peak_bytes is None else f"{row.peak_bytes / 2**30:.2f} GiB"

    def record(self, rows: list[Row]) -> None:
        for row in rows:
            self.rows[row.name] = row
            print(
                f"[{self.elapsed():6.1f} s] {row.name}: {row.error or f'{row.seconds} s; {row.result}'}",
                file=sys.stderr,
                flush=True,
            )
        self.write()

    def header(self) -> list[str]:
        cuda = f", CUDA {torch.version.cuda}" if self.on_gpu else ""
        lines = [
            f"**RAPM GPU check** on {device_name(self.device)}, torch {torch.__version__}{cuda}, {self.date}, "
            f"random weights (no downloads)",
            "",
        ]
        if self.tiny or not self.on_gpu:
            lines += [
                "**CPU smoke run at tiny shapes: it checks that every row runs, and says nothing about GPU "
                "speed or memory.**"
                if self.tiny
                else "**Full shapes on the CPU: not a GPU measurement.**",
                "",
            ]
        return lines

    def table(self) -> str:
        lines = self.header()
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for name in self.order:
            row = self.rows.get(name)
            if row is None:
                continue
            if row.error:
                cells = [row.name, row.shape, row.settings, "error", "error", self.peak_cell(row), "–", row.error]
            else:
                seconds = "–" if row.seconds is None else f"{row.seconds:.4g}"
                cells = [
                    row.name,
                    row.shape,
                    row.settings,
                    seconds,
                    row.rate or "–",
                    self.peak_cell(row),
                    row.calls or "–",
                    row.result,
                ]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines += [
            "",
            f"Total {self.elapsed():.0f} s. Median s: per update (D/G rows), per batch (trajectories, "
            f"sampling); UNet calls: per update, or per batch of the row's B.",
        ]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.args.out:
            path = Path(self.args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.table(), encoding="utf-8")
        if self.args.json:
            data = {
                "device": device_name(self.device),
                "torch": torch.__version__,
                "date": self.date,
                "tiny": self.tiny,
                "rows": [asdict(self.rows[n]) for n in self.order if n in self.rows],
            }
            Path(self.args.json).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# --- RAPM updates -------------------------------------------------------------------------------------


def measure_update(check: Check, setup, kind: str, name: str, shape: str, settings: str) -> Row:
    """Median seconds, peak memory and UNet calls of ``kind`` updates after warm-up."""
    device = check.device
    batch = random_batch(setup.teacher, setup.num_steps, 1, seed=1)
    with CallCounter(setup.unet) as calls:
        for i in range(check.warmup):
            update(setup, kind, batch, i)
        reset_peak_memory(device)
        times, counts, losses = [], [], []
        for i in range(check.repeats):
            calls.take()
            seconds, out = timed(lambda: update(setup, kind, batch, check.warmup + i), device)
            times.append(seconds)
            counts.append(calls.take())
            losses.append(out["loss"])
    med = statistics.median(times)
    finite = all(math.isfinite(x) for x in losses)
    result = f"median of {check.repeats} after {check.warmup} warm-up" + ("" if finite else "; NON-FINITE LOSS")
    return Row(
        name,
        shape,
        settings,
        med,
        f"{1 / med:.3g} updates/s",
        peak_memory_bytes(device),
        "/".join(str(c) for c in sorted(set(counts))),
        result,
        data={"times_s": times, "unet_calls": counts, "losses": losses},
    )


def update_rows(check: Check, model: str, checkpointing: bool) -> list[Row]:
    """The D and G rows of one model and checkpointing setting (each wrapped on its own)."""
    names = [update_row_name(model, kind, checkpointing) for kind in ("d", "g")]
    teacher = unet_teacher(model, tiny=check.tiny, device=check.device, dtype=check.weights_dtype)
    setup = rapm_setup(
        teacher,
        {"mixed_precision": "bf16", "gradient_checkpointing": checkpointing},
        num_steps=check.num_steps,
        steps_per_slot=check.steps_per_slot,
    )
    shape = check.shape(teacher)
    settings = (
        f"B=1, N={check.num_steps}, bf16 autocast, {check.args.weights_dtype} UNet weights, "
        f"checkpointing {'on' if checkpointing else 'off'}"
    )
    rows = []
    for kind, name in zip(("d", "g"), names):
        try:
            rows.append(measure_update(check, setup, kind, name, shape, settings))
        except Exception as err:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            rows.append(Row.failed(name, err, shape=shape, settings=settings))
            free_memory(check.device)
    d, g = rows
    if d.error is None and g.error is None:
        iterations = int(check.train_cfg["iterations"])
        hours = (d.seconds + g.seconds) / 2 * iterations / 3600  # schedule "alternate": one update per iteration
        g.result += f"; {iterations:,} iterations (alternate D/G): {hours:.2f} h"
    return rows


# --- trajectories and sampling --------------------------------------------------------------------------


def median_batch_seconds(check: Check, teacher, fn: Callable[[], Any], repeats: int) -> tuple[float, int, list[float]]:
    """Median seconds of ``fn`` and its UNet calls, peak memory window reset first."""
    reset_peak_memory(check.device)
    times, counts = [], []
    with CallCounter(teacher.unet) as calls:
        for _ in range(repeats):
            calls.take()
            times.append(timed(fn, check.device)[0])
            counts.append(calls.take())
    return statistics.median(times), counts[-1], times


def trajectory_row(check: Check, teacher, name: str) -> Row:
    """Teacher trajectories through rapm.trajectories.run_batch at the config's grid and batch size."""
    from rapm.trajectories import run_batch

    t = check.traj_cfg
    B = check.args.traj_batch or (2 if check.tiny else int(t["batch_size"]))
    attrs = {
        "num_steps": check.num_steps,
        "steps_per_slot": check.steps_per_slot,
        "guidance": float(t["guidance"]),
        "resolution": None,
        "latent_shape": list(teacher.latent_shape()),
    }
    prompts, seeds = [f"a photograph of object number {j}" for j in range(B)], list(range(B))
    run_batch(teacher, prompts, seeds, {**attrs, "steps_per_slot": 1})  # warm-up on the coarse grid alone
    repeats = check.args.traj_repeats or (2 if check.tiny else 1)
    med, calls, times = median_batch_seconds(check, teacher, lambda: run_batch(teacher, prompts, seeds, attrs), repeats)
    rate = B / med
    settings = (
        f"B={B} ({2 * B} UNet rows), N={check.num_steps}, M={check.steps_per_slot}, CFG w={attrs['guidance']}, "
        f"{str(teacher.dtype).removeprefix('torch.')}"
    )
    return Row(
        name,
        check.shape(teacher),
        settings,
        med,
        f"{rate:.3g} traj/s",
        peak_memory_bytes(check.device),
        str(calls),
        f"{TRAJECTORIES:,} trajectories: {TRAJECTORIES / rate / 3600:.2f} h (median of {repeats})",
        data={"times_s": times, "batch": B},
    )


def sampling_row(check: Check, teacher, name: str) -> Row:
    """N-step sampling through rapm.sample.generate (the pipeline: text encoders, UNet, VAE decode)."""
    from rapm.pipeline import generate

    B = check.args.sample_batch or (2 if check.tiny else 4)
    prompts, seeds = [f"a photograph of object number {j}" for j in range(B)], list(range(B))

    def run():
        return generate(teacher, prompts, seeds, steps=check.num_steps, guidance=1.0)

    run()  # warm-up
    repeats = check.args.sample_repeats or (2 if check.tiny else 3)
    med, calls, times = median_batch_seconds(check, teacher, run, repeats)
    rate = B / med
    settings = (
        f"B={B}, {check.num_steps} DDIM steps, guidance 1, {str(teacher.dtype).removeprefix('torch.')}, VAE decode"
    )
    return Row(
        name,
        check.shape(teacher),
        settings,
        med,
        f"{rate:.3g} images/s",
        peak_memory_bytes(check.device),
        str(calls),
        f"{SAMPLES_PER_ROW:,} images: {SAMPLES_PER_ROW / rate / 3600:.2f} h (median of {repeats})",
        data={"times_s": times, "batch": B},
    )


def pipeline_rows(check: Check, model: str) -> list[Row]:
    """The trajectory and sampling rows of one model, sharing one random pipeline."""
    names = [f"{LABELS[model]} trajectories", f"{LABELS[model]} 4-step sampling"]
    teacher = random_teacher(model, tiny=check.tiny, device=check.device, dtype=check.pipeline_dtype)
    rows = []
    for fn, name in zip((trajectory_row, sampling_row), names):
        try:
            rows.append(fn(check, teacher, name))
        except Exception as err:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            rows.append(Row.failed(name, err, shape=check.shape(teacher)))
            free_memory(check.device)
    return rows


# --- numerics --------------------------------------------------------------------------------------------


def _lora_gradient(setup, objective, batch, noise) -> tuple[float, torch.Tensor]:
    from rapm.lora import lora_parameters

    params = lora_parameters(setup.unet)
    for p in params:
        p.grad = None
    loss = float(objective.generator_backward(batch, noise)["loss"])
    grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in params]
    )
    return loss, grad


def bf16_vs_fp32_row(check: Check, model: str = "sdxl") -> Row:
    """One G step with bf16 autocast against float32 (float32 weights, TF32 off), on the same weights and inputs."""
    from rapm.objective import RAPM

    name = "bf16 vs fp32 G step"
    teacher = unet_teacher(model, tiny=check.tiny, device=check.device, dtype=torch.float32)
    setup = rapm_setup(
        teacher,
        {"mixed_precision": "no", "gradient_checkpointing": True},
        num_steps=check.num_steps,
        steps_per_slot=check.steps_per_slot,
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # lora_B off zero, so lora_A gets a gradient too
        for pname, p in teacher.unet.named_parameters():
            if ".lora_B." in pname:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    bf16 = RAPM(teacher, setup.disc, setup.rapm.coarse_t, setup.rapm.delta_t, {**setup.cfg, "mixed_precision": "bf16"})
    batch = random_batch(teacher, setup.num_steps, 1, seed=2)
    noise = setup.rapm.draw_noise(0, 0, 1, batch.coarse.shape[2:])
    reset_peak_memory(check.device)
    with exact_float32():
        ref_loss, ref_grad = _lora_gradient(setup, setup.rapm, batch, noise)
    loss, grad = _lora_gradient(setup, bf16, batch, noise)
    rel_loss = abs(loss - ref_loss) / abs(ref_loss) if ref_loss else (0.0 if loss == ref_loss else math.inf)
    rel_grad = relative_difference(grad, ref_grad)
    return Row(
        name,
        check.shape(teacher),
        "float32 UNet weights, bf16 autocast vs none (TF32 off), checkpointing on",
        peak_bytes=peak_memory_bytes(check.device),
        result=f"loss rel diff {rel_loss:.2e}; grad rel diff {rel_grad:.2e} (loss {ref_loss:.4g}, "
        f"{grad.numel():,} LoRA weights, lora_B ~ N(0, 0.01²))",
        data={"rel_loss": rel_loss, "rel_grad": rel_grad, "loss_fp32": ref_loss, "loss_bf16": loss},
    )


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finite_iterations(check: Check, setup, iterations: int) -> int:
    """Iterations of the alternate schedule (D on even, G on odd) until the first non-finite loss, gradient
    norm or updated weight; a fresh random batch each iteration."""
    from rapm.lora import lora_parameters

    for i in range(iterations):
        kind = "d" if i % 2 == 0 else "g"
        out = update(setup, kind, random_batch(setup.teacher, setup.num_steps, 1, seed=100 + i), i)
        weights = list(setup.disc.parameters()) if kind == "d" else lora_parameters(setup.unet)
        if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]) and _all_finite(weights)):
            return i
    return iterations


def fp16_row(check: Check, model: str = "sdxl") -> Row:
    """float16 UNet weights with float32 LoRA and heads, fp16 autocast: finite iterations out of 20."""
    name = "fp16 teacher training"
    shape, note, weights = "", "", torch.float16

    def run(dtype):
        teacher = unet_teacher(model, tiny=check.tiny, device=check.device, dtype=dtype)
        setup = rapm_setup(
            teacher,
            {"mixed_precision": "fp16", "gradient_checkpointing": True},
            num_steps=check.num_steps,
            steps_per_slot=check.steps_per_slot,
        )
        return check.shape(teacher), finite_iterations(check, setup, FP16_ITERATIONS)

    reset_peak_memory(check.device)
    try:
        shape, finite = run(weights)
    except RuntimeError as err:
        if check.on_gpu:
            raise
        note = f"; CPU: float16 weights failed ({type(err).__name__}: {str(err)[:80]}), ran float32 weights"
        weights = torch.float32
        free_memory(check.device)
        shape, finite = run(weights)
    dtype = str(weights).removeprefix("torch.")
    return Row(
        name,
        shape,
        f"{dtype} UNet weights, float32 LoRA and heads, fp16 autocast, checkpointing on",
        peak_bytes=peak_memory_bytes(check.device),
        result=f"{finite}/{FP16_ITERATIONS} finite iterations (alternate D/G){note}",
        data={"finite_iterations": finite, "weights": dtype},
    )


def config_dtype_row(check: Check, model: str) -> Row:
    """One D and one G update with the profile's teacher.dtype and train.mixed_precision (config/<model>.yaml)."""
    from rapm.config import read_yaml

    name = f"{LABELS[model]} config dtypes"
    cfg = read_yaml(ROOT / "config" / f"{model}.yaml")
    dtype, mp = cfg["teacher"]["dtype"], cfg["train"]["mixed_precision"]
    ckpt = bool(cfg["train"].get("gradient_checkpointing", False))
    settings = (
        f"config/{model}.yaml: teacher.dtype {dtype}, mixed_precision {mp}, checkpointing {'on' if ckpt else 'off'}"
    )
    teacher = unet_teacher(model, tiny=check.tiny, device=check.device, dtype=DTYPES[dtype])
    shape = check.shape(teacher)
    setup = rapm_setup(
        teacher,
        {"mixed_precision": mp, "gradient_checkpointing": ckpt},
        num_steps=check.num_steps,
        steps_per_slot=check.steps_per_slot,
    )
    batch = random_batch(teacher, setup.num_steps, 1, seed=3)
    reset_peak_memory(check.device)
    try:
        losses = [update(setup, kind, batch, i)["loss"] for i, kind in enumerate(("d", "g"))]
    except Exception as err:  # noqa: BLE001 - the point of the row
        traceback.print_exc()
        return Row.failed(name, err, shape=shape, settings=settings)
    ok = all(math.isfinite(x) for x in losses)
    return Row(
        name,
        shape,
        settings,
        peak_bytes=peak_memory_bytes(check.device),
        result="ok: one D and one G update ran" + ("" if ok else ", NON-FINITE LOSS"),
        data={"losses": losses},
    )


# --- plan and main ---------------------------------------------------------------------------------------


def plan(check: Check) -> list[tuple[str, list[str], Callable[[], list[Row]]]]:
    """(group, row names, runner) in execution order; the table lists the rows in this order."""
    updates = [(m, c) for m, c in (("sdxl", True), ("sd15", True), ("sd15", False))]
    steps: list[tuple[str, list[str], Callable[[], list[Row]]]] = []
    for model, ckpt in updates:
        steps.append(
            (
                "updates",
                [update_row_name(model, k, ckpt) for k in ("d", "g")],
                lambda model=model, ckpt=ckpt: update_rows(check, model, ckpt),
            )
        )
    for model in ("sd15", "sdxl"):
        steps.append(
            (
                "pipeline",
                [f"{LABELS[model]} trajectories", f"{LABELS[model]} 4-step sampling"],
                lambda model=model: pipeline_rows(check, model),
            )
        )
    steps.append(("numerics", ["bf16 vs fp32 G step"], lambda: [bf16_vs_fp32_row(check)]))
    steps.append(("numerics", ["fp16 teacher training"], lambda: [fp16_row(check)]))
    for model in ("sd15", "sdxl"):
        steps.append(
            ("numerics", [f"{LABELS[model]} config dtypes"], lambda model=model: [config_dtype_row(check, model)])
        )
    return steps


def table_order(steps) -> list[str]:
    """Rows grouped as the table shows them: updates, trajectories, sampling, numerics."""
    names = [n for _, group, _ in steps for n in group]
    key = {n: (0 if "update" in n else 1 if "trajector" in n else 2 if "sampling" in n else 3) for n in names}
    return sorted(names, key=lambda n: key[n])  # stable: execution order within a group


def run(check: Check) -> dict[str, Row]:
    """Every row of the plan, each wrapped; returns the rows by name."""
    steps = [s for s in plan(check) if not check.args.only or s[0] in check.args.only]
    check.order = table_order(steps)
    for _, names, runner in steps:
        if check.elapsed() > check.budget_s:
            rows = [Row.failed(n, f"skipped: the time budget of {check.budget_s:.0f} s was spent") for n in names]
        else:
            try:
                rows = runner()
            except Exception as err:  # noqa: BLE001 - one failing row must not stop the check
                traceback.print_exc()
                rows = [Row.failed(n, err) for n in names]
        free_memory(check.device)
        check.record(rows)
    return check.rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny SD-shaped models and 2 repeats: a CPU smoke run")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file (rewritten after each row)")
    p.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    p.add_argument("--repeats", type=int, default=None, help="measured updates per row (default 5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up updates per row (default 2; --tiny 1)")
    p.add_argument("--weights-dtype", default="bfloat16", choices=sorted(DTYPES), help="UNet weights of the D/G rows")
    p.add_argument(
        "--pipeline-dtype",
        default=None,
        choices=sorted(DTYPES),
        help="trajectory and sampling pipelines (default float16 on a GPU, float32 on the CPU)",
    )
    p.add_argument(
        "--traj-batch", type=int, default=None, help="trajectories per batch (default: the config's; --tiny 2)"
    )
    p.add_argument("--traj-repeats", type=int, default=None, help="measured trajectory batches (default 1; --tiny 2)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (default 4; --tiny 2)")
    p.add_argument("--sample-repeats", type=int, default=None, help="measured sampling batches (default 3; --tiny 2)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no row after this many seconds (default 420 on a GPU, none on the CPU)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["updates", "pipeline", "numerics"],
        default=None,
        help="run only these groups of rows",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here (use --device cpu --tiny for the CPU smoke run)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check, print the table (and write it to ``--out``); 0 even when rows failed (they say so)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check = Check(args)
        run(check)
        print(check.table(), end="")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
