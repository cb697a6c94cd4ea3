"""The result record: one metric of one task on one model, with its confidence interval.

This shape is a contract: ``q2lab eval --json`` writes a list of these, and a study's
``results.jsonl`` holds one per line with the cell's method, bits, bpw and provenance added.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    task: str  # e.g. "ppl:wikitext2", "mc:hellaswag", "gen:collapse"
    metric: str  # e.g. "ppl", "kld_mean", "acc_norm", "collapse_rate"
    value: float
    ci_low: float
    ci_high: float
    n: int  # number of resampling units (windows, items, prompts)
    higher_is_better: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # data hash, context length, ...

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("value", "ci_low", "ci_high"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None  # strict JSON
        return d
