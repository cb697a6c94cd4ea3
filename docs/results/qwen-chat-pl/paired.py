"""Two float models on the same 100 Polish chat prompts (gen:chat_suite_pl): the collapse rate of
each, by use, and McNemar's exact test between them (same prompts by suite index; each model's
own chat template).  Does Qwen2.5-Coder-0.5B-Instruct give q2lab a model whose Polish generation
can be judged, where SmolLM2-135M-Instruct's float model already collapses?

    python docs/results/qwen-chat-pl/paired.py docs/results/qwen-chat-pl/results.jsonl
"""

from __future__ import annotations

import sys

import numpy as np

from q2lab.eval.stats import mcnemar
from q2lab.study.report import load_results

TASK, METRIC = "gen:chat_suite_pl", "collapse_rate"


def main(path: str) -> None:
    print(f"<!-- generated: python docs/results/qwen-chat-pl/paired.py {path} -->\n")
    rows = [r for r in load_results(path) if r.get("task") == TASK and r.get("metric") == METRIC]
    assert len({r["details"]["prompts"]["suite_sha256"] for r in rows}) == 1, "not the same prompts"
    uses = "| dialogue | instruction | long-form | summarization |"
    print(f"| float model | collapsed | rate [95 % CI] {uses} reasons |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    ok: dict[str, np.ndarray] = {}
    for r in rows:
        d = r["details"]
        n = d["prompts"]["n"]
        bad = np.zeros(n, dtype=bool)
        bad[d["collapsed_prompts"]] = True
        ok[r["model"]] = ~bad
        groups = d["prompts"]["collapsed_by_group"]
        cols = [
            f"{groups[g][0]}/{groups[g][1]}"
            for g in ("pl/dialogue", "pl/instruction", "pl/longform", "pl/summarization")
        ]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(d["reason_counts"].items()))
        rate = f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        print(f"| {r['model']} | {int(bad.sum())}/{n} | {rate} | " + " | ".join(cols) + f" | {reasons} |")
    (a, ok_a), (b, ok_b) = list(ok.items())
    t = mcnemar(ok_a, ok_b)
    print(
        f"\nMcNemar, {a} vs {b}: {t.a_only} prompts fine only with {a}, {t.b_only} only with {b}; "
        f"exact p = {t.p_value:.2g}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
