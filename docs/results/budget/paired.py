"""Budget study: ``auto`` against the hand rules, the uniform cells and its own proxy-only form.

The study report compares every cell with the float reference; issue 18 asks whether the
automatic allocation beats the hand rules and the uniform methods at the same or a smaller
budget, paired on the same 64 windows (q2lab.study.compare.pairwise_table: bootstrap CI of
a − b, p-value).

    python docs/results/budget/paired.py docs/results/budget/results.jsonl
"""

from __future__ import annotations

import sys

from q2lab.study.compare import pairwise_table
from q2lab.study.report import load_results

#: (a, b) by label: each auto cell against what it must beat at ≤ its bpw (or just above it).
PAIRS = (
    ("auto ≤ 2.403 bpw (QuIP# 2/3/4)", "QuIP# 2b + 4b blocks 0-2, 27-29"),
    ("auto ≤ 2.25 bpw (QuIP# 2/3/4)", "QuIP# 2b + 4b blocks 0-2, 27-29"),
    ("auto ≤ 2.5 bpw (QuIP# 2/3/4)", "QuIP# 2b + 4b ffn_down"),
    ("auto ≤ 2.25 bpw (QuIP# 2/3/4)", "QUIP# 2b"),
    ("auto ≤ 3.0 bpw (QuIP# 2/3/4)", "QUIP# 3b"),
    ("auto ≤ 2.403 bpw (QuIP# 2/3/4)", "auto-proxy ≤ 2.403 bpw (QuIP# 2/3/4)"),
    ("auto ≤ 2.5 bpw (QuIP# 2/3/4)", "auto-proxy ≤ 2.5 bpw (QuIP# 2/3/4)"),
    ("auto-proxy ≤ 2.403 bpw (QuIP# 2/3/4)", "QuIP# 2b + 4b blocks 0-2, 27-29"),
    ("auto-proxy ≤ 3.0 bpw (QuIP# 2/3/4)", "QUIP# 3b"),
)
METRICS = [("kld:wikitext2", "kld_mean"), ("ppl:wikitext2", "ppl"), ("kld:wikitext2", "top1_agree")]


def main(path: str) -> None:
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    print(f"<!-- generated: python docs/results/budget/paired.py {path} -->\n")
    rows = load_results(path)
    by = {(r["model"], r["cell"], r["task"], r["metric"]): r for r in rows if "cell" in r}
    cell_of = {r["label"]: r["cell"] for r in rows if "cell" in r}
    for model in sorted({k[0] for k in by}):
        print(f"## {model}: auto vs hand rules and uniform cells (64 × 512 WikiText-2 test windows)\n")
        pairs = [(cell_of[a], cell_of[b]) for a, b in PAIRS if a in cell_of and b in cell_of]
        print("\n".join(pairwise_table(by, model, pairs, METRICS, metrics_outer=False)))
        print()


if __name__ == "__main__":
    main(sys.argv[1])
