"""Losses of method.md §4: hand-checkable cases, pinned reference numbers, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rapm.losses import d_hinge, g_hinge, pseudo_huber


def _fixed_logits():
    """Two logit maps of different resolution, as two feature levels give (seeded)."""
    torch.manual_seed(0)
    real = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)]
    fake = [torch.randn(2, 1, 4, 4) * 2, torch.randn(2, 1, 2, 2) * 2]
    return real, fake


# --- hand-checkable ------------------------------------------------------------------------------


def test_d_hinge_by_hand():
    real = [torch.tensor([[2.0, 0.5]])]  # relu(1-2)=0, relu(1-0.5)=0.5 -> mean 0.25
    fake = [torch.tensor([[-2.0, 0.0]])]  # relu(1-2)=0, relu(1+0)=1 -> mean 0.5
    assert d_hinge(real, fake).item() == pytest.approx(0.75, abs=1e-7)


def test_d_hinge_is_zero_beyond_the_margins_and_grows_inside():
    assert d_hinge([torch.full((1, 1, 3, 3), 1.0)], [torch.full((1, 1, 3, 3), -1.0)]).item() == 0.0
    assert d_hinge([torch.full((1, 1, 3, 3), 5.0)], [torch.full((1, 1, 3, 3), -7.0)]).item() == 0.0
    # all logits 0: relu(1) + relu(1) = 2 at every position
    assert d_hinge([torch.zeros(1, 1, 3, 3)], [torch.zeros(1, 1, 3, 3)]).item() == 2.0


def test_g_hinge_by_hand():
    assert g_hinge([torch.tensor([[3.0, 1.0, 0.0, -1.0]])]).item() == pytest.approx((0 + 0 + 1 + 2) / 4)


def test_maps_count_equally_whatever_their_resolution():
    """Mean per map, then over maps: a 1×1 map weighs as much as a 4×4 one (not 1/17 of the total)."""
    big, small = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 1, 1), -1.0)  # g: 1 per position, resp. 2
    assert g_hinge([big, small]).item() == pytest.approx((1.0 + 2.0) / 2)
    real = [torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 1, 1), 0.0)]  # d terms: 0, 1
    fake = [torch.full((1, 1, 4, 4), -2.0), torch.full((1, 1, 1, 1), 0.0)]  # d terms: 0, 1
    assert d_hinge(real, fake).item() == pytest.approx((0.0 + 2.0) / 2)


def test_pseudo_huber_by_hand():
    # one sample, difference (3, 4): norm 5; c = 12: sqrt(25 + 144) - 12 = 13 - 12 = 1
    x, y = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert pseudo_huber(x, y, 12.0).item() == pytest.approx(1.0, abs=1e-6)
    # the norm is per sample (over C, H, W), then the batch mean: (1 + 0) / 2
    x2 = torch.tensor([[[3.0], [4.0]], [[0.0], [0.0]]])
    assert pseudo_huber(x2, torch.zeros_like(x2), 12.0).item() == pytest.approx(0.5, abs=1e-6)
    assert pseudo_huber(x, x.clone(), 1e-3).item() == 0.0


def test_pseudo_huber_limits():
    """≈ ‖d‖²/(2c) for ‖d‖ ≪ c, ≈ ‖d‖ − c for ‖d‖ ≫ c."""
    d = torch.tensor([[3e-3, 4e-3]])  # norm 5e-3
    assert pseudo_huber(d, torch.zeros_like(d), 1.0).item() == pytest.approx(
        25e-6 / 2 - 25e-6**2 / 8, rel=1e-5
    )  # no cancellation
    d = torch.tensor([[300.0, 400.0]])
    assert pseudo_huber(d, torch.zeros_like(d), 1e-3).item() == pytest.approx(500.0 - 1e-3, rel=1e-6)


# --- pinned reference numbers (computed once with these seeds; a change in the maths fails here) ---


def test_pinned_hinge_values():
    real, fake = _fixed_logits()
    assert d_hinge(real, fake).item() == pytest.approx(2.2035117, abs=1e-5)
    assert g_hinge(fake).item() == pytest.approx(1.4238515, abs=1e-5)


def test_pinned_pseudo_huber_values():
    torch.manual_seed(0)
    torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert pseudo_huber(x, y, 1e-3).item() == pytest.approx(23.3168945, abs=1e-4)
    small = torch.randn(2, 4, 8, 8) * 1e-3
    assert pseudo_huber(small, torch.zeros_like(small), 0.1).item() == pytest.approx(0.001214697, rel=1e-5)


# --- gradients -----------------------------------------------------------------------------------


def test_hinge_gradients():
    """d/dlogit: −1/n for real logits inside the margin, +1/n for fake ones, 0 beyond; G: −1/n inside."""
    real = torch.tensor([[0.0, 2.0]], requires_grad=True)
    fake = torch.tensor([[0.0, -2.0]], requires_grad=True)
    d_hinge([real], [fake]).backward()
    assert real.grad.tolist() == [[-0.5, 0.0]] and fake.grad.tolist() == [[0.5, 0.0]]
    fake = torch.tensor([[0.0, 2.0]], requires_grad=True)
    g_hinge([fake]).backward()
    assert fake.grad.tolist() == [[-0.5, 0.0]]


def test_pseudo_huber_gradient_is_smooth_at_zero():
    x = torch.zeros(1, 4, requires_grad=True)
    pseudo_huber(x, torch.zeros(1, 4), 1e-3).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max().item() == 0.0
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    pseudo_huber(x, torch.zeros(1, 2), 12.0).backward()  # d/dx = x / sqrt(|x|² + c²) = x / 13
    assert torch.allclose(x.grad, torch.tensor([[3.0, 4.0]]) / 13)


def test_half_precision_inputs_give_float32():
    x = torch.full((1, 4096), 300.0, dtype=torch.float16)  # ‖x‖² = 3.7e8 overflows float16
    out = pseudo_huber(x, torch.zeros_like(x), 1e-3)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(300.0 * 64 - 1e-3, rel=1e-6)
    assert math.isfinite(out.item())


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise():
    m = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="non-empty list"):
        d_hinge([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        g_hinge(m)  # a bare tensor, not a list of maps
    with pytest.raises(ValueError, match="2 real logit maps but 1"):
        d_hinge([m, m], [m])
    with pytest.raises(ValueError, match="shape"):
        d_hinge([m], [torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="shapes differ"):
        pseudo_huber(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
