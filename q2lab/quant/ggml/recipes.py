"""llama.cpp file types ("Q2_K", "Q4_K_M", "IQ2_XXS", …): which GGML type each tensor gets.

A file type is a recipe, not a type: ``llama_model_quantize`` picks a default type and then
bumps the sensitive tensors (attention V and output, ``ffn_down``, token embeddings / output)
and falls back to a 32-block type whenever a row length is not a multiple of 256.  This module
reproduces those rules (``llama_tensor_get_type`` in llama.cpp's ``llama-quant.cpp``) for dense
decoder models, so a q2lab GGUF export has the same per-tensor types as llama.cpp's file, and
reports the resulting bits per weight per tensor — on SmolLM2 (rows of 576) "Q2_K" is mostly
Q4_0 and "IQ2_XXS" mostly IQ4_NL.  Not reproduced: MoE/Falcon/70B special cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gguf

from q2lab.errors import ConfigError

# llama_ftype → default GGML type (llama_ftype_get_default_type)
DEFAULT_TYPE: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q8_0": "Q8_0",
    "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "IQ2_XXS": "IQ2_XXS",
    "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S",
    "IQ4_NL": "IQ4_NL",
}
UNSUPPORTED: dict[str, str] = {}  # file type → the GGML type its recipe needs and q2lab lacks
FALLBACK = {
    "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}
_IQ2_FILES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
_IQ3_BUMPED = ("IQ2_S", "IQ2_M")  # their bumped tensors get IQ3_S where IQ2_XXS/XS files use Q2_K
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj")


def file_types() -> list[str]:
    return list(DEFAULT_TYPE)


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def type_bits(type_name: str, rows: int, cols: int) -> int:
    """Storage bits of a (rows × cols) tensor of ``type_name`` (float types included)."""
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return rows * (cols // bs) * ts * 8


@dataclass
class TensorPlan:
    """One tensor of a GGUF file: GGUF name, (rows, cols) with cols = ne0, and its type."""

    name: str
    shape: tuple[int, ...]
    type: str
    why: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits(self) -> int:
        rows = self.numel // self.shape[-1]
        return type_bits(self.type, rows, self.shape[-1])


@dataclass
class FilePlan:
    """The per-tensor types of a file type on one model, with bpw totals."""

    file_type: str
    tensors: list[TensorPlan] = field(default_factory=list)

    def bpw(self, which: str = "all") -> float:
        """Bits per weight over ``all`` tensors or the ``linear`` ones (block weight matrices)."""
        sel = [t for t in self.tensors if which == "all" or (t.name.startswith("blk.") and len(t.shape) == 2)]
        return sum(t.bits for t in sel) / max(1, sum(t.numel for t in sel))

    def type_shares(self, which: str = "linear") -> dict[str, float]:
        """Fraction of the weights (of the block linears by default) stored in each type."""
        sel = [t for t in self.tensors if which == "all" or (t.name.startswith("blk.") and len(t.shape) == 2)]
        total = max(1, sum(t.numel for t in sel))
        out: dict[str, float] = {}
        for t in sel:
            out[t.type] = out.get(t.type, 0.0) + t.numel / total
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_type": self.file_type,
            "bpw": round(self.bpw("all"), 4),
            "bpw_linear": round(self.bpw("linear"), 4),
            "linear_types": {k: round(v, 4) for k, v in self.type_shares().items()},
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "type": t.type, "bpw": round(t.bits / t.numel, 4)}
                | ({"why": t.why} if t.why else {})
                for t in self.tensors
            ],
        }


def allows_quantization(name: str, ndim: int) -> bool:
    """``tensor_allows_quantization``: 2-D+ weights other than norms and a few tiny tensors."""
    return ndim >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_file(
    file_type: str,
    tensors: list[tuple[str, tuple[int, ...]]],
    *,
    n_head: int,
    n_head_kv: int,
    n_layer: int,
    has_imatrix: bool = False,
    n_expert: int = 0,
) -> FilePlan:
    """Per-tensor types of ``file_type`` for tensors given as (GGUF name, shape with ne0 last);
    ``n_expert`` > 0 for a mixture of experts (its rules for 4 and 8 experts).

    ``tensors`` must be in llama.cpp's order (non-block tensors, then block by block, names
    sorted): the attention-V counter that some rules read is incremented in that order.
    """
    ft = file_type.upper()
    if ft in UNSUPPORTED:
        raise ConfigError(
            f"file type {ft} needs {UNSUPPORTED[ft]} tensors, which q2lab does not implement yet; "
            f"use one of {', '.join(DEFAULT_TYPE)}"
        )
    if ft not in DEFAULT_TYPE:
        raise ConfigError(f"unknown llama.cpp file type {file_type!r}; known: {', '.join(DEFAULT_TYPE)}")
    default = DEFAULT_TYPE[ft]
    n_gqa = n_head // max(1, n_head_kv)
    tied = not any(name == "output.weight" for name, _ in tensors)
    counters = {"attn_v": 0, "ffn_down": 0}
    n_attn_v = sum(_category(name) == "attn_v" for name, _ in tensors)
    plan = FilePlan(ft)
    for name, shape in tensors:
        if not allows_quantization(name, len(shape)):
            plan.tensors.append(TensorPlan(name, tuple(shape), "F32", "kept (1-D or never quantized)"))
            continue
        if default in ("F32", "F16"):
            plan.tensors.append(TensorPlan(name, tuple(shape), default))
            continue
        cat = _category(name)
        new, why = _rule(ft, default, cat, shape[-1], tied, n_gqa, counters, n_attn_v, n_layer, has_imatrix)
        new, why = _moe_rule(ft, new, why, cat, n_gqa, n_expert)
        if cat in counters:
            counters[cat] += 1
        new, fb = _fallback(new, shape[-1])
        plan.tensors.append(TensorPlan(name, tuple(shape), new, "; ".join(s for s in (why, fb) if s)))
    return plan


def _rule(ft, new, cat, ncols, tied, n_gqa, counters, n_attn_v, n_layer, has_imatrix) -> tuple[str, str]:
    """``llama_tensor_get_type_impl`` for dense models: (type, reason)."""
    if cat == "output" or (tied and cat == "token_embd"):
        if ncols % block_size(new) != 0:
            return "Q8_0", "output: row not a multiple of the block"
        if ft in _IQ2_FILES:
            return "Q5_K", "output of an IQ2 file"
        return (new, "") if new == "Q8_0" else ("Q6_K", "output")
    bumped = "IQ3_S" if ft in _IQ3_BUMPED else "Q2_K"
    if cat == "token_embd":
        return (bumped, "token embeddings of an IQ2 file") if ft in _IQ2_FILES else (new, "")
    if ft in _IQ2_FILES:
        if cat == "attn_v":
            return ("Q4_K" if n_gqa >= 4 else bumped), "attention V of an IQ2 file"
        if cat == "ffn_down" and counters["ffn_down"] < n_layer // 8:
            return bumped, "first eighth of ffn_down"
        if cat == "attn_output" and ft in _IQ3_BUMPED:
            return "IQ3_S", "attention output of an IQ2_S/IQ2_M file"
        return new, ""
    if cat == "attn_v":
        i = counters["attn_v"]
        if ft == "Q2_K":
            return ("Q4_K" if n_gqa >= 4 else "Q3_K"), "attention V"
        if ft == "Q3_K_M":
            return ("Q5_K" if i < 2 else "Q4_K"), "attention V"
        if ft == "Q3_K_L":
            return "Q5_K", "attention V"
        if ft == "IQ4_NL" and n_gqa >= 4:
            return "Q5_K", "attention V"
        if ft in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_attn_v):
            return "Q6_K", "attention V (use_more_bits)"
        if ft == "Q4_K_S" and i < 4:
            return "Q5_K", "attention V of the first 4 layers"
        return new, ""
    if cat == "ffn_down":
        i = counters["ffn_down"]
        if ft == "Q2_K":
            return "Q3_K", "ffn_down"
        if ft == "Q3_K_M":
            return ("Q5_K" if i < n_layer // 16 else "Q4_K"), "ffn_down"
        if ft == "Q3_K_L":
            return "Q5_K", "ffn_down"
        if ft == "Q4_K_M":
            return ("Q6_K", "ffn_down (use_more_bits)") if _more_bits(i, n_layer) else (new, "")
        if ft == "IQ4_NL" and i < n_layer // 8 and not has_imatrix:
            return "Q5_K", "first eighth of ffn_down"
        if ft == "Q5_K_M" and _more_bits(i, n_layer):
            return "Q6_K", "ffn_down (use_more_bits)"
        if ft == "Q4_K_S" and i < n_layer // 8:
            return "Q5_K", "first eighth of ffn_down"
        if ft in ("Q4_0", "Q5_0") and has_imatrix and i < n_layer // 8:
            return ("Q4_1" if ft == "Q4_0" else "Q5_1"), "first eighth of ffn_down (imatrix)"
        return new, ""
    if cat == "attn_output":
        bump = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft)
        return (bump, "attention output") if bump else (new, "")
    return new, ""


def _moe_rule(ft: str, new: str, why: str, cat: str, n_gqa: int, n_expert: int) -> tuple[str, str]:
    """What ``llama_tensor_get_type_impl`` changes for a mixture of experts, on top of the dense
    rule: attention V/K and output bumped for 8 experts, IQ2 files' V for ≥ 4 experts."""
    if n_expert < 2 or cat in ("output", "token_embd"):
        return new, why
    if ft in _IQ2_FILES:
        if cat == "attn_v" and n_gqa < 4 and n_expert >= 4:
            return "Q4_K", f"attention V of an IQ2 file ({n_expert} experts)"
        if n_expert == 8 and cat == "attn_k":
            return "Q4_K", "attention K of an IQ2 file (8 experts)"
        if n_expert == 8 and cat == "attn_output":
            return "Q5_K", "attention output of an IQ2 file (8 experts)"
        return new, why
    if n_expert == 8 and cat in ("attn_v", "attn_k"):
        return "Q8_0", f"attention {cat[-1].upper()} (8 experts)"
    if n_expert == 8 and cat == "attn_output":
        if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
            return "Q5_K", "attention output (8 experts)"
        return _undo_dense_output_bump(ft, new, why)
    return new, why


def _undo_dense_output_bump(ft: str, new: str, why: str) -> tuple[str, str]:
    """With 8 experts llama.cpp skips the dense attention-output bumps (Q3_K_L's Q5_K among them)."""
    if why == "attention output":
        return DEFAULT_TYPE[ft], ""
    return new, why


def _fallback(type_name: str, ncols: int) -> tuple[str, str]:
    """``tensor_type_fallback``: a 32-block type when the row is not a multiple of the block."""
    if ncols % block_size(type_name) == 0:
        return type_name, ""
    new = FALLBACK.get(type_name, type_name)
    if ncols % block_size(new) != 0:
        new = "F16"
    return new, f"row of {ncols} is not a multiple of {block_size(type_name)}: {type_name} → {new}"
