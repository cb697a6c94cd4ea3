"""Generation-collapse check on SmolLM2-135M: the float model's own greedy continuations of the
default prompts are not flagged, deliberately broken copies are.

One reference generation (8 prompts × 64 tokens) is shared by all tests in this module.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from q2lab.eval.generation import (
    CollapseThresholds,
    collapse_records,
    generate,
    is_collapsed,
    load_prompts,
    reference_nll,
    sample_metrics,
)

pytestmark = pytest.mark.integration

MAX_NEW = 64


@pytest.fixture(scope="module")
def reference(smollm2):
    """(prompt set, float samples, their NLL under the float model, calibrated thresholds)."""
    prompts = load_prompts("default")
    samples = generate(smollm2, prompts, max_new_tokens=MAX_NEW)
    nll = reference_nll(smollm2, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the float model must not break its own thresholds
        thresholds = CollapseThresholds.from_reference(samples, ref_nll=nll)
    return prompts, samples, nll, thresholds


def by_metric(records):
    return {r.metric: r for r in records}


def test_float_model_is_not_flagged(reference):
    prompts, samples, nll, thresholds = reference
    assert all(s.n_new >= 16 for s in samples)  # the prompts invite real continuations
    assert sum(s.n_new for s in samples) >= 6 * MAX_NEW
    assert max(nll) < 2.0  # greedy text is the reference's own mode
    recs = by_metric(collapse_records("gen:collapse", samples, thresholds, ref_nll=nll, prompt_set=prompts))
    assert recs["collapse_rate"].value == 0.0, recs["collapse_rate"].details["examples"]
    assert recs["collapse_rate"].n == len(prompts.prompts)
    assert recs["rep4"].value < 0.05 and recs["distinct2"].value > 0.85
    details = recs["collapse_rate"].details
    assert details["prompts"]["name"] == "default" and details["max_new_tokens"] == MAX_NEW
    json.dumps([r.to_dict() for r in recs.values()])
    # the uncalibrated defaults do not flag the float model either
    defaults = [is_collapsed(sample_metrics(s, v), CollapseThresholds())[0] for s, v in zip(samples, nll)]
    assert not any(defaults)


def test_forced_loop_is_flagged(smollm2, reference):
    """After a few free tokens a logits processor replays the last five tokens forever."""
    prompts, _, _, thresholds = reference
    steps = {"n": 0}

    def replay(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        if steps["n"] <= 8:
            return logits
        forced = torch.full_like(logits, -torch.inf)
        forced.scatter_(1, ids[:, -5:-4], 0.0)
        return forced

    looped = generate(smollm2, prompts.prompts[:4], max_new_tokens=MAX_NEW, logits_processor=replay)
    recs = by_metric(collapse_records("gen:collapse", looped, thresholds))
    assert recs["collapse_rate"].value == 1.0
    assert recs["longest_loop"].value >= 48
    examples = recs["collapse_rate"].details["examples"]
    assert all(e["reasons"][0].startswith("loop") for e in examples)


def test_noised_copy_is_flagged(smollm2, reference):
    """Weights drowned in noise emit varied junk: caught by the reference NLL and the entropy."""
    prompts, _, _, thresholds = reference
    broken = copy.copy(smollm2)
    broken.model = copy.deepcopy(smollm2.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in broken.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                w.add_(torch.randn(w.shape, generator=gen) * 2.0 * w.std())
    junk = generate(broken, prompts.prompts[:4], max_new_tokens=MAX_NEW)
    del broken
    nll = reference_nll(smollm2, junk)
    recs = by_metric(collapse_records("gen:collapse", junk, thresholds, ref_nll=nll))
    assert recs["collapse_rate"].value == 1.0
    assert recs["ref_nll"].value > 8.0
    assert recs["collapse_rate"].details["reason_counts"].get("gibberish") == 4
