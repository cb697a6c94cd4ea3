"""GGUF export: Llama, Mistral, Gemma-3, Qwen2, Qwen3, Phi-3 and the Mixtral / Qwen3-MoE mixtures
of experts to a float (F32/F16) or llama.cpp-quantized GGUF.

The file is what llama.cpp's own converter and quantizer would write: tensors named and ordered
as ``llama_model_quantize`` writes them (non-block tensors, then block by block), Q/K rows in
GGUF's rotary order (llama, Mistral; Gemma 3, Qwen2/3 and Phi-3 keep HF's NeoX order), Gemma's
``(1 + w)`` RMS norms stored as ``1 + w`` as ``convert_hf_to_gguf`` writes them, each tensor in
the type llama.cpp's recipe for the file type picks (:mod:`q2lab.quant.ggml.recipes`), quantized by q2lab's
bit-exact GGML types with the same importance matrix.  Metadata (architecture,
hyper-parameters, tokenizer) is copied from the source GGUF when the model came from one, else
built from the transformers config and tokenizer.

Everything is written to a temporary file and renamed, so a failure leaves no partial file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2lab.errors import ConfigError, CorruptFileError, ModelError
from q2lab.models.arch import head_dim as attention_head_dim
from q2lab.quant.ggml.archs import (
    arch_spec,
    expert_slice,
    from_gguf_layout,
    gguf_name,
    gguf_order,
    hf_key,
    plan_for,
)
from q2lab.quant.ggml.imatrix import Imatrix
from q2lab.quant.ggml.recipes import FilePlan
from q2lab.utils.io import atomic_path

_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


@dataclass
class GGUFTensor:
    """A float tensor of the model under its GGUF name (2-D as rows × cols, cols = ne0)."""

    name: str
    module: str  # the transformers linear it comes from ("" for embeddings and norms)
    data: np.ndarray
    blocks: np.ndarray | None = None  # GGUF bytes already held (a checkpoint of a GGML method)
    blocks_type: str | None = None


def _is_norm(key: str) -> bool:
    return key.endswith("norm.weight")


def gguf_tensors(model: torch.nn.Module) -> list[GGUFTensor]:
    """The model's weights as GGUF tensors, in llama.cpp's order (Q/K rows permuted for rotary)."""
    cfg = model.config
    spec = arch_spec(model)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out: dict[str, GGUFTensor] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    held = _ggml_blocks(model)
    experts: dict[str, dict[int, tuple[np.ndarray, str]]] = {}
    for key, data in _float_weights(model).items():
        expert = expert_slice(key, spec)
        if expert is not None:
            experts.setdefault(expert[0], {})[expert[1]] = (data, expert[2])
            continue
        named = gguf_name(key, spec, tied)
        if named is None:
            continue
        name, module = named
        if spec.norm_offset and _is_norm(key):
            data = data + np.float32(spec.norm_offset)
        blocks, btype = held.get(module, (None, None))
        local = key.rsplit(".", 2)[-2] if name.startswith("blk.") else ""
        heads = (n_head, n_head) if local == "q_proj" else (n_head, n_kv) if local == "k_proj" else None
        if heads and spec.permute_qk:  # rows are quantized independently, so GGUF bytes permute like the rows
            data = _permute(data, *heads)
            blocks = None if blocks is None else _permute(blocks, *heads)
        out[name] = GGUFTensor(name, module, data, blocks, btype)
    for name, slices in experts.items():
        out[name] = _stacked(name, [slices[e] for e in sorted(slices)], held)
    return [out[k] for k in sorted(out, key=gguf_order)]


def _stacked(name: str, slices: list[tuple[np.ndarray, str]], held: dict) -> GGUFTensor:
    """One projection of every expert as a 3-D GGUF tensor (experts × rows × cols); GGML bytes a
    q2lab checkpoint holds are stacked too when every expert has them in one type."""
    data = np.stack([d for d, _ in slices])
    kept = [held.get(module) for _, module in slices]
    blocks = btype = None
    if all(k is not None for k in kept) and len({k[1] for k in kept}) == 1:
        blocks, btype = np.stack([k[0] for k in kept]), kept[0][1]
    return GGUFTensor(name, "", data, blocks, btype)


def _float_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every weight as float32 numpy; quantized linears (q2lab checkpoints) are dequantized."""
    from q2lab.quant.linear import QuantLinear

    out: dict[str, np.ndarray] = {}
    quant = {name for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
    for name in sorted(quant):
        mod = model.get_submodule(name)
        out[f"{name}.weight"] = mod.weight_dequantized(torch.float32).detach().cpu().numpy()
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] in quant or not torch.is_floating_point(value):
            continue
        out[key] = value.detach().to(torch.float32).cpu().numpy()
    return out


def _ggml_blocks(model: torch.nn.Module) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF bytes of linears quantized by a q2lab GGML method: written unchanged if the type fits."""
    from q2lab.quant.linear import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.meta.get("format") == "ggml":
            out[name] = (mod.qtensor.tensors["blocks"].cpu().numpy(), str(mod.meta["ggml_type"]))
    return out


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """HF → GGUF rotary layout of Q/K rows (convert_hf_to_gguf's ``permute``)."""
    heads = n_head_kv if n_head != n_head_kv else n_head
    return np.ascontiguousarray(
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def source_gguf(loaded) -> Path | None:
    """The GGUF file ``loaded`` was converted from, if any (its metadata and tokenizer are reused)."""
    path = Path(loaded.info.path or "")
    return path if path.suffix == ".gguf" and path.is_file() else None


def imatrix_names(tensors: list[GGUFTensor]) -> dict[str, str]:
    """GGUF tensor name → transformers module name, for the linears (imatrix lookup)."""
    return {t.name: t.module for t in tensors if t.module}


def export_gguf(
    loaded,
    out: str | Path,
    file_type: str = "F32",
    *,
    imatrix: Imatrix | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``loaded`` as a GGUF of ``file_type``; returns the per-tensor plan and bpw report."""
    import gguf

    tensors = gguf_tensors(loaded.model)
    if imatrix is not None and arch_spec(loaded.model).experts:
        raise ConfigError(
            "an importance matrix for a mixture of experts' 3-D expert tensors is not written yet: "
            "export this model without --imatrix (file types that need one, IQ2_*, are not available)"
        )
    named_shapes = [(t.name, tuple(t.data.shape)) for t in tensors]
    plan = plan_for(loaded.model, file_type, named_shapes, imatrix is not None and len(imatrix) > 0)
    _check_imatrix(plan, imatrix)
    src = source_gguf(loaded)
    out = Path(out)
    from q2lab.utils.progress import progress as bar

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch_spec(loaded.model).gguf_arch)
        if src is not None:
            _copy_metadata(src, w)
        else:
            _metadata_from_config(loaded, w)
        w.add_file_type(_ftype_id(plan.file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        pairs = list(zip(tensors, plan.tensors))
        for t, p in bar(pairs, desc=f"GGUF {plan.file_type}") if progress else pairs:
            _add_tensor(w, t, p.type, imatrix.get(t.name) if imatrix is not None else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    report = plan.to_dict()
    report["out"] = str(out)
    report["imatrix"] = imatrix is not None
    return report


def _check_imatrix(plan: FilePlan, imatrix: Imatrix | None) -> None:
    """Every tensor whose type needs an importance matrix has one (expert tensors never do yet)."""
    from q2lab.quant.ggml.types import ggml_type

    needing = [
        t
        for t in plan.tensors
        if t.type not in ("F32", "F16")
        and ggml_type(t.type).requires_imatrix
        and t.name not in ("token_embd.weight", "output.weight")
    ]
    for t in sorted(needing, key=lambda t: "_exps." not in t.name):  # the expert refusal first
        if "_exps." in t.name:
            raise ConfigError(
                f"{plan.file_type} puts the expert tensor {t.name} in {t.type}, which needs an importance "
                "matrix; q2lab does not write one for expert tensors yet: pick a K or legacy file type"
            )
        if imatrix is None or imatrix.get(t.name) is None:
            raise ConfigError(
                f"{plan.file_type} puts {t.name} in {t.type}, which needs an importance matrix "
                "(llama.cpp refuses it: the result is garbage); pass --imatrix auto or an imatrix file"
            )


def _add_tensor(w, t: GGUFTensor, type_name: str, qw: np.ndarray | None) -> None:
    import gguf

    from q2lab.quant.ggml.types import ggml_type

    data = t.data
    if t.blocks is not None and t.blocks_type == type_name:
        w.add_tensor(t.name, np.ascontiguousarray(t.blocks), raw_dtype=gguf.GGMLQuantizationType[type_name])
        return
    if type_name == "F32":
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
        return
    if type_name == "F16":
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float16))
        return
    if qw is not None and qw.size != data.shape[-1]:
        if t.name != "token_embd.weight":
            raise ConfigError(
                f"importance of {t.name} has {qw.size} values for rows of {data.shape[-1]} (wrong model?)"
            )
        qw = None
    blocks = ggml_type(type_name).quantize_rows(data.reshape(-1, data.shape[-1]), qw)
    # experts × rows × row bytes for a 3-D tensor: the writer reads the shape off the bytes
    blocks = blocks.reshape(*data.shape[:-1], -1)
    w.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])


def _ftype_id(file_type: str) -> int:
    from q2lab.quant.ggml.llamacpp import FTYPES

    return FTYPES[file_type]


def _copy_metadata(src: Path, w) -> None:
    """Every key of the source GGUF (hyper-parameters, tokenizer) except what the writer sets."""
    stat = src.stat()
    for key, value, vtype, sub in _source_fields(str(src), stat.st_size, stat.st_mtime_ns):
        w.add_key_value(key, value, vtype, sub_type=sub)


@functools.lru_cache(maxsize=4)
def _source_fields(path: str, size: int, mtime_ns: int) -> tuple:
    """The source GGUF's key/values, parsed once per file version (gguf-py parses vocabularies slowly)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        out = []
        for key, fld in reader.fields.items():
            if key.startswith(_SKIP_KEYS):
                continue
            vtype = fld.types[0]
            sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, fld.contents(), vtype, sub))
        return tuple(out)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise CorruptFileError(f"cannot read the metadata of the source GGUF {path}: {e}") from e


def _rope_theta(cfg, layer_type: str) -> float | None:
    """``rope_theta`` from the config (transformers ≥ 5 keeps it per attention type)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params:
        params = params[layer_type]
    return getattr(cfg, "rope_theta", None) or params.get("rope_theta")


def _metadata_from_config(loaded, w) -> None:
    """Hyper-parameters (llama, mistral, gemma3, qwen2, qwen3, phi3, mixtral, qwen3_moe) and a BPE
    ("gpt2") tokenizer from transformers objects."""
    cfg = loaded.model.config
    head_dim = attention_head_dim(cfg)
    w.add_name(loaded.info.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(_rope_theta(cfg, "full_attention") or 10000.0))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    spec = arch_spec(loaded.model)
    arch = spec.gguf_arch
    if arch == "gemma3":
        _gemma3_metadata(cfg, head_dim, w)
    if arch in ("qwen3", "qwen3moe"):  # head_dim is its own hyper-parameter there (128 on every Qwen3)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if spec.experts:
        _moe_metadata(cfg, arch, w)
    # A Mistral's sliding window (v0.1: 4096) is not written: llama.cpp's converter drops it too,
    # so the file equals the model on contexts up to the window.
    _tokenizer_metadata(loaded, w)


def _moe_metadata(cfg, arch: str, w) -> None:
    """Expert counts (and Qwen3-MoE's expert width).  llama.cpp's graphs for both renormalize the
    chosen experts' softmax weights, so a Qwen3-MoE that does not cannot be expressed."""
    from q2lab.quant.ggml.archs import n_experts

    w.add_expert_count(n_experts(cfg))
    w.add_expert_used_count(int(cfg.num_experts_per_tok))
    if arch == "qwen3moe":
        if not getattr(cfg, "norm_topk_prob", True):
            raise ConfigError(
                "llama.cpp's qwen3moe graph renormalizes the top-k expert weights; this model has "
                "norm_topk_prob = false, which a GGUF cannot express"
            )
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise ConfigError(
                "llama.cpp's qwen3moe graph has experts in every layer; this model has dense layers"
            )
        w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))


def _gemma3_metadata(cfg, head_dim: int, w) -> None:
    """What llama.cpp's gemma3 loader reads beyond llama's keys: head sizes and the sliding window."""
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.query_pre_attn_scalar != head_dim:
        raise ConfigError(
            f"llama.cpp scales Gemma-3 attention by 1/sqrt(head_dim = {head_dim}); this model uses "
            f"query_pre_attn_scalar = {cfg.query_pre_attn_scalar}, which a GGUF cannot express"
        )
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        w.add_float32("gemma3.rope.freq_base_swa", float(_rope_theta(cfg, "sliding_attention") or 10000.0))


def _tokenizer_metadata(loaded, w) -> None:
    import json

    tok = loaded.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast (tokenizers) BPE tokenizer to write its vocabulary")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ModelError("GGUF export from a transformers model supports byte-level BPE tokenizers only")
    vocab = tok.get_vocab()
    n = loaded.model.config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        if i < n:
            tokens[i] = text
    special = set(getattr(tok, "all_special_ids", []))
    types = [3 if i in special else (5 if t.startswith("[PAD") else 1) for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    # llama.cpp's pre-tokenizer regex: Qwen2's splits digits one by one, the default does not
    w.add_tokenizer_pre(
        "qwen2" if arch_spec(loaded.model).gguf_arch in ("qwen2", "qwen3", "qwen3moe") else "default"
    )
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(bool(loaded.info.add_bos))


def dequantized_state(path: str | Path) -> dict[str, np.ndarray]:
    """Float values of every tensor of a GGUF file we wrote, by GGUF name (for q2lab's own eval)."""
    import gguf
    import gguf.quants as gq

    try:
        reader = gguf.GGUFReader(str(path))
        return {t.name: np.asarray(gq.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF file: {e}") from e


def load_into(loaded, path: str | Path) -> None:
    """Replace ``loaded``'s weights by the (dequantized) tensors of the GGUF at ``path``.

    The inverse of :func:`gguf_tensors`: q2lab then evaluates exactly the model llama.cpp runs.
    """
    cfg = loaded.model.config
    spec = arch_spec(loaded.model)
    values = dequantized_state(path)
    by_gguf = {t.name: t for t in gguf_tensors(loaded.model)}
    state = loaded.model.state_dict()
    for name, arr in values.items():
        key = hf_key(name, spec)
        arr = arr.reshape(by_gguf[name].data.shape)
        arr = from_gguf_layout(key, arr, spec, cfg.num_attention_heads, cfg.num_key_value_heads)
        with torch.no_grad():
            state[key].copy_(torch.from_numpy(np.array(arr)).to(state[key].dtype))


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types


@dataclass
class TensorEntry:
    """Where a tensor's bytes are in a GGUF file."""

    name: str
    type: str
    shape: tuple[int, ...]  # ne order (ne0 = row length first)
    offset: int  # absolute file offset
    nbytes: int


def tensor_index(path: str | Path) -> dict[str, TensorEntry]:
    """Tensor names, types, shapes and byte ranges of a GGUF, without parsing the vocabulary.

    gguf-py's reader materialises every token and merge (seconds for a 49k vocabulary); this
    walks the header once, skipping values, so comparing two files' tensors is cheap.
    """
    import struct

    import gguf

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:  # string
            (n,) = take("<Q")
            pos += n
        elif vtype == 9:  # array
            sub, n = take("<IQ")
            if sub in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[sub] * n
            else:
                for _ in range(n):
                    skip_value(sub)
        else:
            pos += _SCALAR_SIZES[vtype]

    try:
        magic, _version, n_tensors, n_kv = take("<4sIQQ")
        if magic != b"GGUF":
            raise CorruptFileError(f"{path} is not a GGUF file")
        alignment = 32
        for _ in range(n_kv):
            (klen,) = take("<Q")
            key = data[pos : pos + klen].decode()
            pos += klen
            (vtype,) = take("<I")
            if key == "general.alignment":
                (alignment,) = take("<I")
            else:
                skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            (nlen,) = take("<Q")
            name = data[pos : pos + nlen].decode()
            pos += nlen
            (nd,) = take("<I")
            shape = take(f"<{nd}Q")
            ttype, offset = take("<IQ")
            infos.append((name, shape, ttype, offset))
        start = pos + (-pos) % alignment
        out = {}
        for name, shape, ttype, offset in infos:
            qt = gguf.GGMLQuantizationType(ttype)
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            n = 1
            for s in shape:
                n *= s
            out[name] = TensorEntry(name, qt.name, tuple(shape), start + offset, n // bs * ts)
        if out and max(e.offset + e.nbytes for e in out.values()) > len(data):
            raise CorruptFileError(f"{path} is truncated: its tensors end past the end of the file")
        return out
    except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF file: {e}") from e


def differing_tensors(a: str | Path, b: str | Path) -> list[str]:
    """Tensors whose type, shape or bytes differ between two GGUF files (missing ones included)."""
    ia, ib = tensor_index(a), tensor_index(b)
    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    out = sorted(set(ia) ^ set(ib))
    for name in sorted(set(ia) & set(ib)):
        x, y = ia[name], ib[name]
        same = (x.type, x.shape, x.nbytes) == (y.type, y.shape, y.nbytes)
        if not same or da[x.offset : x.offset + x.nbytes] != db[y.offset : y.offset + y.nbytes]:
            out.append(f"{name}: {x.type} vs {y.type}")
    return out
