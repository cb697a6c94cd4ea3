"""Find the decoder blocks and their linear layers in any Hugging Face causal LM.

No per-architecture classes: a decoder is recognised as the largest ``nn.ModuleList`` whose
entries are structurally identical modules containing ``nn.Linear`` layers.  This covers
Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3 and most decoders; architectures that store their
projections differently (GPT-2's ``Conv1D``, fused MoE experts) get an error naming what was
found instead of a silent partial quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

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
)


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


def _linear_names(block: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))


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
