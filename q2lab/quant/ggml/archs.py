"""llama.cpp architectures as data, and a model's per-tensor plan for a llama.cpp file type.

``ARCHS`` maps a transformers ``model_type`` to the llama.cpp architecture, its block tensor
names, whether Q/K rows are permuted (llama's rotary layout; Gemma 3 and Qwen2 keep NeoX order) and the
norm offset (Gemma's ``1 + w`` is stored as such); :func:`gguf_name` is the one home of the
transformers → GGUF tensor naming.  The ``llamacpp`` method (:mod:`.filetype`) applies
:func:`model_plan` in place; the GGUF export (:mod:`q2lab.export.gguf`) writes files with the
same names and plan, and ``load_into`` reads them back.  A new dense architecture is one entry
here plus its metadata in the export; a mixture of experts (Mixtral as llama.cpp's ``llama``,
Qwen3-MoE as ``qwen3moe``) stacks each projection of its experts into one 3-D tensor
(:func:`expert_slice`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from q2lab.errors import ConfigError
from q2lab.quant.ggml.recipes import FilePlan, plan_file

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GEMMA3_BLOCK_NAMES = _BLOCK_NAMES | {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",  # after attention, not before the FFN
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_QWEN2_BLOCK_NAMES = _BLOCK_NAMES | {  # Qwen2 adds biases to Q, K and V
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
_QWEN3_BLOCK_NAMES = _BLOCK_NAMES | {  # Qwen3 normalizes each head's Q and K
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_PHI3_BLOCK_NAMES = {  # Phi-3 fuses Q/K/V and gate/up: llama.cpp splits them the same way
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Mixtures of experts: the router reads the FFN norm's output (kept float by llama.cpp), and each
# projection of every expert is one slice of a 3-D tensor (experts × rows × cols).
_MOE_NAMES = {k: v for k, v in _BLOCK_NAMES.items() if not k.startswith("mlp.")} | {
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
_QWEN3_MOE_NAMES = {k: v for k, v in _QWEN3_BLOCK_NAMES.items() if not k.startswith("mlp.")} | {
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture maps onto a llama.cpp one."""

    gguf_arch: str
    block_names: dict[str, str]
    permute_qk: bool  # llama.cpp's "normal" rope wants interleaved Q/K rows; NeoX-rope archs do not
    norm_offset: float  # stored norm = HF weight + offset (Gemma multiplies by 1 + w)
    experts: bool = False  # per-expert linears stacked into ffn_{gate,up,down}_exps


ARCHS = {
    "llama": ArchSpec("llama", _BLOCK_NAMES, True, 0.0),
    "gemma3_text": ArchSpec("gemma3", _GEMMA3_BLOCK_NAMES, False, 1.0),
    "qwen2": ArchSpec("qwen2", _QWEN2_BLOCK_NAMES, False, 0.0),  # NeoX rope: rows as HF stores them
    "mistral": ArchSpec("llama", _BLOCK_NAMES, True, 0.0),  # llama.cpp runs Mistral as llama
    "qwen3": ArchSpec("qwen3", _QWEN3_BLOCK_NAMES, False, 0.0),
    "phi3": ArchSpec("phi3", _PHI3_BLOCK_NAMES, False, 0.0),
    "mixtral": ArchSpec("llama", _MOE_NAMES, True, 0.0, experts=True),  # llama.cpp's llama with experts
    "qwen3_moe": ArchSpec("qwen3moe", _QWEN3_MOE_NAMES, False, 0.0, experts=True),
}
SUPPORTED_ARCHS = tuple(ARCHS)


def gguf_order(name: str) -> tuple[int, str]:
    """Sort key of GGUF tensor names in llama.cpp's order: non-block tensors, then block by block."""
    m = re.match(r"^blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """The llama.cpp mapping of ``model``'s architecture, or a clear error for the others."""
    model_type = model.config.model_type
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(ARCHS)} models; this one is {model_type!r}")
    return ARCHS[model_type]


def gguf_name(key: str, spec: ArchSpec, tied: bool) -> tuple[str, str] | None:
    """(GGUF name, transformers module or "") of the state-dict entry ``key``; ``None`` for
    entries llama.cpp does not store (a tied ``lm_head``, rotary caches).  The one home of the
    transformers → llama.cpp tensor naming, for export and for recipes applied in place."""
    if key == "lm_head.weight":
        return None if tied else ("output.weight", "lm_head")
    if key in TOP_NAMES:
        return TOP_NAMES[key], ""
    m = _LAYER.match(key)
    if not m or m.group(2) not in spec.block_names:
        if key.endswith("rotary_emb.inv_freq"):
            return None
        raise ConfigError(f"GGUF export: no GGUF name for tensor {key} of this {spec.gguf_arch} model")
    local = m.group(2)
    module = key.rsplit(".", 1)[0] if local.endswith("proj.weight") else ""
    return f"blk.{int(m.group(1))}.{spec.block_names[local]}", module


def expert_slice(key: str, spec: ArchSpec) -> tuple[str, int, str] | None:
    """(GGUF name of the 3-D tensor, expert index, transformers module) when the state-dict
    entry ``key`` is one expert's projection of a mixture-of-experts model, else None."""
    m = _LAYER.match(key)
    e = _EXPERT.match(m.group(2)) if m and spec.experts else None
    if e is None:
        return None
    return f"blk.{int(m.group(1))}.ffn_{e.group(2)}_exps.weight", int(e.group(1)), key.rsplit(".", 1)[0]


def hf_key(name: str, spec: ArchSpec) -> str:
    """The transformers state-dict key of GGUF tensor ``name``: the inverse of :func:`gguf_name`."""
    if name == "output.weight":
        return "lm_head.weight"
    for key, gname in TOP_NAMES.items():
        if gname == name:
            return key
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    local = next((k for k, v in spec.block_names.items() if m and v == m.group(2)), None)
    if local is None:
        raise ConfigError(f"GGUF tensor {name} has no transformers name in a {spec.gguf_arch} model")
    return f"model.layers.{int(m.group(1))}.{local}"


def from_gguf_layout(key: str, arr: np.ndarray, spec: ArchSpec, n_head: int, n_head_kv: int) -> np.ndarray:
    """A GGUF tensor's values (float32, transformers' shape) as transformers stores tensor
    ``key``: the norm offset taken off and llama's rotary row interleaving undone."""
    if spec.norm_offset and key.endswith("norm.weight"):
        arr = arr - np.float32(spec.norm_offset)
    if spec.permute_qk and key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = n_head if key.endswith("q_proj.weight") else n_head_kv
        arr = arr.reshape(heads, arr.shape[0] // heads // 2, 2, *arr.shape[1:]).swapaxes(1, 2)
        arr = arr.reshape(-1, *arr.shape[3:])
    return np.ascontiguousarray(arr)


def model_plan(model: torch.nn.Module, file_type: str, has_imatrix: bool) -> tuple[FilePlan, dict[str, str]]:
    """llama.cpp's per-tensor types of ``file_type`` on ``model`` without copying any weight,
    and each linear's type by transformers module name (``model.layers.3.mlp.down_proj``)."""
    spec = arch_spec(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    shapes: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for key, value in model.state_dict().items():
        if not torch.is_floating_point(value):
            continue
        expert = expert_slice(key, spec)
        if expert is not None:  # one slice of a 3-D tensor: experts × rows × cols
            name, _, module = expert
            shape, modules = shapes.setdefault(name, ((0, *value.shape), []))
            shapes[name] = ((shape[0] + 1, *shape[1:]), [*modules, module])
            continue
        named = gguf_name(key, spec, tied)
        if named is not None:
            shapes[named[0]] = (tuple(value.shape), [named[1]] if named[1] else [])
    order = sorted(shapes, key=gguf_order)
    plan = plan_for(model, file_type, [(name, shapes[name][0]) for name in order], has_imatrix)
    return plan, {module: t.type for t in plan.tensors for module in shapes[t.name][1]}


def plan_for(
    model: torch.nn.Module, file_type: str, tensors: list[tuple[str, tuple[int, ...]]], has_imatrix: bool
) -> FilePlan:
    """The recipe of ``file_type`` for ``tensors`` (GGUF name, shape; llama.cpp's order) of ``model``."""
    cfg = model.config
    return plan_file(
        file_type,
        tensors,
        n_head=cfg.num_attention_heads,
        n_head_kv=cfg.num_key_value_heads,
        n_layer=cfg.num_hidden_layers,
        has_imatrix=has_imatrix,
        n_expert=n_experts(cfg),
    )


def n_experts(cfg) -> int:
    """Experts per MoE layer (0 for a dense model), under either transformers name."""
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
