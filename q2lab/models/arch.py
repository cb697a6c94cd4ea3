"""Find the decoder blocks and their linear layers in any Hugging Face causal LM.

No per-architecture classes: a decoder is recognised as the largest ``nn.ModuleList`` whose
entries are structurally identical modules containing ``nn.Linear`` layers.  This covers
Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3 and most decoders; architectures that store their
projections differently (GPT-2's ``Conv1D``) get an error naming what was found instead of a
silent partial quantization.

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) store their experts as fused 3-D
tensors in transformers; :func:`prepare_model` (called by every loader) rebuilds them as one
:class:`ExpertMLP` of three ``nn.Linear`` per expert, so each expert gets its own Hessian from the
tokens routed to it and is quantized like any other linear.  Routers (and Qwen2-MoE's
shared-expert gate) stay in float: they are tiny and an error there changes which experts run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from q2lab.errors import ModelError

# Architectures covered by tests (tiny in-process models and/or real checkpoints).
TESTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen3_moe",
)
# Linears kept in float wherever they are found: MoE routers and gates of a shared expert (one
# output row per expert or one in all; quantizing them changes the routing, not a weight error).
FLOAT_LINEARS = re.compile(r"(^|\.)(router|gate|shared_expert_gate)$")


@dataclass(frozen=True)
class DecoderLayout:
    """Where the blocks are: ``layers_path`` (e.g. ``model.layers``) and per-block linears."""

    layers_path: str
    layers: nn.ModuleList
    linear_names: tuple[str, ...]  # relative to a block, e.g. ("self_attn.q_proj", ...)

    def __len__(self) -> int:
        return len(self.layers)

    def block_linears(self, i: int) -> dict[str, nn.Linear]:
        block = self.layers[i]
        return {name: block.get_submodule(name) for name in self.linear_names}

    def full_name(self, i: int, linear: str) -> str:
        return f"{self.layers_path}.{i}.{linear}"


def text_config(model: nn.Module):
    """The decoder's own config (a multimodal wrapper's text part; the config itself otherwise):
    where head counts, head size and layer types are read."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def head_dim(config) -> int:
    """Size of one attention head: the config's ``head_dim`` where it states one (Gemma's is not
    hidden / heads), the even split of the hidden size otherwise."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def head_dim_of(model: nn.Module) -> int:
    """:func:`head_dim` of a model's decoder config."""
    return head_dim(text_config(model))


def kv_head_count(config) -> int | None:
    """Key/value heads: ``num_key_value_heads`` under grouped-query attention, every attention head
    otherwise (configs that predate GQA state none); None where the config names neither."""
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)


def _linear_names(block: nn.Module) -> tuple[str, ...]:
    return tuple(
        n for n, m in block.named_modules() if isinstance(m, nn.Linear) and not FLOAT_LINEARS.search(n)
    )


def _signature(block: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in block.named_modules())


def find_decoder(model: nn.Module) -> DecoderLayout:
    """Locate the repeated decoder blocks of ``model`` and the linears inside each block."""
    # The decoder is the list of identical blocks holding the most parameters (an MoE's
    # expert list can be longer, but it is nested inside the decoder blocks).
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        sigs = {_signature(b) for b in mod}
        if len(sigs) != 1 or not _linear_names(mod[0]):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, path, mod)
    if best is None:
        raise ModelError(_describe_failure(model))
    _, path, layers = best
    fused = [n for n, m in layers[0].named_modules() if _is_fused_experts(m)]
    if fused:
        raise ModelError(
            f"{type(model).__name__}: the experts at {', '.join(fused)} are fused 3-D tensors that q2lab "
            "cannot quantize per expert; load the model with q2lab.models.load_model (or call "
            "q2lab.models.arch.prepare_model), which splits them into one set of linears per expert"
        )
    return DecoderLayout(path, layers, _linear_names(layers[0]))


def _describe_failure(model: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in model.modules()})
    conv = [k for k in kinds if k.lower().startswith("conv1d")]
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    what = f"{type(model).__name__} (model_type={model_type})"
    if conv:
        return (
            f"unsupported architecture {what}: its projections are {', '.join(conv)} modules, not "
            "nn.Linear; q2lab quantizes decoders built from nn.Linear (Llama, Mistral, Qwen2, Gemma 3, ...)"
        )
    return (
        f"unsupported architecture {what}: found no list of identical decoder blocks containing "
        f"nn.Linear layers (module types present: {', '.join(kinds[:20])})"
    )


# --------------------------------------------------------------------------- mixture of experts
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")  # an ExpertMLP's linears


class ExpertMLP(nn.Module):
    """One gated expert, ``down(act(gate(x)) · up(x))``, as three ``nn.Linear`` (:data:`EXPERT_LINEARS`)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement for transformers' fused experts (same call: ``(hidden, top_k_index,
    top_k_weights)``, tokens flattened): a list of :class:`ExpertMLP`, so expert ``e``'s linears are
    named ``….experts.e.gate_proj`` as in per-expert checkpoints.

    Each expert runs on the tokens routed to it, so hooks on its linears see exactly its tokens
    (its own Hessian).  ``dense`` names experts that run on *every* token, their outputs weighted
    by the routing weight — 0 for tokens routed elsewhere, so the block's output is unchanged: the
    calibration uses it to give experts that received too few tokens a Hessian from all of them.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.dense: frozenset[int] = frozenset()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            hit = top_k_index == e  # (tokens, top_k)
            if e in self.dense:
                w = (top_k_weights * hit).sum(dim=-1, keepdim=True)
                out += (expert(hidden_states) * w).to(out.dtype)
                continue
            tokens, pos = torch.where(hit)
            if tokens.numel() == 0:
                continue
            y = expert(hidden_states[tokens]) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3


def _unfuse(module: nn.Module) -> UnfusedExperts:
    for extra in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(module, extra, None) is not None:
            raise ModelError(f"{type(module).__name__}: experts with biases are not supported")
    if getattr(module, "is_transposed", False):
        raise ModelError(f"{type(module).__name__}: transposed expert tensors are not supported")
    gate_up, down = module.gate_up_proj, module.down_proj
    n_exp, two_i, hidden = gate_up.shape
    if two_i % 2 or down.shape != (n_exp, hidden, two_i // 2):
        raise ModelError(
            f"{type(module).__name__}: expert tensors {tuple(gate_up.shape)} and {tuple(down.shape)} "
            "are not a gated MLP's (E, 2I, H) and (E, H, I)"
        )
    i = two_i // 2
    experts = [ExpertMLP(gate_up[e, :i], gate_up[e, i:], down[e], module.act_fn) for e in range(n_exp)]
    return UnfusedExperts(experts)


def prepare_model(model: nn.Module) -> nn.Module:
    """Make ``model`` quantizable per linear, in place: fused MoE experts become
    :class:`UnfusedExperts` (one module at a time, so the extra memory is one layer's experts).
    Every loader calls it; a model without fused experts is returned untouched."""
    fused = [name for name, m in model.named_modules() if _is_fused_experts(m)]
    for name in fused:
        model.set_submodule(name, _unfuse(model.get_submodule(name)))
    return model
