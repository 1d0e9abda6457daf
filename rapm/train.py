"""RAPM training (``python -m rapm train``): the loop, its state, its outputs.

The losses and gradients of one iteration are :class:`rapm.objective.RAPM`; this module runs them:

    for i in step … iterations − 1:
        1. batch   B trajectories picked by a generator seeded with (seed, i); τ and ε drawn likewise
        2. update  D on even i, G on odd i (``schedule: alternate``, DEFAULT), or D then G every i
        3. check   every loss term finite, else stop (TrainingError names the step and term)
        4. clip    gradient norm ≤ ``optim.grad_clip``, AdamW step; the weights it updated must be finite
                   (one fused check per update, else TrainingError naming the tensor and the iteration)
        5. log     one JSON line per iteration (per-term losses) in ``losses.jsonl``
        6. save    atomically every ``checkpoint_every`` iterations; a validation grid every ``validate_every``

State (``--state-dir``, outside the rule's declared outputs, which Snakemake deletes before a job):
``checkpoint.safetensors`` (LoRA, discriminator heads, both AdamW states; step and config in the
metadata), ``losses.jsonl``, ``validation/step_XXXXXX.png`` and ``snapshots/lora_XXXXXX.safetensors``.
All randomness of iteration i derives from (seed, i), so running the same command again resumes
where the last checkpoint left off and ends bitwise identical (on CPU) to an uninterrupted run. A torn
last line of ``losses.jsonl`` (a kill during a write) is dropped on resume.

Every safetensors file (checkpoint, snapshots, the LoRA) is written by :func:`rapm.io.save_safetensors`:
byte-reproducible (two identical runs give the same sha256), atomic, mode from the umask, and refused
(TrainingError naming the tensor and the iteration; nothing written) when a tensor is not finite
after the cast to its stored dtype (e.g. a float32 weight beyond float16's range with
``export_dtype: float16``).

Outputs (``--out-dir``): ``lora.safetensors`` (diffusers ``load_lora_weights`` + ``fuse_lora``, alpha
folded in, the resolved config in its metadata), ``summary.json``, ``losses.jsonl``, ``validation.png``,
``snapshots.json`` (the LoRA snapshots in the state directory, for :mod:`rapm.curves`). The summary
records the sha256 of ``lora.safetensors`` (``sha256``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rapm.cliargs import add_config_args, stage_config
from rapm.config import ConfigError
from rapm.errors import RapmError
from rapm.io import NonFiniteTensorError, load_optimizer_tensors, optimizer_tensors, save_safetensors
from rapm.progress import Progress

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LOSS_TERMS = ("d_rel", "d_abs", "g_rel", "g_abs", "reg")


class TrainingError(RapmError):
    """Training cannot go on (a non-finite loss, a checkpoint of another run)."""


# --- small helpers ------------------------------------------------------------------------------


def iteration_indices(seed: int, iteration: int, num_trajectories: int, batch_size: int) -> list[int]:
    """The trajectories of iteration i: uniform draws by a generator seeded with (seed, i)."""
    rng = np.random.default_rng([seed, iteration, 0])
    return rng.integers(0, num_trajectories, size=batch_size).tolist()


def update_kinds(schedule: str, iteration: int) -> tuple[str, ...]:
    """Which updates iteration i makes: ``alternate`` (D on even, G on odd) or ``d_then_g`` (both)."""
    if schedule == "alternate":
        return ("d",) if iteration % 2 == 0 else ("g",)
    if schedule == "d_then_g":
        return ("d", "g")
    raise ValueError(f"unknown train.schedule {schedule!r}; choose alternate or d_then_g")


def _json_line(record: Mapping) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of iterations before ``step`` (a resumed run rewrites the rest).

    A torn last line (no newline at its end and not valid JSON: the process was killed while writing
    it) is dropped with a warning; any other unreadable line is a TrainingError naming the file and line.
    """
    if not path.is_file():
        return
    from rapm.io import atomic_path

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            if number == len(lines) and not line.endswith("\n"):
                log.warning(
                    "%s: dropping the torn last line %d (%d bytes; a write was interrupted)",
                    path,
                    number,
                    len(line.encode("utf-8")),
                )
                continue
            raise TrainingError(
                f"{path}, line {number}: not a loss-log record ({type(err).__name__}: {err}); "
                f"repair or delete the line (or delete {path.parent} to start again)"
            ) from err
        if record_step < step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


class _EvalCounter:
    """Counts UNet forward calls and rows (a forward pre-hook), for "UNet evaluations per iteration"."""

    def __init__(self, unet):
        self.calls = self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0]) if args else 0

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.rows)
        self.calls = self.rows = 0
        return out


# --- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Everything a RAPM run holds: teacher UNet + LoRA, heads, optimisers, data, and where to write."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        trajectories: str | Path,
        state_dir: str | Path,
        subset: list[int] | None = None,
        prompts: str | Path | None = None,
        threads: int | None = None,
    ):
        from rapm.discriminator import Discriminator
        from rapm.lora import _student_params, add_student_lora, enable_gradient_checkpointing, lora_parameters
        from rapm.objective import RAPM, optimizers
        from rapm.store import TrajectoryDataset
        from rapm.teacher import load_teacher

        self.cfg = cfg
        self.tcfg = tcfg = cfg["train"]
        self.state_dir = Path(state_dir)
        threads = threads or tcfg.get("num_threads")  # --threads (the rule's threads:) wins over the config
        if threads:
            torch.set_num_threads(int(threads))
        # inputs first: a missing or ungathered store, or a missing prompt file, fails before the teacher
        # (seconds on the toy, minutes for SDXL) is loaded; the full check against the teacher follows
        TrajectoryDataset(trajectories, verify=False)
        if prompts is not None and not Path(prompts).is_file():
            raise TrainingError(f"{prompts}: not found (the data stage's train.csv, rule make_prompt_sets)")
        self.teacher = load_teacher(cfg["teacher"])
        if tcfg["mixed_precision"] != "no" and self.teacher.device.type != "cuda":
            raise TrainingError(
                f"train.mixed_precision {tcfg['mixed_precision']!r} needs a CUDA device; "
                f"the teacher is on {self.teacher.device} (set it to 'no' on the CPU)"
            )
        # the store must match this teacher (weights hash), grid and prompt set (cfg["prompts"] / the
        # ``prompts`` train.csv, when given): checked before the LoRA changes the UNet
        self.dataset = TrajectoryDataset.from_config(trajectories, cfg, self.teacher, prompts=prompts)
        # the trajectories this run trains on: all, or an MSD student's group (indices into the store)
        self.subset = list(range(len(self.dataset))) if subset is None else [int(j) for j in subset]
        if not self.subset or not all(0 <= j < len(self.dataset) for j in self.subset):
            raise TrainingError(f"trajectory subset must be non-empty indices in [0, {len(self.dataset)})")
        unet = self.teacher.unet
        with torch.random.fork_rng(devices=[]):  # the initial lora_A and heads depend on train.seed only
            torch.manual_seed(int(tcfg["seed"]))
            add_student_lora(unet, tcfg["lora"])
            self.disc = Discriminator(unet, tcfg["discriminator"]).to(self.teacher.device)
        if tcfg["gradient_checkpointing"]:
            enable_gradient_checkpointing(unet)
        unet.train()  # no dropout in SD UNets; train() only matters for checkpointing
        self.rapm = RAPM(self.teacher, self.disc, self.dataset.coarse_timesteps, self.dataset.delta_timesteps, tcfg)
        o = tcfg["optim"]
        self.opt_g, self.opt_d = optimizers(o, lora_parameters(unet), self.disc.parameters())
        # (name, parameter) updated by each optimiser, same order as its param group: checked after every step
        self._named_g = [(f"lora.{k}", p) for k, p in _student_params(unet).items()]
        self._named_d = [(f"heads.{k}", p) for k, p in self.disc.named_parameters()]
        # the moving average of the student LoRA (train.ema_decay > 0): what export, snapshots and validation use
        self.ema_decay = float(tcfg["ema_decay"])
        self._ema = [p.detach().clone() for _, p in self._named_g] if self.ema_decay > 0 else None
        self.counter = _EvalCounter(unet)
        self.step = 0

    # --- state ----------------------------------------------------------------------------------

    def _config_json(self) -> str:
        resolved = {k: self.cfg[k] for k in ("teacher", "trajectories", "train")}
        if len(self.subset) != len(self.dataset):
            resolved["subset"] = self.subset
        return json.dumps(resolved, sort_keys=True)

    def save_checkpoint(self) -> Path:
        from rapm.lora import lora_state_dict

        tensors = {f"lora.{k}": v.cpu().contiguous() for k, v in lora_state_dict(self.teacher.unet).items()}
        tensors.update({f"heads.{k}": v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()})
        if self._ema is not None:
            tensors.update({f"ema.{name[5:]}": e.cpu().contiguous() for (name, _), e in zip(self._named_g, self._ema)})
        tensors.update(optimizer_tensors("opt_g", self.opt_g))
        tensors.update(optimizer_tensors("opt_d", self.opt_d))
        path = self.state_dir / CHECKPOINT
        try:
            save_safetensors(
                tensors, path, {"step": str(self.step), "config": self._config_json()}, require_finite=True
            )
        except NonFiniteTensorError as err:
            raise TrainingError(
                f"checkpoint after {self.step} iterations: {err}; the last good checkpoint is kept. "
                "Lower train.optim learning rates"
            ) from err
        return path

    def load_checkpoint(self) -> bool:
        """Resume from the state directory's checkpoint, if any; it must come from the same config."""
        from safetensors import safe_open

        from rapm.lora import load_lora_state_dict

        path = self.state_dir / CHECKPOINT
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("config") != self._config_json():
            raise TrainingError(
                f"{path}: checkpoint of a different configuration (teacher, trajectories or train "
                f"settings changed); delete {self.state_dir} to start again"
            )
        device = self.teacher.device
        load_lora_state_dict(
            self.teacher.unet, {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("lora.")}
        )
        self.disc.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
        load_optimizer_tensors("opt_g", self.opt_g, {k: v.to(device) for k, v in tensors.items()})
        load_optimizer_tensors("opt_d", self.opt_d, {k: v.to(device) for k, v in tensors.items()})
        if self._ema is not None:
            with torch.no_grad():
                for (name, _), e in zip(self._named_g, self._ema):
                    e.copy_(tensors[f"ema.{name[5:]}"])
        self.step = int(meta["step"])
        return True

    # --- one iteration ----------------------------------------------------------------------------

    def _check_finite(self, losses: Mapping[str, torch.Tensor], kind: str) -> None:
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                raise TrainingError(
                    f"non-finite {kind} loss at iteration {self.step}: term {name!r} = {float(value.detach())}; the last "
                    f"good checkpoint ({self.state_dir / CHECKPOINT}, if any) is kept. Lower train.optim "
                    "learning rates or switch train.mixed_precision to bf16/no"
                )

    def _check_weights(self, named: list[tuple[str, torch.Tensor]], kind: str) -> None:
        """The weights an update touched are finite: one fused check; the offender is looked up only on failure."""
        with torch.no_grad():
            if bool(torch.isfinite(torch.cat([p.reshape(-1) for _, p in named])).all()):
                return
            for name, p in named:
                if not bool(torch.isfinite(p).all()):
                    raise TrainingError(
                        f"non-finite {kind} weights after the update of iteration {self.step}: tensor {name!r} holds "
                        f"{int(torch.isnan(p).sum())} NaN and {int(torch.isinf(p).sum())} ±inf of {p.numel()} values; "
                        f"the last good checkpoint ({self.state_dir / CHECKPOINT}, if any) is kept. Lower train.optim "
                        "learning rates"
                    )

    def _clip_and_step(self, opt: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], kind: str) -> float:
        params = [p for _, p in named]
        norm = torch.nn.utils.clip_grad_norm_(params, float(self.tcfg["optim"]["grad_clip"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._check_weights(named, kind)
        return float(norm)

    def student_lr(self) -> float:
        """The student's learning rate at iteration ``self.step`` (``train.optim.student_lr_schedule``)."""
        o = self.tcfg["optim"]
        lr = float(o["student_lr"])
        if o["student_lr_schedule"] == "cosine":
            lr *= 0.5 * (1.0 + math.cos(math.pi * self.step / int(self.tcfg["iterations"])))
        return lr

    def _update_ema(self) -> None:
        if self._ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self._ema, [p for _, p in self._named_g], 1.0 - self.ema_decay)

    @contextlib.contextmanager
    def averaged_student(self):
        """The student LoRA holds its moving average inside (train.ema_decay > 0; else nothing changes)."""
        if self._ema is None:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for _, p in self._named_g]
            for (_, p), e in zip(self._named_g, self._ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), r in zip(self._named_g, raw):
                    p.copy_(r)

    def batch(self, indices: list[int]):
        """The trajectories ``indices`` as a :class:`rapm.objective.Batch` on the device; with
        ``sabotage: [shuffle_prompts]`` each one carries the conditioning of the next trajectory."""
        from rapm.objective import load_batch

        batch = load_batch(self.dataset, indices, self.teacher.device)
        if "shuffle_prompts" in (self.tcfg.get("sabotage") or []):
            others = [(j + 1) % len(self.dataset) for j in indices]
            batch.cond = load_batch(self.dataset, others, self.teacher.device).cond
        return batch

    def run_iteration(self) -> dict[str, Any]:
        """Iteration ``self.step``: the updates of the schedule; returns its log record."""
        i, tcfg = self.step, self.tcfg
        seed, bs = int(tcfg["seed"]), int(tcfg["batch_size"])
        indices = [self.subset[k] for k in iteration_indices(seed, i, len(self.subset), bs)]
        batch = self.batch(indices)
        noise = self.rapm.draw_noise(seed, i, bs, batch.coarse.shape[2:])
        record: dict[str, Any] = {"step": i, "trajectories": indices}
        for kind in update_kinds(tcfg["schedule"], i):
            if kind == "d":
                self.opt_d.zero_grad(set_to_none=True)
                losses = self.rapm.discriminator_loss(batch, noise)
                self._check_finite(losses, "discriminator")
                if losses["loss"].requires_grad:
                    losses["loss"].backward()
                    record["d_grad_norm"] = self._clip_and_step(self.opt_d, self._named_d, "discriminator")
            else:
                self.opt_g.zero_grad(set_to_none=True)
                losses = self.rapm.generator_backward(batch, noise)
                self._check_finite(losses, "student")
                for group in self.opt_g.param_groups:
                    group["lr"] = self.student_lr()
                record["g_grad_norm"] = self._clip_and_step(self.opt_g, self._named_g, "student")
                self._update_ema()
            for name, value in losses.items():
                if name != "loss":
                    record[name] = float(value.detach())
            record[f"{kind}_unet_calls"], record[f"{kind}_unet_rows"] = self.counter.take()
        return record

    # --- validation, export -----------------------------------------------------------------------

    @torch.no_grad()
    def validation_images(self, num: int) -> tuple[np.ndarray, list[str]]:
        """The student's N-step samples from the stored noise of trajectories 0..num-1 (uint8 images)."""
        from rapm.objective import load_batch
        from rapm.teacher import decode_latents

        batch = load_batch(self.dataset, self.subset[:num], self.teacher.device)
        with self.averaged_student():
            latents = self.rapm.sample(batch.coarse[:, 0], batch.cond)
        images = decode_latents(self.teacher, latents).permute(0, 2, 3, 1).cpu().numpy()
        self.counter.take()
        return (images * 255).round().astype(np.uint8), [self.dataset[j]["prompt"] for j in batch.indices]

    def write_validation(self) -> Path:
        from rapm.images import captioned_grid

        images, prompts = self.validation_images(int(self.tcfg["validation_images"]))
        return captioned_grid(images, prompts, self.state_dir / "validation" / f"step_{self.step:06d}.png")

    def export(self, path: str | Path) -> int:
        from rapm.lora import export_lora

        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            self.tcfg["export_dtype"]
        ]
        try:
            with self.averaged_student():
                return export_lora(
                    self.teacher.unet,
                    path,
                    self.tcfg["lora"],
                    {"rapm.config": self._config_json(), "rapm.step": str(self.step)},
                    dtype=dtype,
                )
        except NonFiniteTensorError as err:
            raise TrainingError(
                f"the LoRA after {self.step} iterations is not finite in train.export_dtype {self.tcfg['export_dtype']}: "
                f"{err}. Lower train.optim.student_lr (or export float32)"
            ) from err


# --- entry point ---------------------------------------------------------------------------------


def train(
    cfg: Mapping[str, Any],
    trajectories: str | Path,
    out_dir: str | Path,
    state_dir: str | Path,
    max_iterations: int | None = None,
    subset: list[int] | None = None,
    name: str | None = None,
    prompts: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) RAPM from ``cfg`` (sections teacher, trajectories, train) on a gathered store.

    Writes the outputs to ``out_dir`` when all ``train.iterations`` are done and returns the summary;
    with ``max_iterations`` it stops after that many iterations of this invocation (checkpointed) and
    returns None, so a rerun resumes. ``subset``: train on these trajectory indices only (an MSD
    student's group); ``name``: the run's name in the summary (default: the out_dir's name); ``prompts``:
    the data stage's train.csv, which the store must have been computed from (hash and, with
    ``trajectories.num_trajectories: null``, row count checked; see ``TrajectoryDataset.from_config``);
    ``threads``: torch CPU threads, the one source when given (the CLI's ``--threads``, which the
    workflow sets from the rule's ``threads:``); else ``train.num_threads``; else torch's default.
    """
    from rapm.io import write_json, write_summary

    t0 = time.time()
    tcfg = cfg["train"]
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, trajectories, state_dir, subset, prompts=prompts, threads=threads)
    log_path = state_dir / "losses.jsonl"
    resumed = trainer.load_checkpoint()
    _truncate_log(log_path, trainer.step)
    if resumed:
        log.info("resuming at iteration %d from %s", trainer.step, state_dir / CHECKPOINT)
    total = int(tcfg["iterations"])
    every = {k: int(tcfg[k]) for k in ("checkpoint_every", "validate_every", "log_every")}
    snapshot_every = tcfg.get("snapshot_every")
    stop = total if max_iterations is None else min(total, trainer.step + int(max_iterations))
    if trainer.teacher.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bar = Progress(total, f"train {name or out_dir.name}", initial=trainer.step)
    recent: list[dict] = []
    with log_path.open("a") as log_file:
        if trainer.step == 0 and every["validate_every"]:
            trainer.write_validation()
        while trainer.step < stop:
            t_it = time.time()
            record = trainer.run_iteration()
            record["seconds"] = round(time.time() - t_it, 4)
            log_file.write(_json_line(record))
            recent.append(record)
            trainer.step += 1
            bar.update(1)
            if trainer.step % every["log_every"] == 0 or trainer.step == stop:
                means = {
                    t: np.mean([r[t] for r in recent if t in r]) for t in LOSS_TERMS if any(t in r for r in recent)
                }
                bar.note = ", ".join(f"{k} {v:.3f}" for k, v in means.items())
                log.info(
                    "iteration %d/%d: %s", trainer.step, total, ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                )
                recent = []
            if snapshot_every and trainer.step % int(snapshot_every) == 0:
                trainer.export(state_dir / "snapshots" / f"lora_{trainer.step:06d}.safetensors")
            if every["validate_every"] and trainer.step % every["validate_every"] == 0:
                trainer.write_validation()
            if trainer.step % every["checkpoint_every"] == 0 or trainer.step == stop:
                log_file.flush()
                os.fsync(log_file.fileno())
                trainer.save_checkpoint()
    if trainer.step < total:
        log.info("stopped at iteration %d of %d; run the same command again to resume", trainer.step, total)
        return None

    out_dir.mkdir(parents=True, exist_ok=True)
    n_modules = trainer.export(out_dir / "lora.safetensors")
    grid = trainer.write_validation()
    shutil.copyfile(grid, out_dir / "validation.png")
    shutil.copyfile(log_path, out_dir / "losses.jsonl")
    snapshots = sorted((state_dir / "snapshots").glob("lora_*.safetensors"))
    write_json(
        out_dir / "snapshots.json",
        {
            "snapshots": [
                {"iteration": int(f.stem.split("_")[1]), "lora": str(f)}
                for f in snapshots
                if int(f.stem.split("_")[1]) <= total
            ]
        },
    )
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    per_kind = {}
    for kind in ("d", "g"):
        calls = [r[f"{kind}_unet_calls"] for r in records if f"{kind}_unet_calls" in r]
        rows = [r[f"{kind}_unet_rows"] for r in records if f"{kind}_unet_rows" in r]
        if calls:
            per_kind[kind] = {
                "iterations": len(calls),
                "unet_calls": float(np.mean(calls)),
                "unet_rows": float(np.mean(rows)),
            }
    device = trainer.teacher.device
    summary = {
        "name": name or out_dir.name,  # the variant (results/train/<variant>/)
        "trajectory_key": Path(trajectories).name,
        "iterations": total,
        "wall_time_s": round(time.time() - t0, 1),  # this invocation (a resumed run counts from its restart)
        "train_seconds_logged": round(float(sum(r["seconds"] for r in records)), 1),  # all invocations
        "seconds_per_iteration": float(np.mean([r["seconds"] for r in records])) if records else None,
        "unet_evaluations_per_update": per_kind,
        "device": str(device),
        "threads": torch.get_num_threads(),  # torch CPU threads the run used
        "lora_modules": n_modules,
        "lora_bytes": (out_dir / "lora.safetensors").stat().st_size,
        "num_trajectories": len(trainer.subset),
        "trajectory_store": str(trajectories),
        "final_losses": {
            t: float(np.mean([r[t] for r in records[-100:] if t in r]))
            for t in LOSS_TERMS
            if any(t in r for r in records[-100:])
        },
        "config": {k: cfg[k] for k in ("teacher", "trajectories", "train")},
    }
    summary = write_summary(
        out_dir / "summary.json", "train", summary, outputs=[out_dir / "lora.safetensors"], device=device
    )
    log.info("RAPM done: %d iterations, LoRA with %d modules in %s", total, n_modules, out_dir / "lora.safetensors")
    return summary


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm train`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--trajectories", required=True, help="trajectory directory results/trajectories/<key> (gathered)")
    p.add_argument(
        "--out-dir", required=True, help="where lora.safetensors, summary.json, losses.jsonl, validation.png go"
    )
    p.add_argument(
        "--state-dir",
        required=True,
        help="checkpoints, loss log, validation grids, snapshots; keep it outside declared outputs",
    )
    p.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help="stop after this many iterations of this run (exit code 75, no outputs; rerun to resume)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; given, it wins over train.num_threads (the workflow passes the rule's threads)",
    )
    p.add_argument("--subset-file", default=None, help="groups.json of `rapm msd-partition` (train one MSD student)")
    p.add_argument("--group", type=int, default=None, help="the student's group in --subset-file")
    p.add_argument("--name", default=None, help="the run's name in summary.json (default: the out-dir's name)")
    p.add_argument(
        "--prompts",
        default=None,
        help="train.csv of the data stage: the store must have been computed from it (hash and, with "
        "trajectories.num_trajectories null, row count checked)",
    )


def command(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories", "train")

    subset = None
    if args.subset_file is not None:
        import json
        from pathlib import Path

        groups = json.loads(Path(args.subset_file).read_text())["groups"]
        if args.group is None or not 0 <= args.group < len(groups):
            raise ConfigError(f"--group must be in [0, {len(groups)}) with --subset-file {args.subset_file}")
        subset = groups[args.group]
    summary = train(
        cfg,
        args.trajectories,
        args.out_dir,
        args.state_dir,
        max_iterations=args.max_iterations,
        subset=subset,
        name=args.name,
        prompts=args.prompts,
        threads=args.threads,
    )
    if summary is None:
        print(
            "rapm: training stopped before train.iterations; run the same command again to resume (no outputs written)",
            file=sys.stderr,
        )
        return 75
    return 0
