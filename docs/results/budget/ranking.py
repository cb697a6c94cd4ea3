"""Does the Hessian proxy rank what it should?  Predicted vs measured loss for ``auto`` (issue 18).

``auto`` chooses a candidate per linear to minimize the summed proxy tr(ΔW H ΔWᵀ).  Two checks
that the proxy ranks losses the way the model's KLD does:

1. **Across allocations**: every quantized cell of the budget study (uniform QuIP# 2/3-bit, the
   two hand rules, the auto budgets under both sensitivities) gets two predicted losses — the
   summed proxy of the candidate each linear took (what ``sensitivity: proxy`` minimizes) and
   the summed probe-rescaled proxy (what ``sensitivity: kld`` minimizes), both read from the
   caches ``auto`` used — next to the measured KLD on the study's 64 × 512 WikiText-2 test
   windows; Spearman ρ of each over the cells.
2. **Across linears**: one linear at a time is quantized to QuIP# 2-bit (the rest float) and the
   model's KLD to float measured on 4 × 512 *test* windows, for every linear type in 5 blocks
   (35 linears); Spearman ρ of that against the linear's 2-bit proxy and against ``auto``'s own
   probe of it (2 calibration windows).

Needs the study's Hessian store (the 32 × 512 WikiText-2 calibration; rebuilt if missing).
Writes the measurements to ``ranking.json`` and their tables to ``ranking.md`` next to the
results (the tables' numbers are checked against the JSON by tests/unit/test_docs_numbers.py)::

    python docs/results/budget/ranking.py docs/results/budget/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from q2lab.api import calibrate
from q2lab.calib.store import calibration_windows
from q2lab.data.text import corpus_windows, load_corpus
from q2lab.models import load_model
from q2lab.models.arch import find_decoder
from q2lab.quant.auto import PROBE_CTX, kld_probes, probe_scaled, sensitivity
from q2lab.quant.base import get_quantizer, make_config
from q2lab.quant.mixed import parse_entry
from q2lab.study.report import load_results

CANDIDATES = [{"method": "quip#", "bits": b} for b in (2, 3, 4)]
PROBE_BLOCKS = (0, 7, 15, 22, 29)
PROBE_WINDOWS = 4


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties share their mean rank)."""

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=np.float64)
        for value in np.unique(a):
            tie = a == value
            r[tie] = r[tie].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def assignment(model, store, windows, method: str, options: dict) -> dict[str, int]:
    """Bits per decoder linear of a cell, through the method's own per-linear plan."""
    layout = find_decoder(model)
    names = [layout.full_name(b, n) for b in range(len(layout)) for n in layout.block_linears(b)]
    if method == "quip#":
        return dict.fromkeys(names, options["bits"])
    q, cfg = get_quantizer(method), make_config(method, options)
    if method == "auto":
        q.prepare_model(model, cfg, store, windows)
    return {n: c.bits for n, (_, c) in q.layer_methods(model, cfg).items()}


def cells_data(rows: list[dict], model, store, windows, tables: dict) -> list[dict]:
    """Per quantized cell: its bpw, predicted losses (summed proxy, summed probe-rescaled proxy)
    and measured KLD."""
    kld = {
        r["cell"]: r
        for r in rows
        if r["task"] == "kld:wikitext2" and r["metric"] == "kld_mean" and not r.get("is_reference")
    }
    out = []
    for cell, r in sorted(kld.items(), key=lambda kv: kv[1]["bpw"]):
        bits = assignment(model, store, windows, r["method"], r["options"])
        pred = {k: sum(t[n][CANDIDATES_BITS.index(b)][1] for n, b in bits.items()) for k, t in tables.items()}
        out.append({"cell": cell, "label": r["label"], "bpw": r["bpw"], **pred, "kld": r["value"]})
    return out


def probes_data(loaded, store, table, rule, calib_probes: dict[str, float]) -> list[dict]:
    """Per probed linear: its 2-bit proxy, ``auto``'s probe of it and the model's KLD with only
    that linear at 2 bits on *test* windows (``auto``'s own probe loop, pointed at other windows)."""
    windows = corpus_windows(loaded, load_corpus("wikitext2", role="eval"), PROBE_WINDOWS, 512)
    test = kld_probes(loaded.model, store, rule, windows, blocks=PROBE_BLOCKS)
    return [
        {"linear": n, "proxy": table[n][0][1], "probe": calib_probes[n], "kld": k} for n, k in test.items()
    ]


CANDIDATES_BITS = [c["bits"] for c in CANDIDATES]


def markdown(data: dict, json_path: str, results: str) -> str:
    cells, probes, rho = data["cells"], data["probes"], data["probes_spearman"]
    lines = [
        "# Budget study: predicted vs measured loss",
        "",
        f"Written by `python docs/results/budget/ranking.py {results}` (Hessian store {data['store']}).",
        "The predicted loss is the summed proxy tr(ΔW H ΔWᵀ) that `auto` minimizes.",
        "",
        "## Across allocations",
        "",
        f"<!-- records: {json_path} -->",
        "| cell | bpw | predicted: Σ proxy | predicted: Σ probe-rescaled proxy | measured KLD |",
        "|---|---|---|---|---|",
        *[
            f"| {c['label']} | {c['bpw']:.3f} | {c['proxy']:.1f} | {c['kld_probe']:.3f} | {c['kld']:.3f} |"
            for c in cells
        ],
        "",
        f"Spearman ρ over {len(cells)} cells: proxy **{data['cells_spearman']['proxy']:.3f}**, "
        f"probe-rescaled **{data['cells_spearman']['kld_probe']:.3f}**.",
        "",
        "## Across linears (KLD probes: one linear at QuIP# 2-bit, the rest float)",
        "",
        f"<!-- records: {json_path} -->",
        "| linear | proxy (2-bit) | auto's probe KLD (calibration) | KLD (test windows) |",
        "|---|---|---|---|",
        *[f"| {p['linear']} | {p['proxy']:.2f} | {p['probe']:.5f} | {p['kld']:.5f} |" for p in probes],
        "",
        f"Spearman ρ over {len(probes)} linears against the test-window KLD: proxy "
        f"**{rho['proxy']:.3f}**, auto's probe **{rho['probe']:.3f}**.",
        "",
    ]
    return "\n".join(lines)


def main(results: str) -> None:
    torch.manual_seed(0)
    rows = load_results(results)
    loaded = load_model("smollm2-135m")
    store = calibrate(loaded, "wikitext2", windows=32, ctx=512, seed=0)
    rules = [parse_entry(c, f"candidate {i + 1}", False, "auto") for i, c in enumerate(CANDIDATES)]
    table = sensitivity(loaded.model, store, rules)

    def windows(n=None, ctx=None):
        return calibration_windows(loaded, store, n, ctx)

    calib_probes = kld_probes(loaded.model, store, rules[0], windows(2, PROBE_CTX))  # auto's cache
    tables = {"proxy": table, "kld_probe": probe_scaled(table, calib_probes, 0)}
    cells = cells_data(rows, loaded.model, store, windows, tables)
    probes = probes_data(loaded, store, table, rules[0], calib_probes)
    kld = [c["kld"] for c in cells]
    test = [p["kld"] for p in probes]
    data = {
        "store": store.key,
        "cells": cells,
        "cells_spearman": {k: spearman([c[k] for c in cells], kld) for k in tables},
        "probes": probes,
        "probes_spearman": {k: spearman([p[k] for p in probes], test) for k in ("proxy", "probe")},
    }
    out = Path(results).parent
    (out / "ranking.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    json_path = str(out / "ranking.json")
    (out / "ranking.md").write_text(markdown(data, json_path, results), encoding="utf-8")
    print(markdown(data, json_path, results))


if __name__ == "__main__":
    main(sys.argv[1])
