"""Public Python API: the same operations as the CLI, as plain functions.

from q2lab import api
store = api.calibrate("smollm2-135m", corpus="wikitext2", windows=128, ctx=512)
report = api.quantize("smollm2-135m", "gptq", {"bits": 2, "group_size": 128}, out="ckpt/")
records = api.evaluate("ckpt/", tasks=["ppl:wikitext2", "kld:wikitext2"], ref="smollm2-135m")
api.run_study("examples/quickstart.yaml", "runs/quickstart")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from q2lab.calib.store import MANIFEST, CalibSpec, HessianStore, calibration_windows
from q2lab.calib.store import calibrate as _calibrate
from q2lab.errors import ConfigError
from q2lab.eval.distill import distill_data
from q2lab.eval.records import Record
from q2lab.eval.tasks import Evaluator, check_data, parse_task
from q2lab.finetune import finetuner
from q2lab.models.arch import find_decoder
from q2lab.models.lazy import is_lazy, refuse_lazy
from q2lab.models.loader import LoadedModel, load_model
from q2lab.quant.base import get_quantizer, make_config
from q2lab.quant.model import quantize_model
from q2lab.study.runner import run_study

__all__ = ["calibrate", "evaluate", "load_model", "quantize", "run_study"]


def _as_loaded(model: str | LoadedModel, lazy: bool = False) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, lazy=lazy)


def calibrate(
    model: str | LoadedModel,
    corpus: str = "wikitext2",
    windows: int = 128,
    ctx: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
    weights: Sequence[float] | None = None,
    lazy: bool = False,
) -> HessianStore:
    """Compute (or reuse) the shared Hessian store of ``model``.  ``corpus`` may be a mix
    (``"wikitext2+polish"``) drawn in ``weights`` proportions (default: equal).  ``lazy``: read
    the model's blocks from disk one at a time (:mod:`q2lab.models.lazy`)."""
    spec = CalibSpec(corpus, windows, ctx, seed, weights)
    return _calibrate(_as_loaded(model, lazy), spec, root=Path(out) if out else None)


def open_store(loaded: LoadedModel, calib: str | Path, spec: CalibSpec) -> HessianStore:
    """``calib`` is a store folder (used as is, after checking it fits the model) or a store root."""
    path = Path(calib)
    if (path / MANIFEST).exists():
        store = HessianStore(path)
        fp = store.manifest.get("model_fingerprint")
        if fp != loaded.info.fingerprint:
            raise ConfigError(
                f"Hessian store {path} was computed for model {store.manifest.get('model')} "
                f"({str(fp)[:12]}…), "
                f"not for {loaded.info.name} ({loaded.info.fingerprint[:12]}…)"
            )
        return store
    return _calibrate(loaded, spec, root=path)


def _hessians(loaded: LoadedModel, calib: str | Path | None, spec: CalibSpec) -> HessianStore:
    """The store at ``calib`` (checked against the model), else calibrate (reusing a cached one)."""
    return open_store(loaded, calib, spec) if calib else _calibrate(loaded, spec)


def quantize(
    model: str | LoadedModel,
    method: str,
    options: dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    calib: str | Path | None = None,
    corpus: str = "wikitext2",
    windows: int = 128,
    ctx: int = 512,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    lazy: bool = False,
) -> dict[str, Any]:
    """Quantize ``model`` in place with ``method``; save a checkpoint to ``out`` if given.

    ``lazy``: load ``model`` out of core (:mod:`q2lab.models.lazy`): each block is read from
    disk, quantized and written to ``out`` (required) before the next, so memory holds one block
    whatever the model's size; block-local methods only."""
    cfg = make_config(method, options)  # validate before loading anything
    if lazy and not out:
        raise ConfigError("out-of-core (lazy) quantization writes each block as it goes: give out=")
    loaded = _as_loaded(model, lazy)
    streamed = is_lazy(loaded.model)
    if streamed and not out:
        raise ConfigError("an out-of-core (lazy) model is quantized into a checkpoint: give out=")
    store = None
    if get_quantizer(method).uses_hessian(cfg):
        store = _hessians(loaded, calib, CalibSpec(corpus, windows, ctx, seed, weights))
    from q2lab.export.checkpoint import CheckpointWriter

    writer = CheckpointWriter(loaded, out, find_decoder(loaded.model).layers_path) if streamed else None
    with writer or contextlib.nullcontext():
        report = quantize_model(
            loaded.model,
            method,
            cfg,
            store,
            tuner=None if streamed else finetuner(loaded, store, cfg, teacher_data=distill_data(loaded, cfg)),
            windows=None
            if store is None
            else lambda n=None, ctx=None: calibration_windows(loaded, store, n, ctx),
            on_block=writer.block if writer else None,
        )
        summary = report.to_dict(per_layer=True)
        if store is not None:
            summary["hessians"] = loaded.info.calibration = store.describe()
        if writer is not None:
            writer.finish(summary)
    if out and writer is None:
        from q2lab.export.checkpoint import save_checkpoint

        save_checkpoint(loaded, out, summary)
    return summary


def evaluate(
    candidate: str | LoadedModel,
    tasks: list[str | dict],
    ref: str | LoadedModel | None = None,
    *,
    limit: int | None = None,
    windows: int | None = None,
    ctx: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Record]:
    """Evaluate ``candidate`` on ``tasks`` (strings like ``"ppl:wikitext2"``) against ``ref``.
    ``warn`` receives one line per task whose language the candidate's calibration did not
    include (default: a :class:`~q2lab.errors.CalibrationLanguageWarning`)."""
    specs = [parse_task(t, limit=limit, windows=windows or limit, ctx=ctx) for t in tasks]
    for spec in specs:
        check_data(spec)
    reference = _as_loaded(ref) if ref is not None else None
    for m in (candidate, reference):
        if isinstance(m, LoadedModel):
            refuse_lazy(m.model, "evaluation")
    evaluator = Evaluator(reference) if warn is None else Evaluator(reference, warn=warn)
    return evaluator.run(_as_loaded(candidate), specs)


EXPORT_FORMATS = ("gguf", "hf-aqlm", "compressed-tensors")


def export(
    model: str | LoadedModel,
    out: str | Path,
    *,
    format: str = "gguf",
    type: str = "F32",
    imatrix: str | Path | None = None,
    save_imatrix: str | Path | None = None,
    calib: str | Path | None = None,
    corpus: str = "wikitext2",
    windows: int = 128,
    ctx: int = 512,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (or a q2lab checkpoint).

    ``format="gguf"``: a llama.cpp GGUF of file type ``type``; ``imatrix`` is ``"auto"`` (the
    diagonal of the shared Hessian store, calibrating if needed), a llama.cpp imatrix file (GGUF
    or legacy .dat), or ``None``.  Returns the per-tensor plan.

    ``format="hf-aqlm"``: an aqlm-quantized checkpoint as a Hugging Face AQLM folder that
    ``transformers`` loads with the ``aqlm`` package (:mod:`q2lab.export.hf_aqlm`); ``type`` and
    the imatrix options do not apply.  Returns a summary.

    ``format="compressed-tensors"``: an RTN/GPTQ-quantized model or checkpoint as the
    ``pack-quantized`` checkpoint vLLM serves and transformers loads
    (:mod:`q2lab.export.compressed_tensors`).  Returns a summary.
    """
    from q2lab.export.gguf import export_gguf, gguf_tensors, imatrix_names
    from q2lab.quant.ggml import imatrix as im
    from q2lab.quant.ggml.recipes import DEFAULT_TYPE, UNSUPPORTED

    fmt = str(format).lower()
    if fmt == "hf-aqlm":
        from q2lab.export.hf_aqlm import export_hf_aqlm

        if imatrix is not None:
            raise ConfigError("--imatrix applies to GGUF export only, not to hf-aqlm")
        return export_hf_aqlm(_as_loaded(model), out)
    if fmt == "compressed-tensors":
        from q2lab.export.compressed_tensors import export_compressed_tensors

        if imatrix is not None:
            raise ConfigError("--imatrix applies to GGUF export only, not to compressed-tensors")
        return export_compressed_tensors(_as_loaded(model), out)
    if fmt != "gguf":
        raise ConfigError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if type.upper() not in DEFAULT_TYPE and type.upper() not in UNSUPPORTED:
        raise ConfigError(f"unknown GGUF file type {type!r}; known: {', '.join(DEFAULT_TYPE)}")
    loaded = _as_loaded(model)
    refuse_lazy(loaded.model, "GGUF export")
    matrix = None
    if imatrix is not None and str(imatrix) == "auto":
        store = _hessians(loaded, calib, CalibSpec(corpus, windows, ctx, seed, weights))
        matrix = im.from_store(store, imatrix_names(gguf_tensors(loaded.model)))
    elif imatrix is not None:
        matrix = im.read_imatrix(imatrix)
    if save_imatrix and matrix is not None:
        im.write_imatrix(save_imatrix, matrix)
    return export_gguf(loaded, out, type.upper(), imatrix=matrix, progress=True)
