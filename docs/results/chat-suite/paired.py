"""Paired comparisons between the quantized cells of the chat-suite study on the same prompts.

Every quantized cell against the float model on every generation measure (the report shows the
same), the quantized cells against each other (do the continuous measures separate two cells
that both collapse, e.g. QTIP 2-bit vs GPTQ 2-bit?), and collapse against the float model on
each language's prompts alone — paired bootstrap and McNemar's exact test, with
q2lab.study.compare.compare_rows (the report's own machinery).

    python docs/results/chat-suite/paired.py docs/results/chat-suite/results.jsonl
"""

from __future__ import annotations

import sys
from itertools import combinations

from q2lab.eval.stats import UnitScores, compare, units_of
from q2lab.study.analysis import GEN_DIVERGENCES, GEN_MEASURES
from q2lab.study.compare import format_comparison, pairwise_table
from q2lab.study.report import load_results

TASK = "gen:chat_suite"
METRICS = ("collapse_rate", *GEN_MEASURES, *GEN_DIVERGENCES)


def main(path: str) -> None:
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    print(f"<!-- generated: python docs/results/chat-suite/paired.py {path} -->\n")
    rows = load_results(path)
    by = {(r["model"], r["cell"], r["task"], r["metric"]): r for r in rows if "cell" in r}
    for model in sorted({k[0] for k in by}):
        cells = sorted({k[1] for k in by if k[0] == model and not k[1].endswith("/fp")})
        metrics = [(TASK, m) for m in METRICS]
        print(f"## {model}, {TASK}: each cell against the float model\n")
        vs_float = [(c, f"{model}/fp") for c in cells]
        print("\n".join(pairwise_table(by, model, vs_float, metrics, metrics_outer=False)))
        print()
        print(f"## {model}, {TASK}: quantized cells against each other\n")
        pairs = list(combinations(cells, 2))
        print("\n".join(pairwise_table(by, model, pairs, metrics, metrics_outer=False)))
        print()
        by_language(by, model)


def by_language(by: dict, model: str) -> None:
    """Each cell against the float model on each language's prompts alone (the scored prompts
    are rebuilt from $Q2LAB_DATA for their languages, and must hash as the records say)."""
    from q2lab.eval.kinds.gen import _selected
    from q2lab.eval.tasks import TaskSpec

    ref = by.get((model, f"{model}/fp", TASK, "collapse_rate"))
    if ref is None:
        return
    # the prompts the task scored, selected as the task selects them (its limit and seeded sample)
    suite = _selected(TaskSpec(**ref["task_settings"]))
    if ref["details"]["prompts"]["suite_sha256"] != suite.sha256:
        raise SystemExit("the records were not generated from this chat suite")
    langs = [m["lang"] for m in suite.meta]
    print(f"## {model}, {TASK}: collapse against the float model, per language\n")
    print("| cell | language | prompts | collapsed (float) | cell − float [95 % CI] | p | verdict |")
    print("|---|---|---:|---|---|---|---|")
    cells = sorted({k[1] for k in by if k[0] == model and k[2] == TASK and not k[1].endswith("/fp")})
    for cell in cells:
        row = by.get((model, cell, TASK, "collapse_rate"))
        if row is None:
            continue
        a, b = units_of(row).sums, units_of(ref).sums
        for lang in sorted(set(langs)):
            idx = [i for i, g in enumerate(langs) if g == lang]
            sub_a, sub_b = UnitScores(a[idx]), UnitScores(b[idx])
            diff, pv, verdict = format_comparison(compare(sub_a, sub_b, False))
            counts = f"{int(sub_a.sums.sum())} ({int(sub_b.sums.sum())})"
            print(f"| {row['label']} | {lang} | {len(idx)} | {counts} | {diff} | {pv} | {verdict} |")
    print()


if __name__ == "__main__":
    main(sys.argv[1])
