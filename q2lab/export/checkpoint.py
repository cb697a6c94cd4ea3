"""q2lab quantized checkpoints, the writing side: safetensors file(s) plus a JSON manifest.

Layout of a checkpoint folder (read back by :func:`q2lab.models.checkpoint.load_checkpoint`,
which ``load_model`` calls on such a folder)::

    q2lab_manifest.json   format, base model provenance, quantization report, per-linear format
    model.safetensors     every QuantizedTensor's stored tensors ("<linear>.<name>") and every
                          float tensor of the model (embeddings, norms, biases), tied ones once
    config.json, tokenizer files  (so the folder loads without the original model)
    block_NNNN.safetensors  (streamed checkpoints only) decoder block NNNN, written while it was
                          in memory; the manifest's ``files`` lists every weights file

The format (manifest name, version, weights file) is defined by the reader, which this writer
follows; a loaded checkpoint's logits are bit-identical to those of the model that was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from q2lab.models.checkpoint import FORMAT_VERSION, WEIGHTS
from q2lab.models.lazy import lazy_state
from q2lab.models.loader import CHECKPOINT_MANIFEST, LoadedModel
from q2lab.quant.linear import QuantLinear
from q2lab.transforms.rotate import DenseNorm
from q2lab.utils.io import atomic_path, write_json_atomic
from q2lab.utils.provenance import versions
from q2lab.utils.tensorfile import write_safetensors

PLAN_FILE = "mixed-plan.yaml"  # auto's plan as a `mixed` method entry


def save_checkpoint(loaded: LoadedModel, out: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` (quantized in place by :func:`quantize_model`) to folder ``out``."""
    with CheckpointWriter(loaded, out) as writer:
        writer.finish(report)
    return Path(out)


class CheckpointWriter:
    """Writes a checkpoint in parts: :meth:`block` puts one decoder block in a file of its own
    while it is in memory (what an out-of-core quantization needs: the block is dropped right
    after), :meth:`finish` writes the rest (every tensor not written yet) and the manifest.

    Used as a context manager: the folder is built under a temporary name and appears at ``out``
    only when :meth:`finish` ran and the ``with`` body ended without an error."""

    def __init__(self, loaded: LoadedModel, out: str | Path, layers_path: str | None = None) -> None:
        self.loaded = loaded
        self.layers_path = layers_path  # where the decoder blocks are, for :meth:`block`
        self.out = Path(out)
        self.quantized: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        self.dense_norms: dict[str, float] = {}
        self.files: list[str] = []
        self._written: set[str] = set()  # module-name prefixes already in a file
        self._finished = False

    def __enter__(self) -> CheckpointWriter:
        self._ctx = atomic_path(self.out, is_dir=True)
        self.tmp = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None and not self._finished:
            error = RuntimeError(f"checkpoint {self.out}: finish() was not called")
            self._ctx.__exit__(RuntimeError, error, None)  # discards the temporary folder
            raise error
        return self._ctx.__exit__(exc_type, exc, tb)

    def block(self, b: int) -> None:
        """Write decoder block ``b`` (quantized linears and float tensors) to a file of its own."""
        if self.layers_path is None:
            raise ValueError("CheckpointWriter.block needs layers_path (find_decoder(model).layers_path)")
        prefix = f"{self.layers_path}.{b}"
        self._write(f"block_{b:04d}.safetensors", prefix)
        self._written.add(prefix + ".")

    def finish(self, report: dict[str, Any] | None = None) -> None:
        """Write every tensor not written yet, the config, tokenizer and manifest."""
        model = self.loaded.model
        self._write(WEIGHTS, "")
        manifest = {
            "format": FORMAT_VERSION,
            "base": self.loaded.info.to_dict(),
            "quantization": report or {},
            "quantized": self.quantized,
            "aliases": self.aliases,
            "dense_norms": self.dense_norms,
            "versions": versions(),
        }
        if self.files != [WEIGHTS]:
            manifest["files"] = self.files
        model.config.save_pretrained(self.tmp)
        self.loaded.tokenizer.save_pretrained(self.tmp)
        write_json_atomic(self.tmp / CHECKPOINT_MANIFEST, manifest)
        if report and report.get("plan"):  # auto's allocation, editable and rerunnable as `mixed`
            import yaml

            plan = {k: v for k, v in report["plan"].items() if k != "stats"}
            (self.tmp / PLAN_FILE).write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
        self._finished = True

    def _pending(self, name: str) -> bool:
        return not any(name.startswith(p) for p in self._written)

    def _write(self, filename: str, prefix: str) -> None:
        """Tensors of the modules under ``prefix`` (all: "") not written before, to ``filename``."""
        model = self.loaded.model
        root = model.get_submodule(prefix) if prefix else model
        dot = f"{prefix}." if prefix else ""
        tensors: dict[str, torch.Tensor] = {}
        # Ties by storage address within this file only: a block written before has been
        # dropped, and the allocator may give its addresses to the next block's tensors.
        seen: dict[int, str] = {}
        for rel, mod in root.named_modules():
            name = dot + rel if rel else prefix
            if isinstance(mod, QuantLinear) and self._pending(name + "."):
                tensors.update(self._quantized(name, mod))
            if isinstance(mod, DenseNorm) and self._pending(name + "."):
                # A rotated sandwich norm holds a d × d matrix where the architecture has a
                # d-vector: the reader rebuilds it before filling the weights.
                self.dense_norms[name] = mod.eps
        for rel, value in root.state_dict(keep_vars=True).items():
            key = dot + rel
            owner, attr = key.rsplit(".", 1)
            if not self._pending(key) or (owner in self.quantized and attr.startswith("q_")):
                continue  # written before, or stored under its QuantizedTensor name
            if value.is_meta:  # an out-of-core model's head, still in its source file
                value = lazy_state(model).read(key)
            ptr = value.data_ptr()
            if ptr in seen and value.numel() > 0:
                self.aliases[key] = seen[ptr]  # tied weights (lm_head ↔ embeddings) once
                continue
            seen[ptr] = key
            tensors[key] = value.detach().cpu().contiguous()
        if tensors or filename == WEIGHTS:
            write_safetensors(self.tmp / filename, tensors)
            self.files.append(filename)

    def _quantized(self, name: str, mod: QuantLinear) -> dict[str, torch.Tensor]:
        qt = mod.qtensor
        self.quantized[name] = {
            "method": qt.method,
            "shape": list(qt.shape),
            "meta": qt.meta,
            "bit_counts": qt.bit_counts,
            "tensors": {
                k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in qt.tensors.items()
            },
            "bias": mod.bias is not None,
        }
        return {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in qt.tensors.items()}
