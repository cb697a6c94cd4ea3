"""Paired comparisons between the 2-bit cells of this study (same windows, same items).

The study report compares every cell with the float reference; the acceptance questions of
issues 5 and 6 are between quantized cells (QTIP vs QuIP# vs GPTQ vs IQ2_XXS), so this prints
the paired bootstrap of each pair's difference on the same units, with
q2lab.study.compare.compare_rows (the report's own machinery).

    python docs/results/quip-vs-llamacpp/paired.py docs/results/quip-vs-llamacpp/results.jsonl

Other studies: name the cells' method prefixes after the file (every bit width is then kept),
e.g. ``paired.py docs/results/mixed-2bit/results.jsonl quip# mixed``; ``--same-bits`` pairs only
cells of one bit width.
"""

from __future__ import annotations

import sys
from itertools import combinations

from q2lab.study.compare import pairwise_table
from q2lab.study.report import load_results

PAIRS_OF = ("qtip", "quip#", "gptq", "iq2_xxs", "q2_k")
METRICS = (
    ("kld:wikitext2", "kld_mean"),
    ("kld:wikitext2", "top1_agree"),
    ("ppl:wikitext2", "ppl"),
    ("mc:arc_easy", "acc_norm"),
)


def _bits(cell: str) -> str:
    return next(
        (part for part in cell.split("/", 1)[1].split("-") if part[:1] == "b" and part[1:].isdigit()), ""
    )


def main(path: str, prefixes: tuple[str, ...] = (), same_bits: bool = False) -> None:
    pairs_of = prefixes or PAIRS_OF
    # the command that regenerates this output (tests/unit/test_docs_numbers.py reruns it)
    flag = ["--same-bits"] if same_bits else []
    print(
        f"<!-- generated: python docs/results/quip-vs-llamacpp/paired.py {' '.join([*flag, path, *prefixes])} -->\n"
    )
    rows = load_results(path)
    by = {(r["model"], r["cell"], r["task"], r["metric"]): r for r in rows if "cell" in r}
    for model in sorted({k[0] for k in by}):
        cells = sorted({k[1] for k in by if k[0] == model})
        two_bit = [c for c in cells if any(c.split("/", 1)[1].startswith(m) for m in pairs_of)]
        if not prefixes:
            two_bit = [c for c in two_bit if "-b3" not in c and "-b4" not in c]
        two_bit.sort(
            key=lambda c: next(i for i, m in enumerate(pairs_of) if c.split("/", 1)[1].startswith(m))
        )
        print(f"## {model}\n")
        pairs = [(a, b) for a, b in combinations(two_bit, 2) if not same_bits or _bits(a) == _bits(b)]
        print("\n".join(pairwise_table(by, model, pairs, list(METRICS))))
        print()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--same-bits"]
    main(args[0], tuple(args[1:]), same_bits="--same-bits" in sys.argv[1:])
