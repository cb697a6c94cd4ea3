"""Calibration language: each method under each calibration, on English and on Polish text.

The study report compares every cell with the float reference; the questions of issue 20 are
between calibrations of the same method.  This prints, per model:

1. a summary table — per method and calibration, perplexity and KLD on English (WikiText-2
   test) and Polish (the held-out prose split), and for each language the share of RTN's
   perplexity gap to float that the calibrated method closes (RTN 3-bit g128 needs no
   calibration, so it is the same cell for every calibration);
2. the paired bootstrap of each pair of calibrations of one method (pl − en, mix − en,
   mix − pl) on the same windows and items, with q2lab.study.compare.pairwise_table.

    python docs/results/calibration-language/paired.py docs/results/calibration-language/results.jsonl
"""

from __future__ import annotations

import sys

from q2lab.study.compare import compare_rows, format_comparison
from q2lab.study.report import load_results

CALIBRATIONS = ("en", "pl", "mix")
PAIRS = (("pl", "en"), ("mix", "en"), ("mix", "pl"))
LANGUAGES = (("English", "wikitext2"), ("Polish", "polish"))
METRICS = (
    ("ppl:wikitext2", "ppl"),
    ("kld:wikitext2", "kld_mean"),
    ("ppl:polish", "ppl"),
    ("kld:polish", "kld_mean"),
    ("mc:polish_ppc", "acc_norm"),
    ("mc:polish_cdsc_e", "acc_norm"),
)


def _fmt(x: float | None, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _gap(fp: float | None, rtn: float | None, ppl: float | None) -> str:
    """Share of RTN's perplexity gap to float closed: 1 = float's perplexity, 0 = RTN's."""
    if None in (fp, rtn, ppl) or rtn == fp:
        return "–"
    return f"{(rtn - ppl) / (rtn - fp) * 100:.0f} %"  # type: ignore[operator]


def summary(by: dict, model: str, cells: list[str]) -> list[str]:
    def value(cell: str | None, task: str, metric: str) -> float | None:
        row = by.get((model, cell, task, metric)) if cell else None
        return None if row is None or row.get("value") is None else float(row["value"])

    fp = next((c for c in cells if c.endswith("/fp")), None)
    rtn = next((c for c in cells if c.split("/", 1)[1].startswith("rtn-b3")), None)
    header = ["cell", "calibration", "bpw"]
    for lang, _ in LANGUAGES:
        header += [f"{lang} ppl", f"{lang} KLD", f"{lang}: RTN gap closed"]
    header += ["PPC acc_norm", "CDSC-E acc_norm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        calib = cell.rsplit("@", 1)[1] if "@" in cell else "–"
        row = next(r for k, r in by.items() if k[0] == model and k[1] == cell)
        out = [row["label"].rsplit(" @", 1)[0], calib, _fmt(row.get("bpw"))]
        for _, corpus in LANGUAGES:
            ppl = value(cell, f"ppl:{corpus}", "ppl")
            gap = (
                _gap(value(fp, f"ppl:{corpus}", "ppl"), value(rtn, f"ppl:{corpus}", "ppl"), ppl)
                if cell.split("/", 1)[1].startswith("gptq-b3")
                else "–"
            )
            out += [_fmt(ppl, 2), _fmt(value(cell, f"kld:{corpus}", "kld_mean")), gap]
        out += [_fmt(value(cell, task, "acc_norm")) for task in ("mc:polish_ppc", "mc:polish_cdsc_e")]
        lines.append("| " + " | ".join(out) + " |")
    return lines


def paired_lines(by: dict, model: str, pairs: list[tuple[str, str]]) -> list[str]:
    """One row per (pair of calibrations, task metric): the paired difference a − b on the same
    windows or items (q2lab.study.compare.compare_rows, the report's machinery)."""
    lines = [
        "| method | a | b | task | metric | a − b [95 % CI] | p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        for task, metric in METRICS:
            ra, rb = by.get((model, a, task, metric)), by.get((model, b, task, metric))
            cmp = compare_rows(ra, rb) if ra and rb else None
            if cmp is None:
                continue
            diff, pv, verdict = format_comparison(cmp)
            method = ra["label"].rsplit(" @", 1)[0]  # type: ignore[index]
            calib_a, calib_b = a.rsplit("@", 1)[1], b.rsplit("@", 1)[1]
            lines.append(
                f"| {method} | {calib_a} | {calib_b} | {task} | {metric} | {diff} | {pv} | {verdict} |"
            )
    return lines


def main(path: str) -> None:
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    print(f"<!-- generated: python docs/results/calibration-language/paired.py {path} -->\n")
    rows = load_results(path)
    by = {(r["model"], r["cell"], r["task"], r["metric"]): r for r in rows if "cell" in r}
    for model in sorted({k[0] for k in by}):
        cells = sorted({k[1] for k in by if k[0] == model}, key=_order)
        print(f"## {model}\n")
        print("\n".join(summary(by, model, cells)))
        print()
        methods = sorted({c.rsplit("@", 1)[0] for c in cells if "@" in c}, key=_order)
        pairs = [
            (f"{m}@{a}", f"{m}@{b}")
            for m in methods
            for a, b in PAIRS
            if f"{m}@{a}" in cells and f"{m}@{b}" in cells
        ]
        print("\n".join(paired_lines(by, model, pairs)))
        print()


def _order(cell: str) -> tuple:
    """fp, rtn, then methods in the study's order, each calibration in CALIBRATIONS' order."""
    body = cell.split("/", 1)[1]
    prefixes = ("fp", "rtn", "gptq-b3", "gptq-b2", "quip#", "iq2_xxs", "qtip")
    rank = next((i for i, p in enumerate(prefixes) if body.startswith(p)), len(prefixes))
    calib = body.rsplit("@", 1)[1] if "@" in body else ""
    return (rank, body.rsplit("@", 1)[0], CALIBRATIONS.index(calib) if calib in CALIBRATIONS else -1)


if __name__ == "__main__":
    main(sys.argv[1])
