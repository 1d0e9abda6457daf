"""RAPM training (``python -m rapm train``): the loop around :class:`rapm.trainer.Trainer` and its outputs.

    for i in step … iterations − 1:
        the trainer's iteration i (batch, update, checks: :mod:`rapm.trainer`)
        log     one JSON line per iteration (per-term losses) in ``losses.jsonl``
        save    atomically every ``checkpoint_every`` iterations; a validation grid every
                ``validate_every``; a LoRA snapshot every ``snapshot_every``

State (``--state-dir``, outside the rule's declared outputs, which Snakemake deletes before a job):
``checkpoint.safetensors``, ``losses.jsonl``, ``validation/step_XXXXXX.png`` and
``snapshots/lora_XXXXXX.safetensors``. All randomness of iteration i derives from (seed, i), so
running the same command again resumes where the last checkpoint left off and ends bitwise identical
(on CPU) to an uninterrupted run. A torn last line of ``losses.jsonl`` (a kill during a write) is
dropped on resume.

Outputs (``--out-dir``): ``lora.safetensors`` (diffusers ``load_lora_weights`` + ``fuse_lora``, alpha
folded in, the resolved config in its metadata), ``summary.json``, ``losses.jsonl``, ``validation.png``,
``snapshots.json`` (the LoRA snapshots in the state directory, for :mod:`rapm.curves`). The summary
records the sha256 of ``lora.safetensors`` (``sha256``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rapm.cliargs import add_config_args, stage_config, stopped
from rapm.config import ConfigError
from rapm.progress import Progress
from rapm.trainer import CHECKPOINT, Trainer, TrainingError, iteration_indices, update_kinds

__all__ = ["CHECKPOINT", "Trainer", "TrainingError", "iteration_indices", "train", "update_kinds"]

log = logging.getLogger(__name__)

LOSS_TERMS = ("d_rel", "d_abs", "g_rel", "g_abs", "reg")


# --- the loss log ---------------------------------------------------------------------------------


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
    t0 = time.time()
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, trajectories, state_dir, subset, prompts=prompts, threads=threads)
    log_path = state_dir / "losses.jsonl"
    resumed = trainer.load_checkpoint()
    _truncate_log(log_path, trainer.step)
    if resumed:
        log.info("resuming at iteration %d from %s", trainer.step, state_dir / CHECKPOINT)
    total = int(cfg["train"]["iterations"])
    stop = total if max_iterations is None else min(total, trainer.step + int(max_iterations))
    if trainer.teacher.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _run_loop(trainer, log_path, stop, Progress(total, f"train {name or out_dir.name}", initial=trainer.step))
    if trainer.step < total:
        log.info("stopped at iteration %d of %d; run the same command again to resume", trainer.step, total)
        return None
    n_modules = _write_outputs(trainer, out_dir, log_path)
    summary = _summary(trainer, log_path, out_dir, trajectories, name, n_modules, time.time() - t0)
    log.info("RAPM done: %d iterations, LoRA with %d modules in %s", total, n_modules, out_dir / "lora.safetensors")
    return summary


def _run_loop(trainer: Trainer, log_path: Path, stop: int, bar: Progress) -> None:
    """Iterations ``trainer.step`` … ``stop`` − 1: one log line each; progress, snapshots, grids, checkpoints."""
    tcfg = trainer.tcfg
    total = int(tcfg["iterations"])
    every = {k: int(tcfg[k]) for k in ("checkpoint_every", "validate_every", "log_every")}
    snapshot_every = tcfg.get("snapshot_every")
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
                trainer.export(trainer.state_dir / "snapshots" / f"lora_{trainer.step:06d}.safetensors")
            if every["validate_every"] and trainer.step % every["validate_every"] == 0:
                trainer.write_validation()
            if trainer.step % every["checkpoint_every"] == 0 or trainer.step == stop:
                log_file.flush()
                os.fsync(log_file.fileno())
                trainer.save_checkpoint()


def _write_outputs(trainer: Trainer, out_dir: Path, log_path: Path) -> int:
    """The finished run's LoRA, last validation grid, loss log and snapshot list; returns the LoRA's module count."""
    from rapm.io import write_json

    total = int(trainer.tcfg["iterations"])
    out_dir.mkdir(parents=True, exist_ok=True)
    n_modules = trainer.export(out_dir / "lora.safetensors")
    grid = trainer.write_validation()
    shutil.copyfile(grid, out_dir / "validation.png")
    shutil.copyfile(log_path, out_dir / "losses.jsonl")
    snapshots = sorted((trainer.state_dir / "snapshots").glob("lora_*.safetensors"))
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
    return n_modules


def _summary(
    trainer: Trainer,
    log_path: Path,
    out_dir: Path,
    trajectories: str | Path,
    name: str | None,
    n_modules: int,
    wall_time_s: float,
) -> dict[str, Any]:
    """``summary.json`` of the finished run (from the whole loss log: every invocation), written and returned."""
    from rapm.io import write_summary

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
        "iterations": int(trainer.tcfg["iterations"]),
        "wall_time_s": round(wall_time_s, 1),  # this invocation (a resumed run counts from its restart)
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
        "config": {k: trainer.cfg[k] for k in ("teacher", "trajectories", "train")},
    }
    return write_summary(
        out_dir / "summary.json", "train", summary, outputs=[out_dir / "lora.safetensors"], device=device
    )


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
        return stopped("training stopped before train.iterations", "outputs")
    return 0
