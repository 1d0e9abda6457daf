"""DDIM mathematics of RAPM: noise schedule, time grids, transfer Φ, guidance, re-noising.

Pure functions on tensors; no model, no scheduler object. Notation and equations are those of
``docs/method.md`` ("Notation", §1, §3):

- ᾱ_t = ``alphas_cumprod[t]``, a_t = sqrt(ᾱ_t), s_t = sqrt(1 − ᾱ_t);
- times are integer training timesteps 0 … T−1 (T = ``num_train_timesteps``). The *final* state of
  every grid is written as time 0: diffusers' DDIM with ``set_alpha_to_one=False`` gives it
  ᾱ = ``alphas_cumprod[0]``, which is exactly ᾱ_0, and method.md conditions any network evaluated
  there on timestep 0. So a grid of K steps is a list of K + 1 strictly decreasing ints ending in 0;
- grids list times noisiest first: ``coarse_timesteps(4) == [999, 749, 499, 249, 0]`` is
  [t_N, …, t_0] of method.md.

Inference is diffusers' ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False,
clip_sample=False)``; ``tests/test_schedule.py`` proves :func:`ddim_sample` equals it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

#: Model output parameterisations :func:`to_epsilon` understands (diffusers' ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Timestep = int | Tensor


# --- noise schedule ----------------------------------------------------------------------------


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> Tensor:
    """ᾱ_t of SD's "scaled_linear" schedule (method.md, "Notation"), float32, shape (T,).

    β_t is linear in sqrt(β) from sqrt(beta_start) to sqrt(beta_end); ᾱ_t = Π_{s≤t} (1 − β_s).
    Computed in float32 like diffusers' schedulers, i.e. the schedule SD was trained with.
    """
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_scheduler(scheduler) -> Tensor:
    """ᾱ_t taken from a diffusers scheduler (any with ``alphas_cumprod``), float32 on the CPU."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; use a DDIM/DDPM-family scheduler")
    return torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().cpu().clone()


# --- time grids --------------------------------------------------------------------------------


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The grid of diffusers' DDIM with ``timestep_spacing="trailing"`` and ``num_steps`` steps, plus the final 0.

    ``[T−1, T−1−T/K, …, T/K−1, 0]`` (K + 1 times). ``num_steps`` must divide T: diffusers' DDIM
    steps from t to t − T//K whatever its grid says, so for other K its sampler does not move along its
    own grid (for K = 3: it steps 999 → 666 but next evaluates the model at 332), and no training grid
    can match it. Raises ``ValueError`` for such K instead of reproducing that.
    """
    T, K = num_train_timesteps, num_steps
    if not isinstance(K, int) or not 1 <= K < T:
        raise ValueError(f"number of steps must be an integer in [1, {T - 1}], got {K!r}")
    if T % K:
        divisors = [d for d in range(1, T) if T % d == 0]
        raise ValueError(
            f"{K} steps do not divide num_train_timesteps={T}: diffusers' DDIM (trailing) would step from t "
            f"to t - {T // K}, off its own grid, so training and inference grids could not agree. "
            f"Use a number of steps that divides {T}: {divisors[:12]} ..."
        )
    stride = T // K
    return [T - 1 - i * stride for i in range(K)] + [0]


def coarse_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The coarse grid [t_N, …, t_1, t_0] of method.md ("Notation"): the student's inference grid.

    Equals diffusers' DDIM trailing grid; N = 4 gives [999, 749, 499, 249, 0].
    """
    return trailing_timesteps(num_steps, num_train_timesteps)


def fine_timesteps(num_steps: int, steps_per_slot: int, num_train_timesteps: int = 1000) -> list[int]:
    """The teacher's fine grid (method.md §1): M = ``steps_per_slot`` DDIM steps in each coarse slot.

    Equals diffusers' DDIM trailing grid with N·M steps, and contains every coarse boundary:
    ``fine[k * M] == coarse[k]`` for k = 0 … N. N = 4, M = 10 gives [999, 974, …, 24, 0].
    """
    if not isinstance(steps_per_slot, int) or steps_per_slot < 1:
        raise ValueError(f"steps per coarse slot must be a positive integer, got {steps_per_slot!r}")
    fine = trailing_timesteps(num_steps * steps_per_slot, num_train_timesteps)
    coarse = coarse_timesteps(num_steps, num_train_timesteps)
    assert fine[::steps_per_slot] == coarse, "fine grid misses a coarse boundary"  # holds when N·M divides T
    return fine


def delta_timesteps(num_steps: int, steps_per_slot: int, num_train_timesteps: int = 1000) -> list[int]:
    """The Δ-state times t_{n+1} − Δ (method.md §1): the first fine time after each coarse boundary.

    One per slot, noisiest slot first, aligned with ``coarse_timesteps(N)[:-1]``: element k is
    ``fine[k * M + 1]``. N = 4, M = 10 gives [974, 724, 474, 224]. With M = 1 they are t_n themselves.
    """
    fine = fine_timesteps(num_steps, steps_per_slot, num_train_timesteps)
    return [fine[k * steps_per_slot + 1] for k in range(num_steps)]


def trajectory_grids(
    num_steps: int, steps_per_slot: int, num_train_timesteps: int = 1000
) -> tuple[list[int], list[int], list[int]]:
    """The (fine, coarse, Δ) grids of one teacher trajectory (method.md §1): the times it steps through, the
    coarse states and the Δ-states it keeps."""
    return (
        fine_timesteps(num_steps, steps_per_slot, num_train_timesteps),
        coarse_timesteps(num_steps, num_train_timesteps),
        delta_timesteps(num_steps, steps_per_slot, num_train_timesteps),
    )


# --- one DDIM step -----------------------------------------------------------------------------


def _alpha_bar(alphas_cumprod: Tensor, t: Timestep, like: Tensor) -> Tensor:
    """ᾱ_t shaped to broadcast against ``like`` (B, C, H, W): a scalar, or (B, 1, 1, 1) for a vector t."""
    if isinstance(t, Tensor):
        t = t.to(alphas_cumprod.device, torch.long)
        if t.ndim > 1:
            raise ValueError(f"timesteps must be an int, a 0-d or a 1-d tensor, got shape {tuple(t.shape)}")
    elif not isinstance(t, int):
        raise TypeError(f"timestep must be an int or a tensor, got {type(t).__name__}")
    if (torch.as_tensor(t) < 0).any() or (torch.as_tensor(t) >= len(alphas_cumprod)).any():
        raise ValueError(f"timestep {t} outside [0, {len(alphas_cumprod) - 1}]")
    abar = alphas_cumprod[t]
    if abar.ndim == 1:
        abar = abar.view(-1, *([1] * (like.ndim - 1)))
    return abar.to(like.device)


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if :func:`to_epsilon` handles it, else raise ``ValueError``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def to_epsilon(
    model_output: Tensor, z: Tensor, t: Timestep, alphas_cumprod: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """The noise prediction ε implied by a model output at state z_t.

    ``epsilon``: the output itself. ``v_prediction`` (v = a_t ε − s_t x0): ε = a_t v + s_t z.
    ``sample`` (x0-prediction): ε = (z − a_t x0) / s_t. The algebra is diffusers' DDIMScheduler.step.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    abar = _alpha_bar(alphas_cumprod, t, z)
    a, s = abar.sqrt().to(z.dtype), (1 - abar).sqrt().to(z.dtype)
    if prediction_type == "v_prediction":
        return a * model_output + s * z
    return (z - a * model_output) / s  # "sample"


def ddim_transfer(z: Tensor, u: Timestep, v: Timestep, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDIM transfer Φ(z; u → v; e) = a_v (z − s_u e) / a_u + s_v e (method.md, "Notation").

    Deterministic DDIM (η = 0) from time u to time v (v < u for denoising; any v works), with the
    predicted clean sample x0 = (z − s_u e)/a_u in between, in the order of diffusers'
    ``DDIMScheduler.step``. v = 0 is the final state (ᾱ = alphas_cumprod[0]). ``u``/``v`` may be ints or
    per-sample (B,) tensors.
    """
    abar_u = _alpha_bar(alphas_cumprod, u, z)  # coefficients in the schedule's float32, then cast
    abar_v = _alpha_bar(alphas_cumprod, v, z)
    a_u, s_u = abar_u.sqrt().to(z.dtype), (1 - abar_u).sqrt().to(z.dtype)
    a_v, s_v = abar_v.sqrt().to(z.dtype), (1 - abar_v).sqrt().to(z.dtype)
    x0 = (z - s_u * eps) / a_u
    return a_v * x0 + s_v * eps


def cfg(eps_uncond: Tensor, eps_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance in diffusers' form (method.md, "Notation"): ε_w = ε_∅ + w (ε_c − ε_∅)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def renoise(x: Tensor, t: Timestep, tau: Timestep, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward-diffuse a state from time t to a noisier time τ ≥ t (method.md §3):

    x_τ = sqrt(ᾱ_τ/ᾱ_t) x + sqrt(1 − ᾱ_τ/ᾱ_t) ε.

    If x has the marginal of time t (a_t x0 + s_t ε'), x_τ has that of time τ. τ = t returns x.
    ``t``/``tau`` may be ints or per-sample (B,) tensors; t = 0 is the final state.
    """
    abar_t = _alpha_bar(alphas_cumprod, t, x)
    abar_tau = _alpha_bar(alphas_cumprod, tau, x)
    if (abar_tau > abar_t).any():
        raise ValueError(f"re-noising goes to a noisier time: need tau >= t, got t={t}, tau={tau}")
    ratio = (abar_tau / abar_t).to(x.dtype)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


# --- sampler -----------------------------------------------------------------------------------


def ddim_sample(
    eps_fn: Callable[[Tensor, int], Tensor],
    z: Tensor,
    timesteps: list[int],
    alphas_cumprod: Tensor,
    *,
    prediction_type: str = "epsilon",
    keep: Iterable[int] = (),
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Deterministic DDIM along ``timesteps`` (a grid from :func:`trailing_timesteps` and friends).

    For each consecutive pair (u, v): e = ε(z, u) (``eps_fn`` returns the model output of
    ``prediction_type``, converted by :func:`to_epsilon`), then z ← Φ(z; u → v; e). The model is never
    evaluated at the final time. Returns the final state and ``{t: state}`` for every grid time in
    ``keep`` (the start included if asked), e.g. the coarse and Δ states of a teacher trajectory
    (method.md §1). No gradient policy is imposed: wrap in ``torch.no_grad()`` for teacher runs.
    ``callback(i, t, z)`` is called after step i (a progress bar hook).
    """
    check_prediction_type(prediction_type)
    if len(timesteps) < 2 or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing with at least 2 entries, got {timesteps}")
    keep = set(keep)
    missing = keep - set(timesteps)
    if missing:
        raise ValueError(f"times to keep {sorted(missing)} are not on the grid {timesteps}")
    kept = {timesteps[0]: z} if timesteps[0] in keep else {}
    for i, (u, v) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        eps = to_epsilon(eps_fn(z, u), z, u, alphas_cumprod, prediction_type)
        z = ddim_transfer(z, u, v, eps, alphas_cumprod)
        if v in keep:
            kept[v] = z
        if callback is not None:
            callback(i, u, z)
    return z, kept


def store_grid(traj_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``trajectories`` section of the STORE a config trains on: ``store_steps`` (null: ``num_steps``)
    coarse slots of ``num_steps · steps_per_slot / store_steps`` fine steps each, the same fine grid.

    A student with fewer steps trains on a coarser sub-grid of a store's grid: for N = 1 (M = 40) and
    N = 2 (M = 20), the 40-step trailing grid, its coarse states and its Δ-states (Δ = one fine step)
    are those of the N = 4, M = 10 store at every (4/N)-th slot, computed by the same teacher steps from
    the same noise, so ``store_steps: 4`` reads them from that store instead of recomputing them.
    """
    out = {k: v for k, v in traj_cfg.items() if k != "store_steps"}
    n, m = int(traj_cfg["num_steps"]), int(traj_cfg["steps_per_slot"])
    ns = traj_cfg.get("store_steps") or n
    if ns % n or (n * m) % ns:
        raise ValueError(
            f"trajectories.store_steps {ns} must be a multiple of num_steps {n} and divide "
            f"num_steps x steps_per_slot = {n * m}"
        )
    out["num_steps"], out["steps_per_slot"] = int(ns), n * m // int(ns)
    return out


def subgrid_indices(store_steps: int, num_steps: int) -> tuple[list[int], list[int]]:
    """Indices into a store's coarse (N_s + 1) and delta (N_s) axes of the sub-grid of ``num_steps`` slots."""
    if store_steps % num_steps:
        raise ValueError(f"a {num_steps}-step grid is not a sub-grid of the store's {store_steps} slots")
    stride = store_steps // num_steps
    return list(range(0, store_steps + 1, stride)), list(range(0, store_steps, stride))
