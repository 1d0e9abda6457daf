"""rapm.schedule against an independent oracle: diffusers' DDIMScheduler (trailing, set_alpha_to_one=False).

Our sampler is built only from schedule.py's functions; the oracle is diffusers' own loop
(``set_timesteps`` + ``step``). Both are driven by the same model, so any difference is schedule math.
Reference numbers are pinned where the math matters, so a refactor that changes it fails.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from rapm.schedule import (
    alphas_cumprod_from_scheduler,
    cfg,
    coarse_timesteps,
    ddim_sample,
    ddim_transfer,
    delta_timesteps,
    fine_timesteps,
    renoise,
    scaled_linear_alphas_cumprod,
    to_epsilon,
    trailing_timesteps,
)

pytestmark = pytest.mark.usefixtures("single_thread")

T = 1000


def oracle(prediction_type: str = "epsilon") -> DDIMScheduler:
    """diffusers' DDIM with the settings of method.md and SD's betas."""
    return DDIMScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def oracle_sample(eps_fn, z, num_steps, prediction_type="epsilon"):
    """diffusers' DDIM loop; returns the final state and {prev time: state} after each step."""
    sched = oracle(prediction_type)
    sched.set_timesteps(num_steps)
    states = {}
    for t in sched.timesteps:
        z = sched.step(eps_fn(z, int(t)), t, z).prev_sample
        states[max(int(t) - T // num_steps, 0)] = z  # diffusers' "prev_timestep", final written as 0
    return z, states


@pytest.fixture(scope="module")
def ac():
    return scaled_linear_alphas_cumprod()


@pytest.fixture(scope="module")
def unet_eps_fn(tiny_sd):
    """ε(z, t) of the tiny random UNet with a fixed random text conditioning."""
    unet = tiny_sd.unet
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def eps_fn(z, t):
        return unet(z, t, encoder_hidden_states=text.expand(len(z), -1, -1)).sample

    return eps_fn


def smooth_eps(z, t):
    """A model-free ε(z, t) for pinned numbers that must not depend on diffusers' weight init."""
    return torch.tanh(z) * (0.5 + t / 2000) + 0.1


# --- schedule and grids --------------------------------------------------------------------------


def test_alphas_cumprod_equal_diffusers_and_are_pinned(ac):
    sched = oracle()
    assert torch.equal(ac, sched.alphas_cumprod)
    assert torch.equal(alphas_cumprod_from_scheduler(sched), ac)
    # diffusers' final DDIM step goes to alphas_cumprod[0], not 1, with set_alpha_to_one=False
    assert sched.final_alpha_cumprod.item() == ac[0].item()
    assert abs(ac[0].item() - 0.99915) < 1e-6  # 1 - beta_start
    assert abs(ac[249].item() - 0.675432) < 1e-6
    assert abs(ac[999].item() - 0.0046601) < 1e-6
    assert abs(ac.sum().item() - 373.37646) < 1e-3


def test_grids_pinned_for_n4_m10():
    assert coarse_timesteps(4) == [999, 749, 499, 249, 0]
    fine = fine_timesteps(4, 10)
    assert fine == [999 - 25 * i for i in range(40)] + [0]
    assert fine[:3] == [999, 974, 949] and fine[-3:] == [49, 24, 0]
    assert fine[::10] == coarse_timesteps(4)  # every coarse boundary is on the fine grid
    assert delta_timesteps(4, 10) == [974, 724, 474, 224]
    assert delta_timesteps(4, 1) == [749, 499, 249, 0]  # M = 1: the Δ-state is the next coarse state
    assert coarse_timesteps(1) == [999, 0]


@pytest.mark.parametrize("num_steps", [d for d in range(1, T) if T % d == 0])
def test_trailing_grid_equals_diffusers(num_steps):
    sched = oracle()
    sched.set_timesteps(num_steps)
    assert trailing_timesteps(num_steps) == sched.timesteps.tolist() + [0]


@pytest.mark.parametrize("n, m", [(4, 10), (4, 25), (2, 5), (1, 40), (8, 5)])
def test_fine_grid_equals_diffusers_with_n_times_m_steps(n, m):
    sched = oracle()
    sched.set_timesteps(n * m)
    fine = fine_timesteps(n, m)
    assert fine == sched.timesteps.tolist() + [0]
    assert fine[::m] == coarse_timesteps(n)
    assert delta_timesteps(n, m) == [fine[k * m + 1] for k in range(n)]


def test_non_divisor_step_counts_are_refused():
    # Why: diffusers' DDIM steps t -> t - T//K, which for K = 3 leaves its own grid.
    sched = oracle()
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 666, 332]
    assert 666 - T // 3 == 333  # diffusers moves the state to 333 but evaluates the model at 332
    with pytest.raises(ValueError, match="do not divide num_train_timesteps=1000"):
        coarse_timesteps(3)
    with pytest.raises(ValueError, match="do not divide"):
        fine_timesteps(4, 3)  # 12 steps
    with pytest.raises(ValueError, match="integer in"):
        coarse_timesteps(0)
    with pytest.raises(ValueError, match="positive integer"):
        fine_timesteps(4, 0)


# --- the sampler against diffusers' loop ---------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_ddim_sample_equals_diffusers_loop(num_steps, ac, unet_eps_fn):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(num_steps))
    grid = coarse_timesteps(num_steps)
    ours, kept = ddim_sample(unet_eps_fn, z, grid, ac, keep=grid)
    ref, ref_states = oracle_sample(unet_eps_fn, z, num_steps)
    assert (ours - ref).abs().max().item() < 1e-5
    assert set(kept) == set(grid) and torch.equal(kept[grid[0]], z)
    for t, state in ref_states.items():  # every intermediate state, not only the last
        assert (kept[t] - state).abs().max().item() < 1e-5, t
    assert ours.abs().mean() > 0.1  # a real trajectory, not a degenerate one


def test_fine_grid_states_equal_diffusers_with_40_steps(ac, unet_eps_fn):
    n, m = 4, 10
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    keep = coarse_timesteps(n) + delta_timesteps(n, m)
    ours, kept = ddim_sample(unet_eps_fn, z, fine_timesteps(n, m), ac, keep=keep)
    ref, ref_states = oracle_sample(unet_eps_fn, z, n * m)
    assert (ours - ref).abs().max().item() < 1e-5
    for t in keep[1:]:
        assert (kept[t] - ref_states[t]).abs().max().item() < 1e-5, t


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_equal_diffusers(prediction_type, ac, unet_eps_fn):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours, _ = ddim_sample(unet_eps_fn, z, coarse_timesteps(4), ac, prediction_type=prediction_type)
    ref, _ = oracle_sample(unet_eps_fn, z, 4, prediction_type)
    assert (ours - ref).abs().max().item() < 1e-5


def test_ddim_sample_pinned(ac):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out, kept = ddim_sample(smooth_eps, z, coarse_timesteps(4), ac, keep=[249])
    assert abs(out.sum().item() - (-220.9785)) < 1e-3
    assert abs(kept[249].sum().item() - (-185.7453)) < 1e-3


def test_sampler_rejects_bad_input(ac):
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(smooth_eps, z, [249, 499, 0], ac)
    with pytest.raises(ValueError, match="not on the grid"):
        ddim_sample(smooth_eps, z, coarse_timesteps(4), ac, keep=[500])
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        ddim_sample(smooth_eps, z, coarse_timesteps(4), ac, prediction_type="flow")
    with pytest.raises(ValueError, match="outside"):
        ddim_transfer(z, 1000, 0, z, ac)


# --- one transfer, guidance, re-noising ----------------------------------------------------------


def test_transfer_formula_and_per_sample_times(ac):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a, s = ac.sqrt(), (1 - ac).sqrt()
    expected = a[249] * (z - s[749] * e) / a[749] + s[249] * e
    assert torch.allclose(ddim_transfer(z, 749, 249, e, ac), expected, atol=1e-6)
    # final step to t_0: the target alpha-bar is alphas_cumprod[0]
    x0 = (z - s[249] * e) / a[249]
    assert torch.allclose(ddim_transfer(z, 249, 0, e, ac), a[0] * x0 + s[0] * e, atol=1e-6)
    # per-sample times equal one call per sample
    both = ddim_transfer(z, torch.tensor([999, 749]), torch.tensor([749, 0]), e, ac)
    assert torch.allclose(both[:1], ddim_transfer(z[:1], 999, 749, e[:1], ac))
    assert torch.allclose(both[1:], ddim_transfer(z[1:], 749, 0, e[1:], ac))
    # u == v is the identity; a transfer is exact on a noised sample with its true noise
    assert torch.allclose(ddim_transfer(z, 499, 499, e, ac), z, atol=1e-6)
    assert torch.allclose(ddim_transfer(a[999] * z + s[999] * e, 999, 249, e, ac), a[249] * z + s[249] * e, atol=1e-5)
    assert abs(ddim_transfer(z, 999, 749, e, ac).sum().item() - 109.0796) < 1e-3


def test_v_prediction_conversion_is_consistent(ac):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    a, s = ac[499].sqrt(), (1 - ac[499]).sqrt()
    z = a * x0 + s * eps
    assert torch.allclose(to_epsilon(a * eps - s * x0, z, 499, ac, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_epsilon(x0, z, 499, ac, "sample"), eps, atol=1e-5)
    assert to_epsilon(eps, z, 499, ac, "epsilon") is eps


def test_cfg():
    g = torch.Generator().manual_seed(0)
    eu, ec = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(cfg(eu, ec, 1.0), ec, atol=1e-6)  # w = 1 is the conditional prediction
    assert torch.equal(cfg(eu, ec, 0.0), eu)
    assert torch.allclose(cfg(eu, ec, 7.5), eu + 7.5 * (ec - eu))
    assert torch.allclose(cfg(eu, ec, 7.5) - cfg(eu, ec, 6.5), ec - eu, atol=1e-5)


def test_renoise_statistics(ac):
    # x_t with the marginal of time t, re-noised to tau, has the marginal of time tau:
    # mean a_tau * x0, std s_tau (for fixed x0), for several (t, tau) pairs at once.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 4, 4, generator=g)
    n = 20000
    t = torch.tensor([0, 249, 749])
    tau = torch.tensor([200, 499, 999])
    for ti, taui in zip(t.tolist(), tau.tolist()):
        x_t = ac[ti].sqrt() * x0 + (1 - ac[ti]).sqrt() * torch.randn(n, 4, 4, 4, generator=g)
        x_tau = renoise(x_t, ti, taui, torch.randn(n, 4, 4, 4, generator=g), ac)
        resid = (x_tau - ac[taui].sqrt() * x0) / (1 - ac[taui]).sqrt()  # should be N(0, 1), 1.28M draws
        assert abs(resid.mean().item()) < 0.005 and abs(resid.std().item() - 1) < 0.005
        assert resid.mean(0).abs().max() < 0.05 and (resid.std(0) - 1).abs().max() < 0.05  # per element
    # per-sample times, tau == t is the identity, pinned number
    x = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    assert torch.allclose(renoise(x, t, t, noise, ac), x)
    out = renoise(x, t, tau, noise, ac)
    assert torch.allclose(out[1:2], renoise(x[1:2], 249, 499, noise[1:2], ac))
    assert abs(out.sum().item() - (-4.3875)) < 1e-3
    with pytest.raises(ValueError, match="tau >= t"):
        renoise(x, 499, 249, noise, ac)
