"""Automatic mixed precision under a bits-per-weight budget, ``auto`` (issue 18, parts 1–2).

The hand rules of ``mixed`` ("4-bit on the first and last blocks") guess where a model is
sensitive.  ``auto`` measures it from what is already on disk and chooses::

    - method: auto
      budget: 2.5                       # bits per weight over the decoder linears, an upper bound
      candidates:
        - {method: quip#, bits: 2}
        - {method: quip#, bits: 4}
        - {method: q8_0}
        - {method: fp}                  # keep float (16 bits per weight in the budget)

1. **Sensitivity** (:func:`sensitivity`): every linear is quantized by every candidate on the
   shared Hessians, and its predicted loss is the output error tr(ΔW H ΔWᵀ) with H = E[xxᵀ] —
   the squared error a token's output picks up from that layer — with the exact bits stored.
   Cached per (Hessian store, candidate) under the q2lab cache, so a second budget is free.
   The proxy is local: it cannot see that an early block's error passes through every later
   block.  ``sensitivity: kld`` (the default) measures that (:func:`kld_probes`): each linear alone is
   quantized by the cheapest candidate and the model's KLD to float measured on
   ``probe_windows`` calibration windows; each linear's proxies are then rescaled so that the
   cheapest one equals its probe (:func:`probe_scaled`), and the allocation minimizes the summed
   estimated KLD.  One forward pass per linear (≈ 11 min for SmolLM2's 210 on 2 CPU cores), cached.
2. **Allocation** (:func:`allocate`): one candidate per linear minimizing the summed predicted
   loss with total bits ≤ budget × weights — a multiple-choice knapsack, solved by dynamic
   programming over bits in 1/100,000 of the budget (each cost rounded *up*, so the result never
   exceeds the budget; the rounding leaves at most one unit per linear unspent).
3. The plan is a ``mixed`` config (one rule per linear that does not take the most common
   candidate, that candidate the base), in the report as ``plan`` — and next to a saved
   checkpoint as ``mixed-plan.yaml`` — for the user to read, edit and rerun as ``mixed``.

The quantization itself is the plan's: every linear is quantized again by its candidate in the
normal block loop (methods are deterministic, so its bits are the ones the plan counted).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, get_quantizer, option, register
from q2lab.quant.mixed import FLOAT, Rule, parse_entry
from q2lab.utils.divergence import kl_per_token
from q2lab.utils.io import cache_dir, write_json_atomic
from q2lab.utils.progress import progress

UNITS = 100_000  # knapsack resolution: capacity units per budget
SENSITIVITIES = ("kld", "proxy")
PROBE_CTX = 512


@dataclass
class AutoConfig(MethodConfig):
    budget: float = option(2.5, "bits per weight over the decoder linears (float ones count 16), at most")
    candidates: list = field(
        default_factory=list,
        metadata={
            "help": "method entries to choose from per linear, e.g. [{method: quip#, bits: 2}, {method: fp}]"
        },
    )
    bits: int = field(default=0, metadata={"help": "the cheapest candidate's bits (set, not chosen)"})
    sensitivity: str = option(
        "kld",
        "kld: each linear's tr(ΔW H ΔWᵀ) rescaled so that its cheapest candidate's loss is a measured "
        "KLD probe (that linear alone quantized, on calibration windows); proxy: the bare tr(ΔW H ΔWᵀ) "
        "(no forward passes, but blind to how later blocks amplify an error)",
        added_later=True,
    )
    probe_windows: int = option(2, "calibration windows (512 tokens) a KLD probe runs on", added_later=True)

    def validate(self) -> None:
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(
                f"auto: sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}"
            )
        if (
            isinstance(self.probe_windows, bool)
            or not isinstance(self.probe_windows, int)
            or self.probe_windows < 1
        ):
            raise ConfigError(f"auto: probe_windows must be a positive integer, got {self.probe_windows!r}")
        if not isinstance(self.candidates, list) or len(self.candidates) < 2:
            raise ConfigError(
                f"auto: candidates must be a list of at least 2 method entries, got {self.candidates!r}"
            )
        self._parsed = [
            parse_entry(c, f"candidate {i + 1}", False, "auto") for i, c in enumerate(self.candidates)
        ]
        if (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, (int, float))
            or not 0 < self.budget <= 32
        ):
            raise ConfigError(
                f"auto: budget must be a number of bits per weight in (0, 32], got {self.budget!r}"
            )
        quantized = [r.config.bits for r in self._parsed if r.config is not None]
        if not quantized:
            raise ConfigError("auto: every candidate keeps float; give at least one method")
        if self.bits not in (0, min(quantized)):
            raise ConfigError(f"auto: bits follow the cheapest candidate ({min(quantized)}), got {self.bits}")
        self.bits = min(quantized)
        super().validate()

    def parsed(self) -> list[Rule]:
        return self._parsed


def label(rule: Rule) -> str:
    """A candidate's short name: ``quip# 2b``; a GGML type's own name (``q8_0``); ``fp``."""
    if rule.config is None:
        return FLOAT
    if type(get_quantizer(rule.method)).__module__.startswith("q2lab.quant.ggml"):
        return rule.method
    return f"{rule.method} {rule.config.bits}b"


def _entry(rule: Rule) -> dict[str, Any]:
    return (
        {"method": rule.method} if rule.config is None else {"method": rule.method, **rule.config.to_dict()}
    )


# --------------------------------------------------------------------------- sensitivity
def output_error(weight: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the summed squared output error per token, H = E[xxᵀ]."""
    e = weight.double() - deq.double()
    return float(((e @ h.double()) * e).sum())


def _cache_file(store: Any, rule: Rule) -> Any:
    key = hashlib.sha256(
        json.dumps([store.key, _entry(rule)], sort_keys=True, default=str).encode()
    ).hexdigest()
    return cache_dir() / "sensitivity" / f"{key[:24]}.json"


def sensitivity(model: nn.Module, store: Any, rules: list[Rule]) -> dict[str, list[tuple[int, float]]]:
    """(bits, predicted loss) of every decoder linear under every candidate, in candidate order."""
    from q2lab.models.arch import find_decoder

    layout = find_decoder(model)
    names = [layout.full_name(b, n) for b in range(len(layout)) for n in layout.block_linears(b)]
    table: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for rule in rules:
        path = _cache_file(store, rule)
        cached = json.loads(path.read_text()) if path.exists() else {}
        if set(cached) != set(names):
            cached = _measure(model, layout, store, rule)
            write_json_atomic(path, cached)
        for n in names:
            table[n].append((int(cached[n][0]), float(cached[n][1])))
    return table


def _measure(model: nn.Module, layout: Any, store: Any, rule: Rule) -> dict[str, list[float]]:
    from q2lab.quant.model import input_groups

    out: dict[str, list[float]] = {}
    what = label(rule)
    for b in progress(range(len(layout)), f"auto: sensitivity to {what}", len(layout), unit="block"):
        linears = layout.block_linears(b)
        for group in input_groups(layout, b, linears, store):
            if rule.config is None:
                for n in group:
                    out[layout.full_name(b, n)] = [16 * linears[n].weight.numel(), 0.0]
                continue
            hessian = store.hessian(layout.full_name(b, group[0]))
            h = hessian.mean(torch.float64)
            weights = [linears[n].weight.detach().float() for n in group]
            qts: list[QuantizedTensor] = get_quantizer(rule.method).quantize_many(
                weights, hessian, rule.config
            )
            for n, w, qt in zip(group, weights, qts):
                out[layout.full_name(b, n)] = [qt.bits(), output_error(w, qt.dequantize(torch.float32), h)]
    return out


# --------------------------------------------------------------------------- KLD probes
def _probe_file(store: Any, rule: Rule, windows: torch.Tensor) -> Any:
    ids = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    key = hashlib.sha256(
        json.dumps(["kld-probe-1", store.key, _entry(rule), ids], sort_keys=True, default=str).encode()
    ).hexdigest()
    return cache_dir() / "sensitivity" / f"probe-{key[:24]}.json"


def _log_probs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=windows, use_cache=False).logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def kld_probes(
    model: nn.Module, store: Any, rule: Rule, windows: torch.Tensor, blocks: Sequence[int] | None = None
) -> dict[str, float]:
    """The model's KLD to itself with one decoder linear at a time quantized by ``rule`` (the rest
    float), on ``windows``: how much the network amplifies each layer's error, which the local
    proxy cannot see (an early block's error passes through every later one).  ``blocks`` limits
    the probes to those decoder blocks (``docs/results/budget/ranking.py`` probes five on test
    windows to check this very ranking).  Cached per (store, candidate, windows)."""
    from q2lab.models.arch import find_decoder
    from q2lab.quant.model import input_groups

    path = _probe_file(store, rule, windows)
    layout = find_decoder(model)
    chosen = list(range(len(layout)) if blocks is None else blocks)
    names = [layout.full_name(b, n) for b in chosen for n in layout.block_linears(b)]
    cached = json.loads(path.read_text()) if path.exists() else {}
    if set(names) <= set(cached):
        return {n: cached[n] for n in names}
    device = next(model.parameters()).device
    x = windows.to(device)
    ref = _log_probs(model, x)
    p = ref.exp()
    out: dict[str, float] = {}
    for b in progress(chosen, f"auto: KLD probes, {label(rule)}", len(chosen), unit="block"):
        linears = layout.block_linears(b)
        for group in input_groups(layout, b, linears, store):
            hessian = store.hessian(layout.full_name(b, group[0]))
            weights = [linears[n].weight.detach().float() for n in group]
            qts = get_quantizer(rule.method).quantize_many(weights, hessian, rule.config)
            for n, qt in zip(group, qts):
                linear, saved = linears[n], linears[n].weight.data
                linear.weight.data = qt.dequantize(torch.float32).to(saved.dtype).to(saved.device)
                lp = _log_probs(model, x)
                linear.weight.data = saved
                out[layout.full_name(b, n)] = float(kl_per_token(ref, lp, p).mean())
    write_json_atomic(path, cached | out)
    return out


def probe_scaled(
    table: dict[str, list[tuple[int, float]]], probes: dict[str, float], cheapest: int
) -> dict[str, list[tuple[int, float]]]:
    """Each linear's proxies rescaled so that the ``cheapest`` candidate's equals its KLD probe:
    for small errors the KLD grows with the output error's square, as the proxy does, but with a
    gain per layer that only the probe measures."""
    out = {}
    for n, opts in table.items():
        base = opts[cheapest][1]
        gain = probes[n] / base if base > 0 else 0.0
        out[n] = [(bits, loss * gain) for bits, loss in opts]
    return out


# --------------------------------------------------------------------------- allocation
def allocate(options: dict[str, list[tuple[int, float]]], budget_bits: float) -> dict[str, int]:
    """One option index per linear minimizing the summed loss with summed bits ≤ ``budget_bits``
    (multiple-choice knapsack by dynamic programming; costs rounded up to 1/UNITS of the budget)."""
    names = list(options)
    unit = budget_bits / UNITS
    cost = {n: [int(np.ceil(b / unit - 1e-9)) for b, _ in options[n]] for n in names}
    dp = np.zeros(UNITS + 1)
    picks = np.zeros((len(names), UNITS + 1), dtype=np.int16)
    for k, n in enumerate(names):
        best = np.full(UNITS + 1, np.inf)
        for i, (c, (_, loss)) in enumerate(zip(cost[n], options[n])):
            if c > UNITS:
                continue
            cand = np.full(UNITS + 1, np.inf)
            cand[c:] = dp[: UNITS + 1 - c] + loss
            better = cand < best
            best[better] = cand[better]
            picks[k, better] = i
        dp = best
    if not np.isfinite(dp[UNITS]):
        raise ConfigError("auto: no assignment fits the budget")  # callers check the cheapest first
    choice, c = {}, UNITS
    for k in range(len(names) - 1, -1, -1):
        i = int(picks[k, c])
        choice[names[k]] = i
        c -= cost[names[k]][i]
    return choice


def plan_config(choice: dict[str, int], rules: list[Rule]) -> dict[str, Any]:
    """The allocation as a ``mixed`` config: the most common candidate as base, one rule per
    other linear (exact-name patterns)."""
    base = Counter(choice.values()).most_common(1)[0][0]
    if rules[base].config is None:  # mixed's base cannot be float: the most common quantized one
        quantized = Counter(i for i in choice.values() if rules[i].config is not None)
        base = (
            quantized.most_common(1)[0][0] if quantized else next(i for i, r in enumerate(rules) if r.config)
        )
    return {
        "method": "mixed",
        "base": _entry(rules[base]),
        "rules": [
            {"match": "^" + n.replace(".", "\\.") + "$", **_entry(rules[i])}
            for n, i in choice.items()
            if i != base
        ],
    }


@register()
class AutoQuantizer(Quantizer):
    """Per-linear candidates chosen under a bpw budget, through :meth:`Quantizer.layer_methods`."""

    name = "auto"
    config_cls = AutoConfig
    needs_hessian = True
    summary = (
        "automatic mixed precision: a candidate per linear minimizing the Hessian proxy under a bpw budget"
    )

    def prepare_model(self, model: nn.Module, cfg: AutoConfig, store: Any, windows: Any = None):
        rules = cfg.parsed()
        table = sensitivity(model, store, rules)
        if cfg.sensitivity == "kld":
            if windows is None:
                raise ConfigError(
                    "auto: sensitivity kld needs calibration windows (quantize through q2lab quantize, "
                    "the API or a study)"
                )
            cheapest = min(
                (i for i, r in enumerate(rules) if r.config is not None), key=lambda i: rules[i].config.bits
            )
            probes = kld_probes(model, store, rules[cheapest], windows(cfg.probe_windows, PROBE_CTX))
            table = probe_scaled(table, probes, cheapest)
        n_weights = sum(self._numel(model, n) for n in table)
        lo = sum(min(b for b, _ in opts) for opts in table.values()) / n_weights
        hi = sum(max(b for b, _ in opts) for opts in table.values()) / n_weights
        if cfg.budget < lo:
            raise ConfigError(
                f"auto: budget {cfg.budget} bpw is below the cheapest allocation ({lo:.4f} bpw, "
                "every linear at its cheapest candidate)"
            )
        if cfg.budget >= hi:
            raise ConfigError(
                f"auto: budget {cfg.budget} bpw reaches the most expensive allocation ({hi:.4f} bpw): "
                "nothing to choose; quantize with the most expensive candidate directly"
            )
        choice = allocate(table, cfg.budget * n_weights)
        bits = sum(table[n][i][0] for n, i in choice.items())
        cfg._plan = {
            n: (None if rules[i].config is None else (get_quantizer(rules[i].method), rules[i].config))
            for n, i in choice.items()
        }
        cfg._plan_dict = plan_config(choice, rules)
        counts = Counter(label(rules[i]) for i in choice.values())
        loss = sum(table[n][i][1] for n, i in choice.items())
        cfg._plan_stats = {
            "budget": cfg.budget,
            "plan_bpw": bits / n_weights,
            "predicted_loss": loss,
            "sensitivity": cfg.sensitivity,
            "linears": dict(counts),
            "range_bpw": [lo, hi],
        }
        return store, [
            f"auto: {bits / n_weights:.4f} bpw (budget {cfg.budget}, float linears at 16): "
            + ", ".join(f"{k} × {v}" for k, v in counts.most_common())
        ]

    @staticmethod
    def _numel(model: nn.Module, name: str) -> int:
        return model.get_submodule(name).weight.numel()

    def layer_methods(self, model: nn.Module, cfg: AutoConfig):
        plan = getattr(cfg, "_plan", None)
        if plan is None:
            raise ConfigError("auto: no plan; quantize through quantize_model (its prepare step allocates)")
        return plan

    def plan(self, cfg: AutoConfig) -> dict[str, Any] | None:
        """The allocation as an editable ``mixed`` config, with its statistics."""
        if getattr(cfg, "_plan_dict", None) is None:
            return None
        return {**cfg._plan_dict, "stats": cfg._plan_stats}

    def quantize(self, weight: torch.Tensor, hessian, cfg: AutoConfig) -> QuantizedTensor:
        """A lone tensor has no place in a budget: the cheapest candidate quantizes it."""
        rule = min((r for r in cfg.parsed() if r.config is not None), key=lambda r: r.config.bits)
        return get_quantizer(rule.method).quantize(weight, hessian, rule.config)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return get_quantizer(qt.method).dequantize(qt)
