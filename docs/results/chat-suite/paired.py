"""Paired comparisons between the quantized cells of the chat-suite study on the same prompts.

The study report compares every cell with the float reference; issue 14's acceptance also asks
whether the continuous measures separate two cells that both collapse (QTIP 2-bit vs GPTQ
2-bit), so this prints the paired bootstrap of each pair's difference on every generation
measure, with q2lab.study.compare.compare_rows (the report's own machinery).

    python docs/results/chat-suite/paired.py docs/results/chat-suite/results.jsonl
"""

from __future__ import annotations

import sys
from itertools import combinations

from q2lab.study.analysis import GEN_DIVERGENCES, GEN_MEASURES
from q2lab.study.compare import pairwise_table
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
        print(f"## {model}, {TASK}\n")
        metrics = [(TASK, m) for m in METRICS]
        print(
            "\n".join(pairwise_table(by, model, list(combinations(cells, 2)), metrics, metrics_outer=False))
        )
        print()


if __name__ == "__main__":
    main(sys.argv[1])
