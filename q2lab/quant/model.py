"""Model-level quantization: every linear of every decoder block → :class:`QuantLinear`.

Works in place, block by block: each block's Hessians are read from the shared store, its
linears are quantized (those reading the same input together, see
:meth:`Quantizer.quantize_many`), and each float ``nn.Linear`` is replaced and freed before
the next, so peak memory is the model plus one block's work.  Embeddings and ``lm_head``
stay in float; the report says so and counts them separately.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from q2lab.calib.hessian import Hessian
from q2lab.calib.store import HessianStore
from q2lab.errors import ConfigError
from q2lab.models.arch import find_decoder
from q2lab.models.lazy import is_lazy, resident
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, get_quantizer
from q2lab.quant.finetune_option import needs_tuner
from q2lab.quant.linear import QuantLinear
from q2lab.utils.progress import progress


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    bpw: float
    seconds: float
    proxy_rel: float | None  # tr(E H Eᵀ) / tr(W H Wᵀ): relative output error on calibration inputs
    format: str = ""  # storage format: the GGML type of llama.cpp methods, else method and bits
    codebook_bits: int = 0  # of ``bits``: per-layer codebooks (VPTQ, AQLM, QTIP's HYB table)


def codebook_bits(qt: QuantizedTensor) -> int:
    """Bits of a tensor's stored per-layer codebooks (components named ``codebook*``/``lut``)."""
    return sum(v for k, v in qt.bit_counts.items() if k.startswith("codebook") or k == "lut")


def storage_format(qt: QuantizedTensor) -> str:
    """What a quantized tensor is stored as: ``Q4_0`` for GGML blocks, else the method and its
    bits (``gptq 4b``), so a mixed model's report tells its bit widths apart."""
    if qt.meta.get("ggml_type"):
        return str(qt.meta["ggml_type"])
    bits = qt.meta.get("bits")
    return f"{qt.method} {bits}b" if bits is not None else qt.method


@dataclass
class QuantReport:
    method: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    float_params: int = 0
    notes: list[str] = field(default_factory=list)
    finetune: dict[str, Any] | None = None  # statistics of the fine-tuning stages, when run
    plan: dict[str, Any] | None = None  # a method's per-linear choice (auto: a mixed config + stats)

    @property
    def quantized_params(self) -> int:
        return sum(lr.shape[0] * lr.shape[1] for lr in self.layers)

    @property
    def bits(self) -> int:
        return sum(lr.bits for lr in self.layers)

    @property
    def bpw(self) -> float:
        """Exact bits per weight over the quantized linears."""
        return self.bits / max(self.quantized_params, 1)

    @property
    def bpw_no_codebooks(self) -> float:
        """Bits per weight without per-layer codebooks: what the codes, scales and signs cost,
        i.e. the bpw the same codebooks would cost on a model with far larger layers."""
        return (self.bits - sum(lr.codebook_bits for lr in self.layers)) / max(self.quantized_params, 1)

    def formats(self) -> dict[str, float]:
        """Share of the quantized weights in each storage format, largest first: a "Q2_K" file
        on 576-wide rows is mostly Q4_0, and this is where a report shows it."""
        total = max(self.quantized_params, 1)
        shares: dict[str, float] = {}
        for lr in self.layers:
            shares[lr.format] = shares.get(lr.format, 0.0) + lr.shape[0] * lr.shape[1] / total
        return {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        d = {
            "method": self.method,
            "config": self.config,
            "bpw": self.bpw,
            "bits": self.bits,
            "quantized_params": self.quantized_params,
            "float_params": self.float_params,
            "quantized_fraction": self.quantized_params / max(self.quantized_params + self.float_params, 1),
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "proxy_rel_mean": _mean([lr.proxy_rel for lr in self.layers]),
            "formats": self.formats(),
        }
        if any(lr.codebook_bits for lr in self.layers):
            d["bpw_no_codebooks"] = self.bpw_no_codebooks
        if self.finetune is not None:
            d["finetune"] = self.finetune
        if self.plan is not None:
            d["plan"] = self.plan
        if per_layer:
            d["layers"] = [dataclasses.asdict(lr) for lr in self.layers]
        return d


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def proxy_rel(weight: torch.Tensor, deq: torch.Tensor, hessian: Hessian) -> float:
    """tr((W−Q) H (W−Q)ᵀ) / tr(W H Wᵀ), the layer-output error GPTQ-style methods minimise."""
    h = hessian.xtx.to(weight.device, torch.float64)  # the ratio does not depend on H's scale
    w = weight.double()
    e = w - deq.double()
    den = float(((w @ h) * w).sum())
    return float(((e @ h) * e).sum()) / den if den > 0 else 0.0


class BlockTuner(Protocol):
    """What :func:`quantize_model` calls around each block when a method config asks for
    fine-tuning; :class:`q2lab.finetune.stages.FinetuneRun` is the implementation."""

    def before_block(self, b: int) -> None: ...

    def after_block(self, b: int) -> None: ...

    def finish(self) -> dict[str, Any]: ...


# Called with the model once the configuration is checked and before any block is rounded.
TunerFactory = Callable[[nn.Module], BlockTuner]


def _selected(name: str, skip: list[str]) -> bool:
    return not any(re.search(p, name) for p in skip)


def quantize_model(
    model: nn.Module,
    method: str,
    cfg: MethodConfig,
    store: HessianStore | None = None,
    *,
    skip: list[str] | None = None,
    cache_weight: bool = True,
    tuner: TunerFactory | None = None,
    windows: Callable[..., torch.Tensor] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> QuantReport:
    """Quantize ``model``'s decoder linears in place with ``method``; returns the report.

    When ``cfg`` has a ``finetune`` section, ``tuner`` runs the two fine-tuning stages: pass
    :func:`q2lab.finetune.finetuner` ``(loaded, store, cfg)``.  Methods never import training
    code; this hook is how a method's ``finetune:`` option reaches it.  ``windows(n, ctx)`` returns
    n calibration token windows of ctx tokens (None: the store's), for methods that learn a
    transform on them (SpinQuant); pass ``lambda n=None, ctx=None: calibration_windows(loaded,
    store, n, ctx)``."""
    quantizer = get_quantizer(method)
    if quantizer.uses_hessian(cfg) and store is None:
        raise ConfigError(
            f"method {quantizer.name} needs calibration Hessians: calibrate first (q2lab calibrate) "
            "or give the study a calibration section"
        )
    skip = list(skip or [])
    layout = find_decoder(model)
    report = QuantReport(quantizer.name, cfg.to_dict())
    t_start = time.time()
    if is_lazy(model):
        _check_streamable(quantizer, cfg, on_block)
    store, prepared = quantizer.prepare_model(model, cfg, store, windows)
    report.notes.extend(prepared)
    report.plan = quantizer.plan(cfg)
    run = _tuner(model, cfg, tuner)
    assigned = quantizer.layer_methods(model, cfg)
    for b in progress(range(len(layout)), f"quantize {quantizer.name}", len(layout), unit="block"):
        with resident(model, b):  # an out-of-core model reads block b from disk, drops it after
            linears = {
                n: m for n, m in layout.block_linears(b).items() if _selected(layout.full_name(b, n), skip)
            }
            if run is not None:
                run.before_block(b)
            for group, q, c in _assign(
                layout, b, input_groups(layout, b, linears, store), assigned, quantizer, cfg
            ):
                _quantize_group(model, layout, b, group, linears, q, c, store, report, cache_weight)
            if run is not None:
                run.after_block(b)
            if on_block is not None:
                on_block(b)
    if run is not None:
        report.finetune = run.finish()
    report.notes.extend(quantizer.finish_model(model, cfg))
    _recount(model, report)
    report.seconds = time.time() - t_start
    quantized = {id(m) for m in model.modules() if isinstance(m, QuantLinear)}
    report.float_params = sum(
        p.numel() for m in model.modules() if id(m) not in quantized for p in m.parameters(recurse=False)
    )
    report.notes.append("embeddings, norms and lm_head kept in float")
    kept = [n for n, a in (assigned or {}).items() if a is None]
    if kept:
        report.notes.append(f"kept in float by {quantizer.name}'s plan: {kept}")
    if skip:
        report.notes.append(f"kept in float by skip patterns: {skip}")
    return report


def _check_streamable(quantizer: Quantizer, cfg: MethodConfig, on_block: Callable | None) -> None:
    """An out-of-core model streams block-local methods only, into a writer."""
    whole = [
        what
        for what, hit in (
            ("a whole-model transform", type(quantizer).prepare_model is not Quantizer.prepare_model),
            ("a whole-model finishing step", type(quantizer).finish_model is not Quantizer.finish_model),
            ("fine-tuning", needs_tuner(cfg)),
        )
        if hit
    ]
    if whole:
        raise ConfigError(
            f"method {quantizer.name} with these options runs {' and '.join(whole)}, which needs the "
            "whole model in memory; load the model without lazy"
        )
    if on_block is None:
        raise ConfigError(
            "an out-of-core (lazy) model drops each block after quantizing it: pass on_block that "
            "writes it (q2lab.api.quantize with out=… does)"
        )


def _tuner(model: nn.Module, cfg: MethodConfig, factory: TunerFactory | None) -> BlockTuner | None:
    """The fine-tuning driver when ``cfg`` asks for it (None otherwise)."""
    if not needs_tuner(cfg):
        return None
    if factory is None:
        raise ConfigError(
            "fine-tuning needs calibration windows and the q2lab.finetune stages; "
            "pass tuner=q2lab.finetune.finetuner(loaded, store, cfg)"
        )
    return factory(model)


def _recount(model: nn.Module, report: QuantReport) -> None:
    """Layer bits as stored after fine-tuning (tuned gains are stored and counted) and the
    method's finishing step; a layer whose storage format changed there (UPQ's INT4 → INT2)
    has no proxy error of its final weight (the float weight is gone), so none is reported."""
    for lr in report.layers:
        qt = model.get_submodule(lr.name).qtensor
        lr.bits, lr.bpw, lr.codebook_bits = qt.bits(), qt.bpw(), codebook_bits(qt)
        fmt = storage_format(qt)
        if fmt != lr.format:
            lr.format, lr.proxy_rel = fmt, None


def input_groups(
    layout, b: int, linears: dict[str, nn.Linear], store: HessianStore | None
) -> list[list[str]]:
    """Linears of block ``b`` grouped by shared input (from the store), else one per group."""
    if store is None:
        return [[n] for n in linears]
    groups: dict[str, list[str]] = {}
    for n in linears:
        entry = store.linears.get(layout.full_name(b, n))
        groups.setdefault(entry["tensor"] if entry else n, []).append(n)
    return list(groups.values())


def _assign(layout, b, groups, assigned, quantizer, cfg):
    """Split input groups by the (method, config) each linear gets: all ``quantizer``/``cfg``
    unless a mixed method assigned them (linears it keeps float are dropped)."""
    out = []
    for group in groups:
        by_key: dict[str, tuple[list[str], Any, Any]] = {}
        for n in group:
            full = layout.full_name(b, n)
            if assigned is not None and full not in assigned:
                raise ConfigError(f"method {quantizer.name} has no plan for linear {full}")
            a = (quantizer, cfg) if assigned is None else assigned[full]
            if a is None:
                continue
            key = f"{a[0].name}|{a[1]!r}"
            by_key.setdefault(key, ([], a[0], a[1]))[0].append(n)
        out.extend(by_key.values())
    return out


def _quantize_group(model, layout, b, names, linears, quantizer, cfg, store, report, cache_weight) -> None:
    t0 = time.time()
    hessian = store.hessian(layout.full_name(b, names[0])) if store is not None else None
    weights = [linears[n].weight.detach() for n in names]
    qts: list[QuantizedTensor] = quantizer.quantize_many([w.float() for w in weights], hessian, cfg)
    seconds = (time.time() - t0) / len(names)
    for n, w, qt in zip(names, weights, qts):
        full = layout.full_name(b, n)
        deq = qt.dequantize(torch.float32)
        rel = proxy_rel(w.float(), deq, hessian) if hessian is not None else None
        old = linears[n]
        # The decoded-weight cache fills on the first forward pass, not here: quantizing holds
        # only packed codes, so peak memory stays near one float model.
        model.set_submodule(full, quantizer.make_linear(qt, old.bias, cache_weight=cache_weight))
        report.layers.append(
            LayerReport(
                full, qt.shape, qt.bits(), qt.bpw(), seconds, rel, storage_format(qt), codebook_bits(qt)
            )
        )
