"""IFEval: every quantized cell against the float model on the same prompts, all four accuracies.

The study report pairs one IFEval metric (prompt_strict) with the reference; this prints the
paired bootstrap of the difference for prompt- and instruction-level, strict and loose accuracy,
with McNemar's exact p for the prompt-level ones, using q2lab.study.compare.compare_rows (the
report's own machinery).

    python docs/results/ifeval-smollm2/paired.py docs/results/ifeval-smollm2/results.jsonl
"""

from __future__ import annotations

import sys

from q2lab.study.compare import compare_rows, format_comparison
from q2lab.study.report import load_results

TASK = "ifeval:ifeval"
METRICS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")


def main(path: str) -> None:
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    print(f"<!-- generated: python docs/results/ifeval-smollm2/paired.py {path} -->\n")
    rows = [r for r in load_results(path) if r.get("task") == TASK]
    by = {(r["cell"], r["metric"]): r for r in rows}
    ref = next(r["cell"] for r in rows if r["is_reference"])
    cells = sorted(
        {r["cell"] for r in rows if not r["is_reference"]}, key=lambda c: -by[(c, METRICS[0])]["bpw"]
    )
    print("| cell | bpw | metric | cell [95 % CI] | float | cell − float [95 % CI] | p | verdict |")
    print("|---|---:|---|---|---:|---|---|---|")
    for cell in cells:
        for metric in METRICS:
            row, ref_row = by.get((cell, metric)), by.get((ref, metric))
            cmp = compare_rows(row, ref_row) if row and ref_row else None
            if cmp is None:
                continue
            diff, pv, verdict = format_comparison(cmp)
            value = f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            print(
                f"| {row['label']} | {row['bpw']:.3f} | {metric} | {value} | {ref_row['value']:.3f} "
                f"| {diff} | {pv} | {verdict} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
