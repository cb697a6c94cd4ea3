"""lm-eval adapter: q2lab models run through lm-eval's own HFLM agree with q2lab's scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from q2lab.data.tasks import MCItem, MCTask
from q2lab.eval import harness
from q2lab.eval.multiple_choice import score_mc
from tests.tiny import make_tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'q2lab[eval]')")

ORDINARY = [
    MCItem("The quick brown fox", ["jumps over the lazy dog.", "is gold.", "saves nine."], 0),
    MCItem("All that glitters is ", ["not gold.", "not a way."], 1),  # trailing space moves
    MCItem("", ["a b", "c d"], 0),  # empty context: the prefix token (BOS)
    MCItem("Q", ["x", "y", "z"], 2),
    MCItem("Kwiatkowski jumped over 17 zebras and the wizard", ["vexed.", "was gold", "the", "thee"], 3),
]
PARTIAL = [
    MCItem.partial(["Litwo, ojczyzno moja! Ty", "Litwo, ojczyzno moja! Ile"], "jesteś jak zdrowie.", 0),
    MCItem.partial(["A stitch in time", "A stitch in lime"], "saves nine.", 1),
]


def _task(name: str, items: list[MCItem]) -> MCTask:
    for i, item in enumerate(items):
        item.id = f"{name}/{i}"
    return MCTask(name, items, "0" * 64, (), "test")


@pytest.mark.parametrize("add_bos", [False, True])
def test_lm_eval_agrees_with_our_scorer_on_a_tiny_model(add_bos, tmp_path):
    loaded = make_tiny_model("llama", seed=3, add_bos=add_bos)
    tasks = [_task("ordinary", list(ORDINARY)), _task("partial", list(PARTIAL))]
    theirs = harness.run_harness_mc(loaded, tasks, batch_size=4, workdir=tmp_path)
    for task in tasks:
        ours = score_mc(loaded, task)
        np.testing.assert_allclose(
            np.concatenate(ours.loglik), np.concatenate(theirs[task.name].loglik), rtol=0, atol=1e-4
        )
        np.testing.assert_array_equal(ours.acc, theirs[task.name].acc)
        if task.name == "ordinary":
            np.testing.assert_array_equal(ours.acc_norm, theirs[task.name].acc_norm)


def test_task_configs_are_plain_files(tmp_path):
    names = harness.write_task_configs([_task("my-set.jsonl", list(ORDINARY))], tmp_path)
    assert names == {"my-set.jsonl": "q2lab_my_set"}
    cfg = json.loads((tmp_path / "my_set.yaml").read_text())  # JSON is YAML
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    lines = (tmp_path / "my_set.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["context"] == "All that glitters is "  # verbatim, lm-eval moves the space
