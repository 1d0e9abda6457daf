"""The RAPM trainer: the UNet with its student LoRA, the heads, both optimisers and one iteration.

:class:`Trainer` holds what a run holds and does one iteration at a time (the losses and gradients
are :class:`rapm.objective.RAPM`); :mod:`rapm.train` runs the loop around it and writes the outputs.

    iteration i:
        1. batch   B trajectories picked by a generator seeded with (seed, i); τ and ε drawn likewise
        2. update  D on even i, G on odd i (``schedule: alternate``, DEFAULT), or D then G every i
        3. check   every loss term finite, else stop (TrainingError names the step and term)
        4. clip    gradient norm ≤ ``optim.grad_clip``, AdamW step (the student's lr from
                   ``optim.student_lr_schedule``); the weights it updated must be finite (one fused
                   check per update, else TrainingError naming the tensor and the iteration); with
                   ``ema_decay`` > 0 the moving average of the student moves after each student update

The checkpoint (``checkpoint.safetensors`` in the state directory) holds the LoRA, its moving
average, the discriminator heads and both AdamW states, with the step and the config in its
metadata. Every safetensors file (checkpoint, snapshots, the LoRA) is written by
:func:`rapm.io.save_safetensors`: byte-reproducible, atomic, mode from the umask, and refused
(TrainingError naming the tensor and the iteration; nothing written) when a tensor is not finite
after the cast to its stored dtype (e.g. a float32 weight beyond float16's range with
``export_dtype: float16``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rapm.errors import RapmError
from rapm.io import NonFiniteTensorError, load_optimizer_tensors, optimizer_tensors, save_safetensors

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


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
        self.dataset = TrajectoryDataset.from_config(trajectories, cfg, self.teacher, prompts=prompts, cache=True)
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
        opt.step()  # bumps the parameters' version counters (rapm.objective.optimizers)
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
