"""Whole-model rotations (QuaRot, SpinQuant, ButterflyQuant): norm fusion, R1 and R2.

Why: a residual-stream rotation R1 spreads outlier channels over all channels, so every linear
that reads or writes the stream sees incoherent weights and quantizes better — and the float
model computes exactly the same function, because RMSNorm commutes with orthogonal maps:
``rms(h R) = rms(h)``.  Row-vector convention throughout: the rotated stream is ``h' = h R1``.

What changes, for a block of a pre-norm decoder (Llama, Mistral, Qwen2/3, Gemma 1; Phi-3's fused
projections and a mixture of experts' router and experts are readers and writers like any
other, see :class:`NormPlan`):

* **Norm fusion.**  A norm ``n(h) = n0(h)·diag(γ)`` feeding linears W (q/k/v, gate/up) becomes
  the weightless ``n0`` and ``W ← W·diag(γ)``; the final norm's γ goes into ``lm_head``.  Gemma
  norms scale by ``1 + w``: γ = 1 + w, and w is set to 0.  Tied embeddings are untied first
  (``lm_head`` becomes ``E·diag(γ)·R1``, the embedding ``E·R1``): one more float vocab × d matrix.
* **R1.**  ``E ← E R1``; readers ``W ← W R1`` (input side); writers o/down ``W ← R1ᵀ W`` (output
  side, their biases ``b ← b R1``).
* **R2** (one per block, head_dim × head_dim): each value head ``v ← v R2`` (``W_v`` rows of a head
  ``← R2ᵀ W_v``), so the attention output per head is rotated and o_proj reads it through
  ``W_o[:, head] ← W_o[:, head] R2``.  Softmax weights are scalars per head: exact.
* **Sandwich norms** (Gemma 2/3 ``post_attention_layernorm`` / ``post_feedforward_layernorm``
  normalize a block's output *before* the residual add).  No diagonal γ survives a rotation
  there, so o/down stay unrotated on the output side and the post-norm becomes
  :class:`DenseNorm`, ``n0(y)·diag(γ)·R1``: a float d × d matrix applied online, twice per
  block (Gemma-3-270M: 2 · 640² = 0.82 M multiply-adds per token per block, +15 % of a block's
  linear work).  That is the only online cost of these rotations.

Not done here: QuaRot/SpinQuant's online Hadamards R3 (on q/k after RoPE, for a quantized KV
cache) and R4 (before down_proj, for quantized activations): q2lab quantizes weights only, and
down_proj keeps its own basis (its Hessian is unchanged).

Calibration is never rerun: each quantized linear reads an input ``x' = x·A`` with a known map A
(``A = diag(γ)⁻¹ R1`` for readers of a fused norm, ``A = blockdiag(R2)`` for o_proj), so its
Hessian is ``Aᵀ H A`` from the shared store (:class:`q2lab.calib.derived.DerivedHessians`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from q2lab.errors import ModelError, ShapeError
from q2lab.models.arch import find_decoder, kv_head_count, text_config
from q2lab.transforms.hadamard import factor, hadamard_matrix, random_signs


@dataclass(frozen=True)
class NormPlan:
    """Where the norms of one block architecture sit and which modules they feed.

    Readers and writers are module names inside a block, or ``fnmatch`` patterns (``*`` for an
    expert's index) that must each match at least one module with a 2-D ``weight``: a mixture
    of experts rotates its router and every expert's gate/up on the input side and every
    expert's down on the output side.  The value heads are the last ``kv_heads · head_dim``
    output rows of ``value`` (all of ``v_proj``; the tail of Phi-3's fused ``qkv_proj``)."""

    attn_in: str
    mlp_in: str
    attn_out: str | None  # sandwich post-norms (Gemma 2/3), None for plain pre-norm blocks
    mlp_out: str | None
    offset: float  # 1.0 when the norm scales by (1 + w) (Gemma), else 0.0
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    attn_writer: str = "self_attn.o_proj"
    mlp_writers: tuple[str, ...] = ("mlp.down_proj",)
    value: str = "self_attn.v_proj"

    def roles(self, block: nn.Module) -> BlockRoles:
        """The plan resolved on one block: concrete module names, patterns expanded."""
        names = [n for n, m in block.named_modules() if _weight_2d(m) is not None]

        def resolve(patterns: tuple[str, ...]) -> tuple[str, ...]:
            out = []
            for pat in patterns:
                found = [n for n in names if fnmatch.fnmatchcase(n, pat)]
                if not found:
                    raise ModelError(f"rotations expect a module {pat!r} in each decoder block; none found")
                out += found
            return tuple(out)

        return BlockRoles(
            readers=((self.attn_in, resolve(self.attn_readers)), (self.mlp_in, resolve(self.mlp_readers))),
            writers=(
                (resolve((self.attn_writer,))[0], self.attn_out),
                *((w, self.mlp_out) for w in resolve(self.mlp_writers)),
            ),
            attn_writer=self.attn_writer,
            value=self.value,
        )


@dataclass(frozen=True)
class BlockRoles:
    """A :class:`NormPlan` on one block: each pre-norm with the modules reading it, each writer
    to the residual stream with its sandwich post-norm (None: pre-norm block), o_proj, and the
    module holding the value heads."""

    readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[tuple[str, str | None], ...]
    attn_writer: str
    value: str


_PRE = NormPlan("input_layernorm", "post_attention_layernorm", None, None, 0.0)
_GEMMA = NormPlan("input_layernorm", "post_attention_layernorm", None, None, 1.0)
_SANDWICH = NormPlan(
    "input_layernorm",
    "pre_feedforward_layernorm",
    "post_attention_layernorm",
    "post_feedforward_layernorm",
    1.0,
)
# Phi-3: one fused q/k/v projection and one fused gate/up projection read the two norms.
_PHI3 = NormPlan(
    "input_layernorm",
    "post_attention_layernorm",
    None,
    None,
    0.0,
    attn_readers=("self_attn.qkv_proj",),
    mlp_readers=("mlp.gate_up_proj",),
    value="self_attn.qkv_proj",
)
# Mixtures of experts (fused experts split per expert by q2lab.models.arch.prepare_model): the
# router reads the normed stream too, so it is rotated with the experts (and stays in float).
_MOE = NormPlan(
    "input_layernorm",
    "post_attention_layernorm",
    None,
    None,
    0.0,
    mlp_readers=("mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
    mlp_writers=("mlp.experts.*.down_proj",),
)
PLANS: dict[str, NormPlan] = {
    "llama": _PRE,
    "mistral": _PRE,
    "qwen2": _PRE,
    "qwen3": _PRE,
    "phi3": _PHI3,
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
    "gemma": _GEMMA,
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "gemma3": _SANDWICH,
}


def _weight_2d(module: nn.Module) -> torch.Tensor | None:
    """The module's 2-D ``weight`` (an ``nn.Linear``'s, or a router's), else None."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.ndim == 2 else None


class DenseNorm(nn.Module):
    """``y ↦ n0(y)·M``: an RMSNorm whose diagonal scale became a dense d × d matrix (a rotated
    sandwich norm).  Computed in at least float32, like Gemma's norms, and cast back to the input
    dtype; the matrix is stored in the model's dtype."""

    def __init__(self, matrix: torch.Tensor, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(matrix.to(dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y @ self.weight.to(y.dtype)).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


@dataclass
class Rotated:
    """What :func:`rotate_model` did: the input map of each quantizable linear (full module
    name → ``(A, unseen)``, see :data:`q2lab.calib.derived.InputMap`; absent = identity) and
    notes for the report."""

    input_maps: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    untied: bool = False
    dense_norms: list[str] = field(default_factory=list)
    dead_channels: int = 0  # norm channels with scale exactly 0 (their Hessian is a stand-in)

    def notes(self) -> list[str]:
        out = ["norm scales fused into the linears that read them; residual stream rotated by R1"]
        if self.untied:
            out.append("tied embeddings untied by the rotation: lm_head is a separate float matrix")
        if self.dead_channels:
            out.append(
                f"{self.dead_channels} norm channels have scale 0: the store cannot see them; their "
                "rotated second moment is what RMS normalization leaves of the others'"
            )
        if self.dense_norms:
            out.append(f"{len(self.dense_norms)} sandwich norms became dense d×d float maps (DenseNorm)")
        return out


def plan_for(model: nn.Module) -> NormPlan:
    """The norm plan of ``model``'s architecture, or one clear error naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(getattr(config, "get_text_config", lambda: config)(), "model_type", None)
    model_type = model_type or getattr(config, "model_type", "?")
    if model_type not in PLANS:
        raise ModelError(
            f"rotations cannot fuse the norms of model type {model_type!r}: supported are "
            f"{', '.join(sorted(PLANS))} (pre-norm RMSNorm decoders, Phi-3's fused projections, "
            "Mixtral / Qwen3-MoE experts, and Gemma's sandwich norms)"
        )
    return PLANS[model_type]


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's fixed rotation: ``diag(s)·H_n/√n`` with seeded random signs s (float64, n × n).
    Non-power-of-two n uses the Kronecker constructions of :mod:`q2lab.transforms.hadamard`."""
    factor(n)  # one clear error for a width with no Hadamard construction
    return random_signs(n, seed).double()[:, None] * hadamard_matrix(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal n × n matrix (QR of a seeded Gaussian, signs fixed), float64."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def zero_scale_channels(model: nn.Module) -> torch.Tensor:
    """Residual-stream channels that some pre-norm scales by exactly 0 (sorted indices).

    Why they matter: such a norm annihilates the channel for its readers, and models use that to
    park massive activations (Gemma-3-270M: in most pre-FFN norms, thousands of times the other
    channels' size).  A rotation that mixes the channel into the others leaves the readers to
    cancel it through W·R1 — exact in float, destroyed by 2-bit rounding.  Rotations keep these
    channels fixed (:func:`fix_channels`)."""
    plan = plan_for(model)
    layout = find_decoder(model)
    d = model.get_input_embeddings().weight.shape[1]
    dead = torch.zeros(d, dtype=torch.bool)
    for block in layout.layers:
        for norm_name in (plan.attn_in, plan.mlp_in):
            dead |= _gamma(block.get_submodule(norm_name), plan.offset).cpu() == 0
    return torch.nonzero(dead).flatten()


def fix_channels(r: torch.Tensor, fixed: torch.Tensor, d: int) -> torch.Tensor:
    """The d × d rotation that is the identity on channels ``fixed`` and ``r`` ((d − k) × (d − k))
    on the others, in their order."""
    rest = torch.ones(d, dtype=torch.bool)
    rest[fixed] = False
    free = int(rest.sum())
    if tuple(r.shape) != (free, free):
        raise ShapeError(f"rotation of the free channels must be {free} × {free}, got {tuple(r.shape)}")
    out = torch.eye(d, dtype=torch.float64)
    idx = torch.nonzero(rest).flatten()
    out[idx[:, None], idx[None, :]] = r.double()
    return out


def _check_orthogonal(r: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if tuple(r.shape) != (n, n):
        raise ShapeError(f"{what} must be {n} × {n}, got {tuple(r.shape)}")
    r = r.double()
    err = float((r.T @ r - torch.eye(n, dtype=torch.float64)).abs().max())
    if err > 1e-6:
        raise ShapeError(f"{what} is not orthogonal (max |RᵀR − I| = {err:.2e})")
    return r


def _gamma(norm: nn.Module, offset: float) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        raise ModelError(f"cannot fuse {type(norm).__name__}: it has no per-channel weight")
    return w.detach().double() + offset


def _reset(norm: nn.Module, offset: float) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0 - offset)


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if bias is not None and getattr(linear, "bias", None) is not None:
            linear.bias.copy_(bias.to(linear.bias.dtype))


def _untie(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight if it shares the embedding's; returns whether it did."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone())
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


def value_heads(model: nn.Module, block: nn.Module, value: str) -> tuple[int, int, int]:
    """(head_dim, KV heads, first row of the value heads in ``value``'s output): the value heads
    are its last ``kv_heads · head_dim`` rows (all of a v_proj, the tail of a fused qkv_proj)."""
    attn = block.get_submodule(value.rsplit(".", 1)[0])
    v = block.get_submodule(value)
    hd = getattr(attn, "head_dim", None)
    kv_heads = kv_head_count(text_config(model))
    if not isinstance(hd, int) or not isinstance(kv_heads, int) or kv_heads * hd > v.out_features:
        raise ModelError(
            f"cannot rotate value heads: head_dim {hd!r} × {kv_heads!r} KV heads does not fit {value}'s "
            f"{v.out_features} outputs"
        )
    return hd, kv_heads, v.out_features - kv_heads * hd


@torch.no_grad()
def rotate_model(
    model: nn.Module, r1: torch.Tensor, r2: torch.Tensor | list[torch.Tensor] | None = None
) -> Rotated:
    """Fuse the norms of ``model`` and rotate it in place by R1 (d × d) and R2 (head_dim ×
    head_dim, one for all blocks or a list with one per block; None = no R2).  The float model
    computes the same logits; the returned maps derive each linear's Hessian from the store."""
    plan = plan_for(model)
    layout = find_decoder(model)
    emb = model.get_input_embeddings()
    d = emb.weight.shape[1]
    r1 = _check_orthogonal(r1, d, "R1")
    r2s = _per_block(r2, len(layout))
    out = Rotated(untied=_untie(model))
    # Embedding rows are residual-stream vectors; Gemma's √d embedding scale is a scalar.
    emb.weight.copy_((emb.weight.double() @ r1).to(emb.weight.dtype))
    final = _final_norm(model, layout)
    head = model.get_output_embeddings()
    _set(head, head.weight.double() * _gamma(final, plan.offset)[None, :] @ r1)
    _reset(final, plan.offset)
    for b, block in enumerate(layout.layers):
        _rotate_block(model, block, plan, r1, r2s[b], out, lambda n, b=b: layout.full_name(b, n))
    return out


def _per_block(r2, blocks: int) -> list[torch.Tensor | None]:
    if r2 is None or isinstance(r2, torch.Tensor):
        return [r2] * blocks
    if len(r2) != blocks:
        raise ShapeError(f"R2 needs one matrix per block ({blocks}), got {len(r2)}")
    return list(r2)


def _final_norm(model: nn.Module, layout) -> nn.Module:
    owner = model.get_submodule(layout.layers_path.rsplit(".", 1)[0]) if "." in layout.layers_path else model
    norm = getattr(owner, "norm", None)
    if norm is None:
        raise ModelError(f"cannot find the final norm next to {layout.layers_path} (expected `.norm`)")
    return norm


def _rotate_block(model, block, plan: NormPlan, r1, r2, out: Rotated, full) -> None:
    roles = plan.roles(block)
    for norm_name, readers in roles.readers:
        norm = block.get_submodule(norm_name)
        gamma = _gamma(norm, plan.offset)
        dead = gamma == 0  # a channel the norm zeroes: invisible to the store, not to R1's mix
        inv = torch.where(
            dead, torch.zeros_like(gamma), 1.0 / torch.where(dead, torch.ones_like(gamma), gamma)
        )
        # One map object per norm: its readers share one derived Hessian.
        found = (inv[:, None] * r1, r1[dead] if bool(dead.any()) else None)
        out.dead_channels += int(dead.sum())
        for name in readers:
            lin = block.get_submodule(name)
            _set(lin, lin.weight.double() * gamma[None, :] @ r1)
            out.input_maps[full(name)] = found
        _reset(norm, plan.offset)
    for writer, post in roles.writers:
        lin = block.get_submodule(writer)
        if post is None:  # pre-norm block: the writer's output joins the rotated stream
            bias = None if getattr(lin, "bias", None) is None else lin.bias.double() @ r1
            _set(lin, r1.T @ lin.weight.double(), bias)
        elif full(post) not in out.dense_norms:  # sandwich norm: rotate after normalizing
            norm = block.get_submodule(post)
            matrix = _gamma(norm, plan.offset)[:, None] * r1
            dense = DenseNorm(matrix, float(getattr(norm, "eps", 1e-6)), norm.weight.dtype)
            block.set_submodule(post, dense)
            out.dense_norms.append(full(post))
    if r2 is not None:
        _rotate_heads(model, block, roles, r2, out, full)


def _rotate_heads(model, block, roles: BlockRoles, r2: torch.Tensor, out: Rotated, full) -> None:
    hd, kv_heads, first = value_heads(model, block, roles.value)
    v = block.get_submodule(roles.value)
    o = block.get_submodule(roles.attn_writer)
    r2 = _check_orthogonal(r2, hd, "R2")
    w = v.weight.double().clone()
    wv = w[first:].reshape(kv_heads, hd, -1)
    w[first:] = torch.einsum("ji,hjk->hik", r2, wv).reshape(kv_heads * hd, -1)
    bias = None
    if v.bias is not None:
        bias = v.bias.double().clone()
        bias[first:] = (bias[first:].reshape(kv_heads, hd) @ r2).reshape(-1)
    _set(v, w, bias)
    heads = o.in_features // hd
    blockdiag = torch.block_diag(*[r2] * heads)
    _set(o, o.weight.double() @ blockdiag)
    out.input_maps[full(roles.attn_writer)] = (blockdiag, None)


def cayley_step(
    x: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    momentum: torch.Tensor | None = None,
    beta: float = 0.0,
    max_angle: float | None = None,
) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (SpinQuant's optimizer, Li et al. 2020).

    The Riemannian gradient's skew generator ``W = G Xᵀ − X Gᵀ`` (optionally averaged into
    ``momentum`` in place, ``m ← β m + W``) moves X along the Cayley curve
    ``X ← (I + lr/2·m)⁻¹ (I − lr/2·m) X``, which is orthogonal for any step size because m is
    skew: rotations stay rotations without projection.  To first order the step is
    ``X − lr·(G − X Gᵀ X)``, gradient descent on the manifold.  ``max_angle`` caps the step so
    that no plane turns by more than that many radians (the Cayley map of ``lr·m`` turns by
    ``2·atan(lr·σ/2)`` for each singular value σ of m): the gradient's scale changes by orders
    of magnitude with the bit width, a fixed lr would either crawl or jump at random.
    """
    x64, g64 = x.detach().double(), grad.detach().double()
    w = g64 @ x64.T - x64 @ g64.T
    if momentum is not None:
        momentum.mul_(beta).add_(w.to(momentum.dtype))
        w = momentum.double()
    if max_angle is not None:
        sigma = float(torch.linalg.matrix_norm(w, 2))
        if sigma > 0:
            lr = min(lr, 2.0 * math.tan(max_angle / 2.0) / sigma)
    eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
    step = torch.linalg.solve(eye + 0.5 * lr * w, (eye - 0.5 * lr * w) @ x64)
    return step.to(x.dtype)


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to ``x`` (polar factor ``U Vᵀ`` of its SVD), float64: removes
    the float32 drift of many Cayley steps before the rotation is applied."""
    u, _, vh = torch.linalg.svd(x.double())
    return u @ vh
