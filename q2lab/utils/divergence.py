"""KL divergence per position between two log-probability tensors: one home for the evaluator's
KLD and for ``auto``'s KLD probes (methods may not import ``eval``)."""

from __future__ import annotations

import torch


def kl_per_token(
    ref_lp: torch.Tensor, cand_lp: torch.Tensor, ref_p: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(ref ‖ cand) for each position, safe where the reference gives a token zero mass.
    ``ref_p`` (``ref_lp.exp()``) may be passed when one reference is compared many times."""
    p = ref_lp.exp() if ref_p is None else ref_p
    terms = torch.where(p > 0, p * (ref_lp - cand_lp), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)
