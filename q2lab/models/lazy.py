"""Out-of-core models: decoder blocks stay in their safetensors files until a step needs them.

A 7B model in float32 is 27 GB; calibration and quantization only ever work on one decoder block
at a time, so a model loaded with ``load_model(..., lazy=True)`` keeps only the embeddings (and a
tied head) in memory.  Every other parameter is a ``meta`` tensor (shape and dtype, no storage)
until :func:`resident` reads one block from disk, and after it the block is ``meta`` again.

Reading uses positioned reads into each tensor's final buffer (:mod:`q2lab.utils.tensorfile`),
not ``mmap``: pages of a mapping a process has touched count in its resident set until unmapped,
so a mapping of a 13 GB file would make peak memory look (and, under pressure, be) as large as
the file.

What streams: calibration (:func:`q2lab.calib.capture.stream_hessians`) and block-local methods in
:func:`q2lab.quant.model.quantize_model`, whose output goes to the checkpoint block by block
(``q2lab.export.checkpoint.CheckpointWriter``).  Whole-model steps (rotations, learned transforms,
fine-tuning, ``auto``'s probes, evaluation) need the model in memory and refuse a lazy one.
GGUF sources are converted once to a safetensors folder (tensor by tensor, one shard per block,
by :mod:`q2lab.models.gguf_loader`) and stream from that folder afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from q2lab.errors import ConfigError, CorruptFileError, ModelError
from q2lab.models.arch import UnfusedExperts, find_decoder, prepare_model
from q2lab.utils.tensorfile import DTYPES, SafetensorsFiles


class LazyWeights:
    """The out-of-core state of a lazily loaded model (``model._q2lab_lazy``)."""

    def __init__(self, model: nn.Module, files: SafetensorsFiles, dtype: torch.dtype) -> None:
        self.files = files
        self.dtype = dtype
        self.layout = find_decoder(model)

    def block_prefix(self, b: int) -> str:
        return f"{self.layout.layers_path}.{b}."

    def read(self, name: str) -> torch.Tensor:
        """A float tensor of the source model in the model's dtype (integer tensors as stored)."""
        entry = self.files.entries.get(name)
        cast = self.dtype if entry is not None and DTYPES[entry[1]].is_floating_point else None
        return self.files.read(name, cast)

    def materialize(self, b: int) -> None:
        """Read block ``b``'s float parameters (and persistent buffers) from disk."""
        block, prefix = self.layout.layers[b], self.block_prefix(b)
        for mod_name, mod in block.named_modules():
            full = f"{prefix}{mod_name}." if mod_name else prefix
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.is_meta:
                    mod._parameters[pname] = nn.Parameter(self._checked(full + pname, p), requires_grad=False)
            for bname, buf in list(mod._buffers.items()):
                if buf is not None and buf.is_meta and full + bname in self.files:
                    mod._buffers[bname] = self._checked(full + bname, buf)

    def _checked(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.files:
            raise ModelError(
                f"{self.files.folder}: no tensor {name} (was this block quantized and written already, "
                "or do the file's tensor names differ from the model's?)"
            )
        t = self.read(name)
        if tuple(t.shape) != tuple(like.shape):
            raise CorruptFileError(
                f"{self.files.folder}: {name} is {list(t.shape)}, the model needs {list(like.shape)}"
            )
        return t

    def release(self, b: int) -> None:
        """Drop block ``b``'s storage (float weights and quantized codes alike): what a caller
        needs from it must be written out before."""
        for mod in self.layout.layers[b].modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and not p.is_meta:
                    mod._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)
            for bname, buf in list(mod._buffers.items()):
                if buf is not None and not buf.is_meta:
                    mod._buffers[bname] = buf.to("meta")
            if hasattr(mod, "_cached"):
                mod._cached = None
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS.  glibc raises its mmap threshold after large frees,
    so a block's tensors come from the heap, and freed heap stays in the resident set: without
    this, each block's peak is carried into the next step (and into the final write)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None


def lazy_state(model: nn.Module) -> LazyWeights | None:
    """The model's out-of-core state, or None for a model held in memory."""
    return getattr(model, "_q2lab_lazy", None)


def is_lazy(model: nn.Module) -> bool:
    return lazy_state(model) is not None


@contextlib.contextmanager
def resident(model: nn.Module, b: int) -> Iterator[None]:
    """Block ``b`` in memory for the ``with`` body (a no-op for an in-memory model)."""
    state = lazy_state(model)
    if state is None:
        yield
        return
    state.materialize(b)
    try:
        yield
    finally:
        state.release(b)


def refuse_lazy(model: nn.Module, what: str) -> None:
    """A clear error for a whole-model step asked of an out-of-core model."""
    if is_lazy(model):
        raise ConfigError(
            f"{what} needs the whole model in memory; load it without lazy (out-of-core loading "
            "streams calibration and block-local quantization only)"
        )


def load_lazy(path: Path, dtype: torch.dtype) -> nn.Module:
    """A model skeleton from ``path``'s config whose decoder blocks (and untied ``lm_head``) stay
    on disk; embeddings, final norm and other non-block tensors are read now."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"transformers cannot read the config of {path}: {e}") from e
    files = SafetensorsFiles(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed now
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prepare_model(model)
    if any(isinstance(m, UnfusedExperts) for m in model.modules()):
        raise ModelError(
            "lazy (out-of-core) loading supports dense decoders; this model has mixture-of-experts "
            "blocks, whose fused expert tensors must be split in memory"
        )
    model._q2lab_lazy = LazyWeights(model, files, dtype)
    _load_resident(model, files, dtype)
    return model.eval()


def _load_resident(model: nn.Module, files: SafetensorsFiles, dtype: torch.dtype) -> None:
    """Read every tensor outside the decoder blocks except an untied output head."""
    state: LazyWeights = model._q2lab_lazy
    blocks = state.layout.layers_path + "."
    head = model.get_output_embeddings()
    tied = head is not None and bool(getattr(model.config, "tie_word_embeddings", False))
    head_names = {n for n, p in model.named_parameters() if head is not None and p is head.weight}
    for name, p in model.named_parameters():
        if name.startswith(blocks) or name in head_names:
            continue  # blocks and an untied head stay on disk; a tied head is tied below
        owner, attr = name.rsplit(".", 1)
        mod = model.get_submodule(owner)
        mod._parameters[attr] = nn.Parameter(state._checked(name, p), requires_grad=False)
    if tied:
        head.weight = model.get_input_embeddings().weight
