"""Acceptance: q2lab's MC scorer and lm-eval agree on SmolLM2-135M (HellaSwag, ARC-Easy)."""

from __future__ import annotations

import numpy as np
import pytest

from q2lab.data.tasks import load_mc_task
from q2lab.eval.multiple_choice import score_mc

pytestmark = pytest.mark.integration
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'q2lab[eval]')")


def test_our_scorer_matches_lm_eval_exactly(smollm2, data_root, tmp_path):
    from q2lab.eval.harness import run_harness_mc

    tasks = [load_mc_task("hellaswag", limit=12), load_mc_task("arc_easy", limit=16)]
    theirs = run_harness_mc(smollm2, tasks, batch_size=8, workdir=tmp_path)
    for task in tasks:
        ours, ref = score_mc(smollm2, task), theirs[task.name]
        # per-request log-likelihoods: identical tokens, float32 batching noise only
        np.testing.assert_allclose(np.concatenate(ours.loglik), np.concatenate(ref.loglik), rtol=0, atol=2e-3)
        np.testing.assert_array_equal(ours.acc, ref.acc)  # exact, item by item
        np.testing.assert_array_equal(ours.acc_norm, ref.acc_norm)
        print(
            f"\n{task.name}: {len(task.items)} items, acc {ours.acc.mean():.4f} "
            f"(lm-eval {ref.acc.mean():.4f}), "
            f"acc_norm {ours.acc_norm.mean():.4f} (lm-eval {ref.acc_norm.mean():.4f}), max |Δ loglik| "
            f"{np.abs(np.concatenate(ours.loglik) - np.concatenate(ref.loglik)).max():.2e}"
        )
