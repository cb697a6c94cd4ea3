"""KV-cache study: what a 4- and 2-bit cache changes, paired on the same windows and prompts.

The study report compares cells (weight methods) with the float reference; the cache is a
task variant inside each cell (``TASK@kv4``, ``TASK@4k-kv2`` …).  This prints, per cell:

1. a summary — per context and cache: perplexity, KLD to the float model (weights *and* cache;
   for the float-weight cell the cache alone), top-1 agreement and the cache's bytes per token
   (against a float cache's), and for generation the collapse rate;
2. the paired difference of each quantized cache against the float cache of the same cell, on
   the same windows or prompts (q2lab.study.compare.compare_rows: bootstrap CI, p-value).

    python docs/results/kv-cache/paired.py docs/results/kv-cache/results.jsonl
"""

from __future__ import annotations

import sys

from q2lab.study.compare import compare_rows, format_comparison
from q2lab.study.report import load_results

#: (context name, plain tag, {cache name: tag}) — the tags of examples/kv-cache.yaml.
CONTEXTS = (
    ("512", "", {"4-bit": "@kv4", "2-bit": "@kv2"}),
    ("4096", "@4k", {"4-bit": "@4k-kv4", "2-bit": "@4k-kv2"}),
)
GEN = ("gen:collapse", {"4-bit": "gen:collapse@kv4", "2-bit": "gen:collapse@kv2"})
PAIRED = (("ppl:wikitext2", "ppl"), ("kld:wikitext2", "kld_mean"), ("kld:wikitext2", "top1_agree"))


def _fmt(x: float | None, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _ci(row: dict | None, d: int = 3) -> str:
    if row is None or row.get("value") is None:
        return "–"
    if row.get("ci_low") is None:
        return _fmt(row["value"], d)
    return f"{row['value']:.{d}f} [{row['ci_low']:.{d}f}, {row['ci_high']:.{d}f}]"


def summary(by: dict, cell: str) -> list[str]:
    lines = [
        "| context | cache | ppl [95 % CI] | KLD [95 % CI] | top-1 agree | KV bytes/token (float) |",
        "|---|---|---|---|---|---|",
    ]
    for ctx, plain, caches in CONTEXTS:
        for cache, tag in (("float", plain), *caches.items()):
            ppl = by.get((cell, f"ppl:wikitext2{tag}", "ppl"))
            kld = by.get((cell, f"kld:wikitext2{tag}", "kld_mean"))
            top1 = by.get((cell, f"kld:wikitext2{tag}", "top1_agree"))
            if ppl is None:
                continue
            kv = (ppl.get("details") or {}).get("kv") or {}
            size = (
                f"{kv['bytes_per_token']:.0f} ({kv['float_bytes_per_token']:.0f})"
                if kv.get("bytes_per_token")
                else "–"
            )
            lines.append(
                f"| {ctx} | {cache} | {_ci(ppl, 2)} | {_ci(kld, 4)} | "
                f"{_fmt(top1['value'] if top1 else None)} | {size} |"
            )
    plain, caches = GEN
    for cache, task in (("float", plain), *caches.items()):
        row = by.get((cell, task, "collapse_rate"))
        if row is not None:
            lines.append(f"| generation, 128 new tokens | {cache} | collapse rate {_ci(row)} | | | |")
    return lines


def paired(by: dict, cell: str) -> list[str]:
    lines = [
        "| context | cache | task | metric | quantized − float cache [95 % CI] | p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    combos = [
        (ctx, cache, task + plain, task + tag, metric)
        for ctx, plain, caches in CONTEXTS
        for cache, tag in caches.items()
        for task, metric in PAIRED
    ]
    combos += [("generation", cache, GEN[0], task, "collapse_rate") for cache, task in GEN[1].items()]
    for ctx, cache, base_task, task, metric in combos:
        a, b = by.get((cell, task, metric)), by.get((cell, base_task, metric))
        cmp = compare_rows(a, b) if a and b else None
        if cmp is None:
            continue
        diff, pv, verdict = format_comparison(cmp, 4 if metric != "ppl" else 3)
        lines.append(f"| {ctx} | {cache} | {task} | {metric} | {diff} | {pv} | {verdict} |")
    return lines


def main(path: str) -> None:
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    print(f"<!-- generated: python docs/results/kv-cache/paired.py {path} -->\n")
    rows = load_results(path)
    by = {(r["cell"], r["task"], r["metric"]): r for r in rows if "cell" in r}
    labels = {r["cell"]: r["label"] for r in rows if "cell" in r}
    for cell in dict.fromkeys(r["cell"] for r in rows if "cell" in r):
        print(f"## {labels[cell]} (`{cell}`)\n")
        print("\n".join(summary(by, cell)))
        print()
        lines = paired(by, cell)
        if len(lines) > 2:
            print("\n".join(lines))
            print()


if __name__ == "__main__":
    main(sys.argv[1])
