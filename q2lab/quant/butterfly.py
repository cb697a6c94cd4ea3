"""ButterflyQuant-style learned rotations (Xu et al., 2025) + GPTQ, weight-only.

Why: QuaRot's Hadamard rotation is the best *worst-case* spreader of outliers, but one fixed
matrix for every layer; ButterflyQuant observes that layers differ in where their outliers are
and learns one rotation per layer, parameterized so that it stays orthogonal for every value of
its parameters — a butterfly of Givens rotations, O(n log n) parameters and cost
(:class:`q2lab.transforms.butterfly.Butterfly`; sizes n = p·2^k that are not powers of two get a
learnable p × p orthogonal factor on the Hadamard base order, e.g. 576 = 36·16, 1536 = 12·128).

Here, for each group of linears that read one input (q/k/v, gate/up, o, down) with stacked
weight W (m × n) and input second moment H from the shared store:

1. **Start** from a random Hadamard: T = B·D with the butterfly B at its Hadamard angles and a
   seeded sign vector D (the rotation QuaRot/QuIP# would use on that input).
2. **Learn** B's parameters with Adam to minimize, on the Hessian alone (no forward passes),
   ``tr(E' H' E'ᵀ) / tr(W H Wᵀ) + λ · U(H')`` where W' = W·Tᵀ and H' = T·H·Tᵀ are the weight and
   input statistics after the transform, E' = W' − RTN(W') is the round-to-nearest error of the
   bit-width and groups being targeted, with LSQ-style gradients
   (:func:`q2lab.quant.uniform.fake_quant_lsq`: the grid step of each group stays in the graph), and
   ``U(H') = Var(diag H') / mean(diag H')²`` is the uniformity regularizer on the transformed
   activations: it favours rotations that leave every input channel with the same energy, the
   condition under which one group grid fits all columns.  Rows are sampled per step (rows are
   independent given H').  The paper's exact loss, regularizer and schedule were not reachable
   from here; these are q2lab's choices, stated in the report notes.
3. **Round** W' with GPTQ against H' (the derived Hessian: the shared store, never recalibrated).

Storage: the uniform GPTQ codes of W' plus the transform — the sign vector (n bits) and the
butterfly's parameters in fp16 (rounded *before* GPTQ, so decoding rebuilds exactly the matrix
GPTQ saw).  Each linear stores its own copy, so q/k/v pay it three times: +0.02 bpw on
SmolLM2-135M.  Decoding is ``W = W'·B·D``; the transform is absorbed into the decoded weight, so
with cached weights it costs nothing at run time (an on-the-fly kernel would apply B to the
activations, O(n log n) per token, as QuIP#'s Hadamard does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from q2lab.calib.hessian import Hessian
from q2lab.errors import ConfigError
from q2lab.quant import uniform
from q2lab.quant.base import QuantizedTensor, option, register, require_ints
from q2lab.quant.gptq import GPTQ, GPTQConfig, gptq_quantize
from q2lab.transforms.butterfly import Butterfly
from q2lab.transforms.hadamard import pack_signs, random_signs, unpack_signs

# Eigen-directions of H the uniformity regularizer reads (its top ones; the rest of H's energy is
# what every rotation spreads anyway).
ROOT_RANK = 128


@dataclass
class ButterflyConfig(GPTQConfig):
    seed: int = option(0, "seed of the random sign vector D and of the row sampling")
    steps: int = option(100, "Adam steps per input group (0 = the fixed random-Hadamard baseline)")
    lr: float = option(0.01, "Adam learning rate on the Givens angles and the p-factor's generator")
    rows: int = option(256, "weight rows sampled per step (0 = all rows)")
    uniformity: float = option(0.1, "weight λ of the uniformity regularizer Var(diag H')/mean(diag H')²")

    def validate(self) -> None:
        super().validate()
        require_ints(self, ("seed", "steps", "rows"), 0)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.uniformity, (int, float)) and self.uniformity >= 0):
            raise ConfigError(f"uniformity must be a non-negative number, got {self.uniformity!r}")


def conjugate(bf: Butterfly, h: torch.Tensor) -> torch.Tensor:
    """``B·h·Bᵀ`` for a symmetric h (two row transforms: h·Bᵀ, then B·(h·Bᵀ))."""
    return bf.apply(bf.apply(h).T)


def energy_uniformity(d: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of per-channel input energies ``d`` (diag of a Hessian)."""
    return d.var(unbiased=False) / d.mean().clamp_min(1e-30) ** 2


def hessian_root(h: torch.Tensor, rank: int) -> torch.Tensor:
    """R (r × n) with RᵀR ≈ h from h's top ``rank`` eigenpairs: diag(B h Bᵀ) is then the column
    sums of (R·Bᵀ)², one O(r·n log n) transform instead of two n × n ones."""
    vals, vecs = torch.linalg.eigh(h.double())
    top = torch.argsort(vals, descending=True)[: min(rank, h.shape[0])]
    return (vals[top].clamp_min(0).sqrt()[:, None] * vecs[:, top].T).to(h.dtype)


def proxy_loss(bf: Butterfly, wd: torch.Tensor, hd: torch.Tensor, cfg: ButterflyConfig) -> torch.Tensor:
    """Relative RTN proxy loss tr(E' H' E'ᵀ) / tr(W H Wᵀ) of the rows ``wd`` (signs applied) after
    ``bf``, computed in the input's own basis, tr((E'B) H_d (E'B)ᵀ): mapping the rows' error back
    costs O(rows · n log n) where forming H' would cost O(n² log n)."""
    wp = bf.apply(wd)
    back = bf.apply_t(wp - uniform.fake_quant_lsq(wp, cfg.bits, cfg.group_size))
    ref = ((wd @ hd) * wd).sum().clamp_min(1e-30)
    return ((back @ hd) * back).sum() / ref


def rotated_uniformity(bf: Butterfly, root: torch.Tensor) -> torch.Tensor:
    """The uniformity regularizer of H' = B·H·Bᵀ, from a root of H (:func:`hessian_root`)."""
    return energy_uniformity((bf.apply(root) ** 2).sum(0))


def learn_butterfly(
    w: torch.Tensor, h: torch.Tensor, signs: torch.Tensor, cfg: ButterflyConfig
) -> tuple[Butterfly, dict[str, float]]:
    """Adam on the butterfly of one input group (see the module doc); the result's parameters are
    rounded to fp16.  ``w`` (m × n) and ``h`` (n × n, E[xxᵀ]) are float32."""
    bf = Butterfly(w.shape[1])
    wd = w * signs.float()[None, :]
    hd = h * (signs[:, None] * signs[None, :]).float()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    first = last = float("nan")
    if cfg.steps:
        root = hessian_root(hd, ROOT_RANK) if cfg.uniformity else None
        opt = torch.optim.Adam(bf.parameters(), lr=cfg.lr)
        take = cfg.rows if 0 < cfg.rows < w.shape[0] else w.shape[0]
        for step in range(cfg.steps):
            idx = torch.randperm(w.shape[0], generator=gen)[:take] if take < w.shape[0] else slice(None)
            loss = proxy_loss(bf, wd[idx], hd, cfg)
            if root is not None:
                loss = loss + cfg.uniformity * rotated_uniformity(bf, root)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0:
                first = float(loss.detach())
            last = float(loss.detach())
    bf.round_params_()
    return bf, {"loss_first": first, "loss_last": last}


def transformed(
    bf: Butterfly, w: torch.Tensor, h: torch.Tensor, signs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W·D·Bᵀ and H' = B·D·H·D·Bᵀ, formed in float64."""
    with torch.no_grad():
        wd = w.double() * signs[None, :]
        hd = h * signs[:, None] * signs[None, :]
        return bf.apply(wd), conjugate(bf, hd)


@register()
class ButterflyQuant(GPTQ):
    name = "butterfly"
    config_cls = ButterflyConfig
    summary = "ButterflyQuant: a learned butterfly rotation per input group (Hessian proxy), then GPTQ"

    def quantize_stack(self, weights, hessian, cfg: ButterflyConfig) -> list[QuantizedTensor]:
        w = torch.cat([x.detach().float() for x in weights])
        n = w.shape[1]
        h64 = hessian.xtx.double() / max(hessian.n, 1)
        # Inputs that are always zero: their weights are free, and rotating them in would cost range.
        w[:, torch.diagonal(h64) == 0] = 0.0
        signs = random_signs(n, cfg.seed).double()
        t0 = time.time()
        bf, stats = learn_butterfly(w, h64.float(), signs, cfg)
        wp, hp = transformed(bf, w, h64, signs)
        result = gptq_quantize(wp.float(), Hessian(hp * max(hessian.n, 1), hessian.n), cfg)
        meta = {
            "transform": "butterfly",
            "steps": cfg.steps,
            "proxy_first": _round(stats["loss_first"]),
            "proxy_last": _round(stats["loss_last"]),
            "learn_seconds": round(time.time() - t0, 2),
        }
        out = self.encode_stack(weights, result, cfg, meta)
        angles, skew = bf.params()
        for qt in out:
            qt.tensors["bf_signs"] = pack_signs(signs)
            qt.bit_counts["bf_signs"] = n
            qt.tensors["bf_angles"] = angles.to(torch.float16)
            qt.bit_counts["bf_angles"] = angles.numel() * 16
            if skew is not None:
                qt.tensors["bf_skew"] = skew.to(torch.float16)
                qt.bit_counts["bf_skew"] = skew.numel() * 16
        return out

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        n = qt.shape[1]
        t = qt.tensors
        bf = Butterfly.from_params(
            n, t["bf_angles"].float(), t["bf_skew"].float() if "bf_skew" in t else None
        )
        signs = unpack_signs(t["bf_signs"], n).double()
        with torch.no_grad():
            wp = uniform.decode(qt).double()
            return (wp @ bf.dense(torch.float64)) * signs[None, :]


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 5)
