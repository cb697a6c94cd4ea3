"""The optimisation loop both stages share, and the top-k KL objective of stage 2."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from q2lab.finetune.relax import restore, snapshot
from q2lab.utils.progress import progress


def fit(
    params: list[nn.Parameter],
    loss_of: Callable[[int], torch.Tensor],
    train_ids: list[int],
    valid_ids: list[int],
    epochs: int,
    lr: float,
    seed: int = 0,
    desc: str = "finetune",
) -> tuple[float, float]:
    """Adam over ``train_ids`` (one window per step, seeded shuffle) for up to ``epochs``;
    stops when the held-out loss stops falling and keeps the best parameters seen — the
    starting point included, so tuning never makes the held-out loss worse.  Returns the
    held-out loss before and after."""
    if not params or epochs == 0:
        v = held_out(loss_of, valid_ids)
        return v, v
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    before = best = held_out(loss_of, valid_ids)
    best_state = snapshot(params)
    for ep in range(epochs):
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        for k in progress(order, f"{desc} epoch {ep + 1}/{epochs}", len(order), unit="window"):
            with torch.enable_grad():
                loss = loss_of(train_ids[k])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        v = held_out(loss_of, valid_ids)
        if v >= best:
            break
        best, best_state = v, snapshot(params)
    restore(params, best_state)
    return before, best


@torch.no_grad()
def held_out(loss_of: Callable[[int], torch.Tensor], ids: list[int]) -> float:
    """Mean loss over the held-out windows ``ids`` (no gradients): the early-stopping criterion
    both :func:`fit` and PV-tuning's P/V rounds compare against."""
    return sum(float(loss_of(i)) for i in ids) / max(len(ids), 1)


def coarsen(
    student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on the coarsened vocabulary {the teacher's top-k
    tokens, everything else}: (positions × (k+1)) each, the last column the tail.  The teacher
    is known only by its cached top-k log-probs ``t_logp`` at ids ``t_idx``.  Any f-divergence
    (KL either way, the generalized JSD) on this coarsening is a lower bound of the full one
    (coarsening never increases it) and equals it as the tail mass goes to zero."""
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    q_k = ls.gather(-1, t_idx.long())
    p_k = t_logp.float()
    p_tail = (1 - p_k.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    q_tail = (1 - q_k.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    return torch.cat([p_k, p_tail.log()], -1), torch.cat([q_k, q_tail.log()], -1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) over the last dimension, from log-probabilities (0·log 0 = 0)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence of teacher p and student q (log-probabilities over
    the last dimension), per position: β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q.

    It is bounded (by the entropy of (β, 1−β)) and symmetric at β = ½.  JSD/β → KL(p ‖ q) as
    β → 0 and JSD/(1−β) → KL(q ‖ p) as β → 1, so the ends are defined as those limits: β = 0 is
    the forward KL (mass-covering, what distillation usually minimises) and β = 1 the reverse KL
    (mode-seeking)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def topk_kl(
    student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over positions (those ``mask`` keeps) of KL(p ‖ q) between the teacher p, known by
    its top-k log-probs, and the student's logits, on the coarsened vocabulary (:func:`coarsen`)."""
    return _masked_mean(_kl(*coarsen(student_logits, t_logp, t_idx)), mask)


def topk_jsd(
    student_logits: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions of :func:`generalized_jsd` (teacher top-k vs student) on the coarsened
    vocabulary; β = 0 equals :func:`topk_kl`."""
    return _masked_mean(generalized_jsd(*coarsen(student_logits, t_logp, t_idx), beta), mask)
