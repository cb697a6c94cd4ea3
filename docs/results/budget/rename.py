"""Rename the budget study's ``auto`` records to examples/budget.yaml's current cell ids and labels.

The study ran while ``auto``'s ``sensitivity`` defaulted to ``proxy``; the measured KLD probes
did so much better that ``kld`` became the default, which changes both kinds of cells' option
dicts (an option at its default is left out) and so their ids.  This maps every recorded
``auto`` row to the cell of the current file with the same budget and sensitivity, rewriting
``cell``, ``label`` and ``options``; values, CIs, details and provenance are untouched.  In place
(idempotent: the sensitivity is read from each row's plan statistics)::

    python docs/results/budget/rename.py docs/results/budget/results.jsonl examples/budget.yaml
"""

from __future__ import annotations

import json
import sys

from q2lab.study.config import load_study


def main(results: str, study: str) -> None:
    cells = {
        (c.config.sensitivity, float(c.config.budget)): c
        for c in load_study(study).cells
        if c.method == "auto"
    }
    with open(results, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    renamed = set()
    for row in rows:
        if row.get("method") != "auto":
            continue
        # the plan's own record says which sensitivity made it (rows from before it did: proxy)
        sensitivity = ((row.get("quant") or {}).get("plan") or {}).get("sensitivity", "proxy")
        cell = cells[(sensitivity, float(row["options"]["budget"]))]
        if row["cell"] != cell.id:
            renamed.add((row["cell"], cell.id))
        row.update(cell=cell.id, label=cell.label, options=cell.config.to_dict())
    with open(results, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for old, new in sorted(renamed):
        print(f"{old} -> {new}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
