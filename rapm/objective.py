"""One RAPM iteration (method.md §2-§4): the student roll-out, the two positions, the two updates.

:class:`RAPM` holds the one UNet (teacher weights + student LoRA, :mod:`rapm.lora`), the two
discriminators' heads on that UNet (:mod:`rapm.discriminator`) and the grids of a trajectory store.
It computes losses and gradients; the optimisers, checkpoints and logs live in :mod:`rapm.train`.

Per iteration, for a batch of stored trajectories (noise z̃_N, coarse states z̃_n, Δ-states) and
n = N−1 … 0 (slot k = 0 … N−1, noisiest first; u = t_{n+1}, v = t_n):

1. student step     z^φ_n = Φ(z_{n+1}; u → v; ε_φ(z_{n+1}, u, c))                 (with grad in the G step)
2. absolute target  z̃_n, read from the store
3. relative target  ẑ_n = sg[Φ(z̃_{u−Δ}; u−Δ → v; ε_φ(z̃_{u−Δ}, u−Δ, c))]          (detach #1: ``detach_target``)
4. advance          z_n = sg[z^φ_n]                                                 (detach #2: ``detach_rollout``)

Discriminator step: d_hinge(D1(ẑ_n), D1(z^φ_n)) + d_hinge(D2(z̃_n), D2(z^φ_n)), averaged over slots,
all inputs detached, every input re-noised with its own noise to τ ∈ [t_n, t_n + T/N) (method.md §3):
ONE τ per slot shared by the fake and both reals (``discriminator.renoise_tau: shared``, PCM's code,
the DEFAULT) or one τ per input (``independent``). The D step makes N + 2 UNet calls: the N relative
targets in one batched call (they do not depend on the roll-out), the N roll-out steps, and one
backbone call on all 3N re-noised inputs.
Student step: Σ_n w_n [λ_rel hinge_G(D1(z^φ_n)) + λ_abs hinge_G(D2(z^φ_n))]
+ w_n [λ_reg,rel pseudo-Huber(z^φ_n, ẑ_n) + λ_reg,abs pseudo-Huber(z^φ_n, z̃_n)]. With detach #2 each
slot is back-propagated on its own as soon as it is computed, so the memory is that of a one-step
method; the re-noised fake is judged by both heads from ONE backbone pass.

Detach #1 only matters where the relative target enters a student loss: ``regression_rel``. With it
0 the G step never computes ẑ_n, and "without detach #1" trains exactly like RAPM; the target is still
computed (detached) for the D step. With detach #1 on, the G step's N targets are one batched call.

``sabotage`` (a list, DEFAULT empty) breaks training on purpose, for a testbed that must tell a working
student from a broken one: ``swap_real_fake`` trains both discriminators with real and fake swapped
(the student is then pushed away from the teacher's positions).

All randomness of iteration i (trajectory pick, τ, re-noising noise) is drawn up front from
generators seeded with (seed, i) on the CPU, so a resumed run repeats it exactly and results do not
depend on the device's generator.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from rapm.conditioning import Conditioning
from rapm.discriminator import Discriminator
from rapm.losses import d_hinge, g_hinge, pseudo_huber
from rapm.merged import bump_versions, merged_student, use_merged
from rapm.schedule import ddim_transfer, renoise
from rapm.teacher import unet_eps

SLOT_WEIGHT_SCHEDULES = ("uniform", "increasing", "decreasing")


def slot_weights(spec: str | Sequence[float], num_steps: int) -> list[float]:
    """w_n per slot, noisiest slot first (slot k goes from t_{N−k} to t_{N−k−1}).

    ``uniform``: all 1 (DEFAULT). ``increasing``: ∝ k + 1 (more weight near the data), ``decreasing``:
    ∝ N − k (more weight on the noisy slots); both normalised to mean 1, so the total scale matches
    uniform. A list gives the N weights explicitly (noisiest slot first).
    """
    if isinstance(spec, str):
        if spec not in SLOT_WEIGHT_SCHEDULES:
            raise ValueError(
                f"unknown slot weight schedule {spec!r}; choose {', '.join(SLOT_WEIGHT_SCHEDULES)} or a list"
            )
        raw = {
            "uniform": [1.0] * num_steps,
            "increasing": [k + 1.0 for k in range(num_steps)],
            "decreasing": [num_steps - k + 0.0 for k in range(num_steps)],
        }[spec]
        mean = sum(raw) / num_steps
        return [w / mean for w in raw]
    weights = [float(w) for w in spec]
    if len(weights) != num_steps:
        raise ValueError(f"train.losses.slot_weights lists {len(weights)} weights for N = {num_steps} slots")
    if any(w < 0 for w in weights):
        raise ValueError(f"train.losses.slot_weights must be >= 0, got {weights}")
    return weights


def generator_slot_loss(
    rel_logits: Sequence[Tensor] | None,
    abs_logits: Sequence[Tensor] | None,
    *,
    weight: float,
    lambda_rel: float,
    lambda_abs: float,
) -> dict[str, Tensor]:
    """The adversarial part of one slot's student loss, w_n [λ_rel hinge_G(D1) + λ_abs hinge_G(D2)].

    Returns ``{"g_rel": …, "g_abs": …}`` (each already multiplied by w_n and its λ); a head whose λ is
    0 is skipped (its logits may be None) and contributes an exact 0.
    """
    out = {}
    for name, logits, lam in (("g_rel", rel_logits, lambda_rel), ("g_abs", abs_logits, lambda_abs)):
        if lam == 0 or weight == 0:
            out[name] = torch.zeros(())
        else:
            out[name] = weight * lam * g_hinge(logits)
    return out


@dataclass
class Batch:
    """B stored trajectories on the training device: ``coarse`` (B, N+1, C, H, W) with coarse[:, 0] = z̃_N,
    ``delta`` (B, N, C, H, W), the conditioning, and their indices in the store."""

    coarse: Tensor
    delta: Tensor
    cond: Conditioning
    indices: list[int]


def optimizers(
    optim: Mapping[str, Any], student_params, disc_params
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW of the student LoRA and of the discriminator heads, from the ``train.optim`` section.

    PyTorch's fused implementation (one kernel over every tensor, CPU and CUDA): the student has one
    lora_A and one lora_B per adapted module (330 small tensors on the toy), where the per-tensor loop
    took 8 ms per step against 2 ms fused. A step hook bumps the version counters the fused step leaves
    alone (:func:`rapm.merged.merged_student` caches on them).
    """
    opt_g = torch.optim.AdamW(
        list(student_params),
        lr=float(optim["student_lr"]),
        betas=tuple(optim["student_betas"]),
        weight_decay=float(optim["student_weight_decay"]),
        fused=True,
    )
    opt_d = torch.optim.AdamW(
        list(disc_params),
        lr=float(optim["disc_lr"]),
        betas=tuple(optim["disc_betas"]),
        weight_decay=float(optim["disc_weight_decay"]),
        fused=True,
    )
    for opt in (opt_g, opt_d):
        opt.register_step_post_hook(bump_versions)
    return opt_g, opt_d


def load_batch(dataset, indices: Sequence[int], device: torch.device | str) -> Batch:
    """Stack items of a :class:`rapm.store.TrajectoryDataset` into a :class:`Batch`."""
    items = [dataset[int(j)] for j in indices]
    cond = Conditioning(
        **{
            name: torch.stack([it[name] for it in items]).to(device)
            for name in ("prompt_embeds", "pooled_embeds", "add_time_ids")
            if name in items[0]
        }
    )
    return Batch(
        coarse=torch.stack([it["coarse"] for it in items]).to(device),
        delta=torch.stack([it["delta"] for it in items]).to(device),
        cond=cond,
        indices=[int(j) for j in indices],
    )


RENOISE_TAU = ("shared", "independent")
SABOTAGE = ("swap_real_fake", "shuffle_prompts")
INPUTS = ("fake", "rel", "abs")  # the re-noised inputs of a slot: the student's state and the two reals


@dataclass
class Noise:
    """The random draws of one iteration: τ and ε for every slot and every re-noised input
    (``fake``, ``rel``, ``abs``), each (N, B) / (N, B, C, H, W), on the CPU. With a shared τ the
    three ``tau`` entries are the same tensor."""

    tau: dict[str, Tensor]
    eps: dict[str, Tensor]


class RAPM:
    """Losses and gradients of RAPM on one UNet carrying the student adapter.

    ``teacher``: a :class:`rapm.teacher.Teacher` whose UNet has the student LoRA attached
    (:func:`rapm.lora.add_student_lora`); ``disc``: the :class:`Discriminator` on that UNet;
    ``coarse_t``/``delta_t``: the store's grids; ``cfg``: the ``train`` config section.
    """

    def __init__(
        self, teacher, disc: Discriminator, coarse_t: Sequence[int], delta_t: Sequence[int], cfg: Mapping[str, Any]
    ):
        self.teacher, self.disc, self.cfg = teacher, disc, cfg
        self.coarse_t, self.delta_t = [int(t) for t in coarse_t], [int(t) for t in delta_t]
        self.num_steps = len(self.delta_t)
        self.alphas_cumprod = teacher.alphas_cumprod.to(teacher.device)
        self.T = teacher.num_train_timesteps
        losses = cfg["losses"]
        self.lambda_rel, self.lambda_abs = float(losses["lambda_rel"]), float(losses["lambda_abs"])
        self.huber_c = float(losses["huber_c"])
        self.weights = slot_weights(losses["slot_weights"], self.num_steps)
        self.detach_target, self.detach_rollout = bool(cfg["detach_target"]), bool(cfg["detach_rollout"])
        self.renoise = bool(cfg["discriminator"]["renoise"])
        self.renoise_tau = cfg["discriminator"].get("renoise_tau", "shared")
        if self.renoise_tau not in RENOISE_TAU:
            raise ValueError(
                f"unknown train.discriminator.renoise_tau {self.renoise_tau!r}; choose {', '.join(RENOISE_TAU)}"
            )
        self.sabotage = list(cfg.get("sabotage") or [])
        unknown = sorted(set(self.sabotage) - set(SABOTAGE))
        if unknown:
            raise ValueError(f"unknown train.sabotage {unknown}; choose from {', '.join(SABOTAGE)}")
        self.lambda_reg_rel = float(losses["regression_rel"])
        self.lambda_reg_abs = float(losses["regression_abs"])
        self.autocast_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg["mixed_precision"]]
        self.merged = use_merged(
            cfg["lora"].get("merged", "auto"), teacher.unet, checkpointing=bool(cfg.get("gradient_checkpointing"))
        )

    # --- pieces ------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.teacher.device.type, dtype=self.autocast_dtype)

    def student_weights(self):
        """The context of every student pass: merged weights (:func:`rapm.merged.merged_student`) or peft's forward."""
        return merged_student(self.teacher.unet) if self.merged else contextlib.nullcontext()

    def student_step(self, z: Tensor, u: int, v: int, cond: Conditioning) -> Tensor:
        """Φ(z; u → v; ε_φ(z, u, c)): one DDIM step of the student (guidance 1, method.md "Notation")."""
        with self.autocast():
            eps = unet_eps(self.teacher, z, u, cond)
        return ddim_transfer(z, u, v, eps.float(), self.alphas_cumprod)

    def relative_target(self, batch: Batch, k: int, *, grad: bool | None = None) -> Tensor:
        """ẑ_n of slot k: one student step from the stored Δ-state z̃_{u−Δ} to v (method.md §2 step 3).

        Detached (no graph at all) when ``detach_target`` is on; ``grad`` overrides it.
        """
        grad = (not self.detach_target) if grad is None else grad
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.student_step(batch.delta[:, k], self.delta_t[k], self.coarse_t[k + 1], batch.cond)

    def relative_targets(self, batch: Batch) -> list[Tensor]:
        """ẑ_n of every slot from ONE batched UNet call (rows slot-major), without grad; per slot (B, C, H, W)."""
        B, N = len(batch.indices), self.num_steps
        z = batch.delta.transpose(0, 1).reshape(N * B, *batch.delta.shape[2:])
        u = torch.tensor(self.delta_t, dtype=torch.long).repeat_interleave(B)
        v = torch.tensor(self.coarse_t[1:], dtype=torch.long).repeat_interleave(B)
        with torch.no_grad(), self.autocast():
            eps = unet_eps(self.teacher, z, u.to(z.device), Conditioning.cat([batch.cond.expand(B)] * N))
        return list(ddim_transfer(z, u, v, eps.float(), self.alphas_cumprod).split(B))

    def draw_noise(self, seed: int, iteration: int, batch_size: int, latent_shape: Sequence[int]) -> Noise:
        """τ ∈ [t_n, min(t_n + T/N, T)) and ε ~ N(0, I) for each slot and re-noised input (CPU generator)."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, iteration, 1]).generate_state(1)[0]))
        span = self.T // self.num_steps
        v = torch.tensor(self.coarse_t[1:], dtype=torch.long).view(-1, 1)
        tau, eps = {}, {}
        shape = (self.num_steps, batch_size)

        def draw_tau() -> Tensor:
            offset = torch.randint(0, span, shape, generator=gen)
            return (v + offset).clamp(max=self.T - 1) if self.renoise else v.expand(*shape).clone()

        shared = draw_tau() if self.renoise_tau == "shared" else None
        for name in INPUTS:  # "independent" keeps the draw order of the first release
            tau[name] = shared if shared is not None else draw_tau()
            eps[name] = torch.randn((*shape, *latent_shape), generator=gen)
        return Noise(tau, eps)

    def _noised(self, x: Tensor, k: int, name: str, noise: Noise) -> tuple[Tensor, Tensor]:
        tau = noise.tau[name][k].to(x.device)
        if not self.renoise:
            return x, tau
        return renoise(x, self.coarse_t[k + 1], tau, noise.eps[name][k].to(x.device, x.dtype), self.alphas_cumprod), tau

    def _features(self, x: Tensor, tau: Tensor, cond: Conditioning) -> list[Tensor]:
        with self.autocast():
            return self.disc.features(x, tau, cond)

    def _logits(self, feats: list[Tensor], head: str) -> list[Tensor]:
        return [f.float() for f in self.disc.logits(feats, head)]

    # --- the two updates ------------------------------------------------------------------------

    def discriminator_loss(self, batch: Batch, noise: Noise) -> dict[str, Tensor]:
        """D step (method.md §4): {"d_rel", "d_abs", "loss"}; gradients reach only the heads.

        Without grad: the N relative targets in one call, the N roll-out steps, then ONE backbone call
        on every slot's re-noised fake and reals (3N·B rows). A head whose λ is 0 is not trained (its
        term is an exact 0). ``sabotage: swap_real_fake`` swaps the two sides of every hinge.
        """
        use = {"rel": self.lambda_rel != 0, "abs": self.lambda_abs != 0}
        cond, B, N = batch.cond, len(batch.indices), self.num_steps
        with torch.no_grad(), self.student_weights():
            reals = {
                "rel": self.relative_targets(batch) if use["rel"] else None,
                "abs": [batch.coarse[:, k + 1] for k in range(N)],
            }
            fakes, z = [], batch.coarse[:, 0]
            for k in range(N):
                z = self.student_step(z, self.coarse_t[k], self.coarse_t[k + 1], cond)
                fakes.append(z)
            names = ["fake"] + [h for h in ("rel", "abs") if use[h]]
            inputs = [
                self._noised(fakes[k] if name == "fake" else reals[name][k], k, name, noise)
                for name in names
                for k in range(N)
            ]
            feats = self._features(
                torch.cat([x for x, _ in inputs]),
                torch.cat([t for _, t in inputs]),
                Conditioning.cat([cond.expand(B)] * len(inputs)),
            )
        chunks = list(zip(*[f.split(B) for f in feats]))  # per (input, slot), in the order of ``inputs``
        terms = {"d_rel": [], "d_abs": []}
        swap = "swap_real_fake" in self.sabotage
        for head in ("rel", "abs"):
            if not use[head]:
                continue
            row = names.index(head) * N
            for k in range(N):
                real_logits, fake_logits = (
                    self._logits(list(chunks[row + k]), head),
                    self._logits(list(chunks[k]), head),
                )
                if swap:
                    real_logits, fake_logits = fake_logits, real_logits
                terms[f"d_{head}"].append(d_hinge(real_logits, fake_logits))
        out = {name: torch.stack(vals).mean() if vals else torch.zeros(()) for name, vals in terms.items()}
        out["loss"] = out["d_rel"] + out["d_abs"]
        return out

    def generator_backward(self, batch: Batch, noise: Noise, *, backward: bool = True) -> dict[str, Tensor]:
        """G step (method.md §4): computes the student loss and back-propagates it into the LoRA.

        With detach #2 (``detach_rollout``) each slot's loss is back-propagated as soon as it is
        computed; without it, the slots' losses are summed and back-propagated once through the
        whole roll-out. Returns the detached terms {"g_rel", "g_abs", "reg", "loss"}, summed over slots.
        ``backward=False`` only computes them (for tests and validation).
        """
        with self.student_weights():  # with merged weights their gradients reach the LoRA on exit
            return self._generator_terms(batch, noise, backward=backward)

    def _generator_terms(self, batch: Batch, noise: Noise, *, backward: bool) -> dict[str, Tensor]:
        totals = {"g_rel": 0.0, "g_abs": 0.0, "reg": 0.0}
        pending: list[Tensor] = []
        z = batch.coarse[:, 0]
        cond = batch.cond
        targets_rel = None
        if self.lambda_reg_rel != 0 and self.detach_target:  # no graph: all N targets in one call
            targets_rel = self.relative_targets(batch)
        for k in range(self.num_steps):
            u, v, w = self.coarse_t[k], self.coarse_t[k + 1], self.weights[k]
            fake = self.student_step(z, u, v, cond)
            parts: dict[str, Tensor] = {}
            if w != 0 and (self.lambda_rel != 0 or self.lambda_abs != 0):
                x, tau = self._noised(fake, k, "fake", noise)
                feats = self._features(x, tau, cond)
                parts.update(
                    generator_slot_loss(
                        self._logits(feats, "rel") if self.lambda_rel else None,
                        self._logits(feats, "abs") if self.lambda_abs else None,
                        weight=w,
                        lambda_rel=self.lambda_rel,
                        lambda_abs=self.lambda_abs,
                    )
                )
            if w != 0 and (self.lambda_reg_rel != 0 or self.lambda_reg_abs != 0):
                reg = torch.zeros((), device=fake.device)
                if self.lambda_reg_rel != 0:
                    target_rel = targets_rel[k] if targets_rel is not None else self.relative_target(batch, k)
                    reg = reg + self.lambda_reg_rel * pseudo_huber(fake, target_rel, self.huber_c)
                if self.lambda_reg_abs != 0:
                    reg = reg + self.lambda_reg_abs * pseudo_huber(fake, batch.coarse[:, k + 1], self.huber_c)
                parts["reg"] = w * reg
            slot_loss = sum(p.to(fake.device) for p in parts.values()) if parts else None
            for name, value in parts.items():
                totals[name] = totals[name] + value.detach().float().cpu()
            if slot_loss is not None and slot_loss.requires_grad:
                if self.detach_rollout and backward:
                    slot_loss.backward()
                else:
                    pending.append(slot_loss)
            z = fake.detach() if self.detach_rollout else fake
        if pending and backward:
            torch.stack(pending).sum().backward()
        out = {name: torch.as_tensor(value, dtype=torch.float32) for name, value in totals.items()}
        out["loss"] = out["g_rel"] + out["g_abs"] + out["reg"]
        return out

    @torch.no_grad()
    def sample(self, z: Tensor, cond: Conditioning) -> Tensor:
        """The student's N-step DDIM (trailing, guidance 1) from noise z: its final latents."""
        with self.student_weights():
            for k in range(self.num_steps):
                z = self.student_step(z, self.coarse_t[k], self.coarse_t[k + 1], cond)
        return z
