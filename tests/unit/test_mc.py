"""Multiple-choice loaders and the log-likelihood scorer (tiny random models, staged data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from q2lab.data.tasks import MCItem, MCTask, load_mc_task, mc_task_names
from q2lab.errors import ConfigError, DataError
from q2lab.eval.multiple_choice import MCResult, mc_records, score_mc
from tests.tiny import make_tiny_model


# --------------------------------------------------------------------------- helpers
def hand_loglik(loaded, context: str, continuation: str) -> float:
    """lm-eval's recipe written out for one request: one full sequence, no batching or cache."""
    tok = loaded.tokenizer
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    if loaded.info.add_bos:
        ctx = [loaded.info.bos_token_id, *ctx]
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=seq[:, :-1]).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


def task_of(items: list[MCItem]) -> MCTask:
    return MCTask("unit", items, "0" * 64, (), "test prompt")


MIXED_ITEMS = [
    MCItem("The quick brown fox", ["jumps over the lazy dog.", "is gold.", "saves nine."], 0),
    MCItem("All that glitters is ", ["not gold.", "not a way."], 1),  # trailing space; shared " not"
    MCItem.partial(
        [
            "Zebras vex jumpy wizards: Litwo, ojczyzno moja! Ty",
            "Zebras vex jumpy wizards: Litwo, ojczyzno moja! Ile",
        ],
        "jesteś jak zdrowie.",
        0,
    ),
    MCItem("", ["a b", "c d"], 0),  # empty context: lm-eval's prefix token
    MCItem("Q", ["x", "y", "z"], 2),
    MCItem(
        "Kwiatkowski jumped quickly over 17 zebras (xyzzy) and the wizard",
        ["vexed.", "was gold", "the", "thee"],
        3,
    ),  # choices sharing a first token
]


@pytest.fixture(scope="module")
def tiny_bos():
    return make_tiny_model("llama", add_bos=True)


@pytest.fixture(scope="module")
def tiny_gemma3():
    """Sliding window of 8 tokens: the KV-cache path must respect it across the prefix."""
    return make_tiny_model("gemma3", add_bos=True)


# --------------------------------------------------------------------------- loaders
def test_hellaswag_first_staged_item(data_root):
    task = load_mc_task("hellaswag")
    assert len(task.items) == task.n_available == 7029
    first = task.items[0]
    # Item 0 of the official split ("Roof shingle removal: …") went to the holdout; the staged
    # file starts with the val split's next item in original order.
    assert first.context == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady"
    )
    assert first.choices[3] == "stands and lifts the weight over her head."
    assert first.label == 3 and first.id == "hellaswag/0" and not first.is_partial
    assert task.sha256 == "8664fd3840bd140214a3ad335d634c8fc597cca1e1937313b4ac6f575b7e1704"


@pytest.mark.parametrize(
    "name, count, n_choices",
    [
        ("arc_easy", 1663, 4),
        ("arc_challenge", 820, 4),
        ("piqa", 1287, 2),
        ("winogrande", 887, 2),
        ("commonsense_qa", 855, 5),
        ("mmlu", 9829, 4),  # the staged 70 % of the 14,042 test questions (SOURCES.md)
    ],
)
def test_task_counts_match_sources(data_root, name, count, n_choices):
    task = load_mc_task(name)
    assert len(task.items) == count
    assert {len(it.choices) for it in task.items} == {n_choices}
    assert len({it.id for it in task.items}) == count
    assert all(0 <= it.label < n_choices for it in task.items)


def test_arc_piqa_formatting(data_root):
    arc = load_mc_task("arc_easy", limit=1).items[0]
    assert arc.context == (
        "Question: Which statement best explains why photosynthesis is the foundation of "
        "most food webs?\nAnswer:"
    )
    assert arc.label == 0 and arc.choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    piqa = load_mc_task("piqa", limit=3)
    assert piqa.items[0].context == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert [it.label for it in piqa.items] == [0, 1, 1]  # valid-labels.lst, line-aligned
    assert piqa.items[1].choices == ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "]
    assert len(piqa.files) == 2


def test_commonsense_qa_and_winogrande(data_root):
    csqa = load_mc_task("commonsense_qa", limit=1).items[0]
    assert csqa.choices == ["bank", "library", "department store", "mall", "new york"] and csqa.label == 0
    assert csqa.context.startswith("Question: A revolving door") and csqa.context.endswith("?\nAnswer:")
    wino = load_mc_task("winogrande", limit=1).items[0]
    assert wino.is_partial and wino.label == 1
    head = "Sarah was a much better surgeon than Maria so "
    assert wino.pairs == [
        (head + "Sarah", "always got the easier cases."),
        (head + "Maria", "always got the easier cases."),
    ]
    assert wino.context == head


def test_mmlu_format_interleaving_and_shots(data_root):
    """lm-eval's MMLU prompt; items round-robin over the 57 subjects (so a ``limit`` is stratified);
    the 5-shot variant prefixes each subject's first five dev questions, solved."""
    head = load_mc_task("mmlu", limit=114)
    subjects = [it.id.split("/")[0] for it in head.items]
    assert len(set(subjects[:57])) == 57 and subjects[:57] == subjects[57:]
    first = head.items[1]  # anatomy's first test question
    assert first.context.startswith(
        "The following are multiple choice questions (with answers) about anatomy."
    )
    assert first.context.endswith(
        "\nD. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:"
    )
    assert first.choices == ["A", "B", "C", "D"] and first.label == 0
    five = load_mc_task("mmlu_5shot", limit=57).items[1]
    assert five.context.count("\nAnswer: ") == 5 and five.context.endswith(first.context.split("\n\n", 1)[1])
    assert len(load_mc_task("mmlu_5shot", limit=1).files) == 114


def test_limit_takes_first_items(data_root):
    full = load_mc_task("arc_challenge")
    five = load_mc_task("arc_challenge", limit=5)
    assert five.items == full.items[:5]
    assert (five.limit, five.n_available, five.sha256) == (5, 820, full.sha256)
    with pytest.raises(ConfigError, match="limit"):
        load_mc_task("arc_challenge", limit=0)


def test_unknown_task_lists_known_names():
    names = {"hellaswag", "arc_easy", "arc_challenge", "piqa", "commonsense_qa", "winogrande"}
    assert names <= set(mc_task_names())
    with pytest.raises(ConfigError, match=r"known: arc_challenge, .*hellaswag.*winogrande"):
        load_mc_task("hellaswagg")


def test_generic_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
        {"context": "Sky is", "choices": ["blue", "green", "red"], "label": 2, "id": 17},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    task = load_mc_task(str(path))
    assert [it.choices for it in task.items] == [["4", "5"], ["blue", "green", "red"]]
    assert [it.id for it in task.items] == [f"{path}/0", "17"]
    assert len(task.sha256) == 64 and task.files == (str(path),)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"context": "c", "choices": ["a", "b"], "label": 2}', "label 2 is out of range"),
        ('{"context": "c", "choices": ["a", "b"], "label": -1}', "out of range"),
        ('{"context": "c", "choices": ["a", "b"]}', "missing key.*label"),
        ('{"context": "c", "choices": ["a", "b"], "label": 0', "invalid JSON"),
        ('{"context": "c", "choices": ["a"], "label": 0}', "at least 2 choices"),
        ('{"context": "c", "choices": "ab", "label": 0}', "list of strings"),
        ('{"context": "c", "choices": ["a", "b"], "label": true}', "integer"),
        ('["c", ["a", "b"], 0]', "JSON object"),
    ],
)
def test_generic_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"context": "c", "choices": ["a", "b"], "label": 1}'
    path.write_text(f"{good}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        load_mc_task(str(path))
    assert f"{path}:3:" in str(err.value)


def test_generic_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mc_task(str(tmp_path / "missing.jsonl"))
    txt = tmp_path / "items.txt"
    txt.write_text("x\n")
    with pytest.raises(DataError, match=r"not \.jsonl"):
        load_mc_task(str(txt))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no items"):
        load_mc_task(str(empty))


# --------------------------------------------------------------------------- scorer
@pytest.mark.parametrize("model_fixture", ["tiny", "tiny_bos"])
def test_loglik_matches_hand_computation(request, model_fixture):
    loaded = request.getfixturevalue(model_fixture)
    items = MIXED_ITEMS[:3]
    result = score_mc(loaded, task_of(items))
    for item, ll in zip(items, result.loglik):
        expected = [hand_loglik(loaded, ctx, " " + choice) for ctx, choice in item.pairs]
        np.testing.assert_allclose(ll, expected, atol=1e-4)
    np.testing.assert_array_equal(result.lengths[0], [24, 8, 11])  # len(choice), no delimiter


def test_bos_changes_the_scores(tiny, tiny_bos):
    task = task_of([MIXED_ITEMS[0]])
    assert not np.allclose(score_mc(tiny, task).loglik[0], score_mc(tiny_bos, task).loglik[0])


@pytest.mark.parametrize("model_fixture", ["tiny", "tiny_bos", "tiny_gemma3"])
def test_shared_prefix_equals_one_sequence_per_choice(request, model_fixture):
    loaded = request.getfixturevalue(model_fixture)
    task = task_of(MIXED_ITEMS)
    plain = score_mc(loaded, task, shared_prefix=False)
    for batch_size in (1, 64):  # one item per batch; all items in one (mixed prefix lengths)
        shared = score_mc(loaded, task, batch_size=batch_size)
        for a, b in zip(shared.loglik, plain.loglik):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_shared_prefix_runs_each_context_once(tiny):
    context = "Kwiatkowski jumped quickly over 17 zebras (xyzzy) and the wizard"
    task = task_of([MCItem(f"{context} {i}", ["vexed.", "was gold", "the", "thee"], 0) for i in range(4)])
    shapes: list[tuple[int, int]] = []
    hook = tiny.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        score_mc(tiny, task, batch_size=16)
        shared, shapes[:] = list(shapes), []
        score_mc(tiny, task, batch_size=16, shared_prefix=False)
        plain = list(shapes)
    finally:
        hook.remove()
    # one pass over the 4 contexts, one over the 16 continuations on their KV caches
    assert [s[0] for s in shared] == [4, 16] and [s[0] for s in plain] == [16]
    tokens = [sum(rows * cols for rows, cols in passes) for passes in (shared, plain)]
    assert tokens[0] < 0.5 * tokens[1]


def _single_token_words(loaded, context: str) -> list[tuple[float, str]]:
    """(next-token logit, word) for vocabulary tokens " word" that stay one token after context."""
    tok = loaded.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ctx])).logits[0, -1]
    out = []
    for t in range(len(tok)):
        text = tok.decode([t])
        stays_one_token = tok(context + text, add_special_tokens=False)["input_ids"] == [*ctx, t]
        if text[:1] == " " and text[1:].isalpha() and stays_one_token:
            out.append((float(logits[t]), text[1:]))
    return sorted(out, reverse=True)


def test_accuracy_on_items_with_known_answers(tiny):
    """Single-token choices: the one the model ranks first must win, whatever its position."""
    contexts = ["The quick brown fox", "Where there is a will", "Numbers and symbols"]
    items = []
    for ctx in contexts:
        ranked = _single_token_words(tiny, ctx)
        assert len(ranked) >= 4
        best, others = ranked[0][1], [w for _, w in ranked[-3:]]
        items.append(MCItem(ctx, [*others[:2], best, others[2]], 2))  # gold = model's favourite
        items.append(MCItem(ctx, [best, *others], 3))  # gold = one of its least likely words
    result = score_mc(tiny, task_of(items))
    np.testing.assert_array_equal(result.acc, [True, False] * len(contexts))
    np.testing.assert_array_equal(result.pred, [2, 0] * len(contexts))
    for ll, item, pred_norm in zip(result.loglik, items, result.pred_norm):
        assert pred_norm == np.argmax(ll / np.array([len(c) for c in item.choices]))


def test_acc_norm_divides_by_choice_length_without_delimiter():
    # -1/1 > -9.5/10 is false (-1.0 < -0.95), so acc_norm picks choice 1; dividing by len + 1
    # (counting the " " delimiter) would pick choice 0 (-0.5 > -0.864).
    result = MCResult(
        "t",
        [np.array([-1.0, -9.5]), np.array([-2.0, -2.0, -3.0])],
        [np.array([1.0, 10.0]), np.array([5.0, 5.0, 1.0])],
        np.array([1, 1]),
        np.zeros(2, bool),
    )
    np.testing.assert_array_equal(result.pred, [0, 0])  # ties go to the first choice
    np.testing.assert_array_equal(result.pred_norm, [1, 0])
    np.testing.assert_array_equal(result.acc, [False, False])
    np.testing.assert_array_equal(result.acc_norm, [True, False])


def test_partial_scoring_acc_norm_equals_acc(tiny):
    contexts = ["Litwo, ojczyzno moja! Ty", "Litwo, ojczyzno moja! Ile"]
    items = [MCItem.partial(contexts, "jesteś jak zdrowie.", label) for label in (0, 1)]
    result = score_mc(tiny, task_of(items))
    np.testing.assert_array_equal(result.acc, result.acc_norm)
    assert result.acc.sum() == 1  # same scores, opposite labels


def test_left_truncation_to_model_context():
    loaded = make_tiny_model("llama", max_position_embeddings=32)
    context = ("Kwiatkowski jumped quickly over 17 zebras (xyzzy) while the wizard " * 3).strip()
    item = MCItem(context, ["vexed them.", "was gold"], 0)
    result = score_mc(loaded, task_of([item, MIXED_ITEMS[4]]))
    assert result.truncated.tolist() == [True, False]
    tok = loaded.tokenizer
    for choice, ll in zip(item.choices, result.loglik[0]):
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
        n_cont = len(whole) - len(ctx)
        seq = torch.tensor([whole[-33:]])  # lm-eval: (ctx + cont)[-(max_length + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(input_ids=seq[:, :-1]).logits[0].double(), -1)
        expected = logp[-n_cont:].gather(1, seq[0, -n_cont:, None]).sum()
        assert ll == pytest.approx(float(expected), abs=1e-4)
    with pytest.raises(DataError, match="does not fit"):
        score_mc(loaded, task_of([MCItem("a", [context, "b"], 0)]))


def test_mc_records(tiny):
    task = task_of(MIXED_ITEMS)
    result = score_mc(tiny, task)
    records = mc_records("mc:unit", task, result)
    assert [r.metric for r in records] == ["acc", "acc_norm"]
    for r, correct in zip(records, (result.acc, result.acc_norm)):
        assert r.task == "mc:unit" and r.higher_is_better and r.n == len(MIXED_ITEMS)
        assert r.value == pytest.approx(correct.mean())
        assert r.ci_low <= r.value <= r.ci_high
        assert r.details["data_sha256"] == task.sha256 and r.details["prompt"] == "test prompt"
        assert r.details["items"] == len(MIXED_ITEMS) and r.details["partial_scoring"]
    assert records[0].to_dict() == mc_records("mc:unit", task, result)[0].to_dict()  # seeded CI
    with pytest.raises(ConfigError):
        mc_records("mc:unit", task_of(MIXED_ITEMS[:2]), result)
