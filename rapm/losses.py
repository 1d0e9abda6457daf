"""RAPM's losses (method.md §4): hinge losses for the two discriminators and the student, pseudo-Huber.

Each discriminator returns one logit map per backbone feature map (:mod:`rapm.discriminator`). The
hinge losses average every map over its positions (and the batch) first, then over the maps, so each
feature level counts equally whatever its resolution ("averaged over heads and positions", PCM's
released code). They are plain functions of logits: the stop-gradient sg[fake] of the D step is the
caller's ``.detach()`` on the *input* of the discriminator, never here (the head weights need grads).

Re-noising before judging (method.md §3) is :func:`rapm.schedule.renoise`; it is not repeated here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_maps(name: str, logits: Sequence[Tensor]) -> None:
    if isinstance(logits, Tensor) or len(logits) == 0:
        raise ValueError(f"{name} must be a non-empty list of logit maps (one per feature map)")


def d_hinge(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """Discriminator hinge loss (method.md §4, D step), a scalar:

    L_D = mean_k [ mean(relu(1 − D_k(real))) + mean(relu(1 + D_k(fake))) ],

    k running over the logit maps of one discriminator head (one per feature level). Real and fake
    maps must pair up with equal shapes. Minimising it pushes real logits above +1, fake below −1.
    """
    _check_maps("real_logits", real_logits)
    _check_maps("fake_logits", fake_logits)
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"{len(real_logits)} real logit maps but {len(fake_logits)} fake ones")
    terms = []
    for k, (real, fake) in enumerate(zip(real_logits, fake_logits)):
        if real.shape != fake.shape:
            raise ValueError(f"logit map {k}: real shape {tuple(real.shape)} != fake shape {tuple(fake.shape)}")
        terms.append(F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return torch.stack(terms).mean()


def g_hinge(fake_logits: Sequence[Tensor]) -> Tensor:
    """Generator (student) hinge loss (method.md §4, G step; the DEFAULT form), a scalar:

    L_G = mean_k mean(relu(1 − D_k(fake))).

    The caller weights it per slot and per discriminator: Σ_n w_n [λ_rel L_G(D1) + λ_abs L_G(D2)].
    """
    _check_maps("fake_logits", fake_logits)
    return torch.stack([F.relu(1.0 - fake).mean() for fake in fake_logits]).mean()


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance (method.md §4, optional regression term), a scalar:

    mean over the batch of sqrt(‖x_i − y_i‖² + c²) − c,

    the norm over all non-batch dimensions of sample i. ≈ ‖x − y‖²/(2c) near 0, ≈ ‖x − y‖ far away;
    c > 0 (DEFAULT 1e-3, ``train.losses.huber_c``). Computed in float32 at least, in a form
    without cancellation (exact to float32 precision also for ‖x − y‖ ≪ c).
    """
    if x.shape != y.shape:
        raise ValueError(f"pseudo_huber: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"pseudo_huber: need a batch dimension, got shape {tuple(x.shape)}")
    if not c > 0:
        raise ValueError(f"pseudo_huber: c must be > 0, got {c!r}")
    diff = (x - y).reshape(x.shape[0], -1)
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    sq = diff.pow(2).sum(dim=1)
    # sqrt(s + c²) − c written as s / (sqrt(s + c²) + c): no cancellation when ‖x − y‖ ≪ c
    return (sq / (torch.sqrt(sq + c * c) + c)).mean()
