"""The optimisation loop both stages share, and the top-k KL objective of stage 2."""

from __future__ import annotations

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
        v = _held_out(loss_of, valid_ids)
        return v, v
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    before = best = _held_out(loss_of, valid_ids)
    best_state = snapshot(params)
    for ep in range(epochs):
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        for k in progress(order, f"{desc} epoch {ep + 1}/{epochs}", len(order), unit="window"):
            with torch.enable_grad():
                loss = loss_of(train_ids[k])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        v = _held_out(loss_of, valid_ids)
        if v >= best:
            break
        best, best_state = v, snapshot(params)
    restore(params, best_state)
    return before, best


@torch.no_grad()
def _held_out(loss_of: Callable[[int], torch.Tensor], ids: list[int]) -> float:
    return sum(float(loss_of(i)) for i in ids) / max(len(ids), 1)


def topk_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p ‖ q) between the teacher p, known by its top-k log-probs
    ``t_logp`` at token ids ``t_idx`` (positions × k), and the student's logits, on the
    coarsened vocabulary {top-k tokens, everything else}.  It is a lower bound of the full KL
    (coarsening never increases a KL) and equals it as the tail mass goes to zero."""
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    q_k = ls.gather(-1, t_idx.long())
    p_k = t_logp.float().exp()
    p_tail = (1 - p_k.sum(-1)).clamp_min(0)
    q_tail = (1 - q_k.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_k * (t_logp.float() - q_k)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), 0.0)
    return kl.mean()
