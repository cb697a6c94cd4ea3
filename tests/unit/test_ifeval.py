"""IFEval: loading the staged prompts, strict/loose checks (agreeing with lm-eval's own ifeval
task on the same answers), the four accuracies and their CIs, resumable generation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from q2lab.errors import ConfigError, DataError
from q2lab.eval import ifeval
from q2lab.eval.generation import chat_prompt
from q2lab.eval.ifeval import IFEvalItem, IFEvalRun, IFEvalSet, Verdict, ifeval_records, load_ifeval, verify
from q2lab.eval.tasks import Evaluator, TaskSpec, parse_task
from q2lab.utils.io import sha256_json
from tests.tiny import make_tiny_model

pytest.importorskip("if_verifiable", reason="if-verifiable is not installed (pip install 'q2lab[eval]')")

NO_COMMA = IFEvalItem(1, "Say hi without commas.", ("punctuation:no_comma",), ({},))
LOWER = IFEvalItem(2, "Answer in lowercase.", ("change_case:english_lowercase",), ({},))
WORDS = IFEvalItem(
    3,
    "Write at least 5 words, no commas.",
    ("length_constraints:number_words", "punctuation:no_comma"),
    ({"relation": "at least", "num_words": 5}, {}),
)


def _set(items: list[IFEvalItem]) -> IFEvalSet:
    return IFEvalSet("test", tuple(items), "0" * 64, len(items))


def test_staged_prompts_load(data_root):
    data = load_ifeval("ifeval")
    assert len(data.items) == data.n_available == 541
    assert all(len(it.instruction_ids) == len(it.kwargs) >= 1 for it in data.items)
    assert len(load_ifeval("ifeval", limit=7).items) == 7


def test_a_seeded_sample_is_the_same_subset_for_every_model(data_root):
    from q2lab.eval.tasks import parse_task

    full = load_ifeval("ifeval")
    half = load_ifeval("ifeval", sample=271, seed=0)
    again = load_ifeval("ifeval", sample=271, seed=0)
    keys = [it.key for it in half.items]
    assert len(keys) == len(set(keys)) == 271 and keys == [it.key for it in again.items]
    order = {it.key: i for i, it in enumerate(full.items)}
    assert [order[k] for k in keys] == sorted(order[k] for k in keys)  # file order kept
    assert keys != [it.key for it in load_ifeval("ifeval", sample=271, seed=1).items]
    with pytest.raises(ConfigError, match="sample of 600"):
        load_ifeval("ifeval", sample=600)
    assert parse_task({"task": "ifeval:ifeval", "sample": 271}).key() != parse_task("ifeval:ifeval").key()
    with pytest.raises(ConfigError, match="no 'sample' option"):
        parse_task({"task": "mc:arc_easy", "sample": 10})


def test_bad_files_and_names_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "prompt": "x", "instruction_id_list": ["a"], "kwargs": []}\n')
    with pytest.raises(DataError, match="equally long"):
        load_ifeval(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(DataError, match="not an IFEval record"):
        load_ifeval(str(bad))
    with pytest.raises(ConfigError, match="unknown IFEval set"):
        load_ifeval("mmlu")
    with pytest.raises(DataError, match="unknown instruction"):
        verify(IFEvalItem(1, "x", ("made:up",), ({},)), "answer")


def test_strict_and_loose_checks():
    # A preamble line breaks "no commas" strictly; loose drops the first line and passes.
    v = verify(NO_COMMA, "Sure, here it is:\nhi there friend")
    assert v.strict == (False,) and v.loose == (True,)
    assert verify(NO_COMMA, "hi there friend").prompt_strict
    assert not verify(NO_COMMA, "hi, there, friend").prompt_loose
    assert verify(LOWER, "this whole answer is written in plain lowercase english words.").prompt_strict
    assert not verify(LOWER, "This Answer Has Capitals In English Words Everywhere.").prompt_loose
    v = verify(WORDS, "one two three four five six")
    assert v.strict == (True, True)
    v = verify(WORDS, "one, two")
    assert v.strict == (False, False) and not v.prompt_loose


def test_an_empty_answer_fails_every_instruction():
    v = verify(WORDS, "   ")
    assert v.strict == v.loose == (False, False)


def _random_check(item: IFEvalItem) -> bool:
    """A letter the check cannot use: the Google code then draws one at random."""
    letters = [k.get("letter") for k in item.kwargs if "letter" in k]
    return any(not (isinstance(c, str) and len(c) == 1 and c.isascii() and c.isalpha()) for c in letters)


def test_checks_with_a_random_argument_are_deterministic(data_root):
    item = next(it for it in load_ifeval("ifeval").items if _random_check(it))
    answers = ["make a tweet #a #b #c #d " + c * n for c in "abcdefghij" for n in (0, 5)]
    first = [verify(item, a).strict for a in answers]
    assert [verify(item, a).strict for a in answers] == first


def test_checks_agree_with_lm_eval_ifeval_on_staged_prompts(data_root):
    """Independent oracle: lm-eval's own ifeval task (its copy of the Google checks) gives the
    same strict and loose verdicts on the same answers.  Prompts with the sentence counter are
    left out: lm-eval needs NLTK's downloaded Punkt model for it (see the module docstring)."""
    pytest.importorskip("lm_eval")
    ifeval._registry()  # puts the offline punkt_tab on NLTK's path before lm-eval's import looks
    from lm_eval.tasks.ifeval.utils import process_results

    items = [
        it
        for it in load_ifeval("ifeval", limit=80).items
        if not any("sentences" in i for i in it.instruction_ids) and not _random_check(it)
    ]
    answers = [
        lambda it: it.prompt,
        lambda it: it.prompt.lower(),
        lambda it: it.prompt.upper().replace(",", ""),
        lambda it: "Sure, here you go:\n" + json.dumps({"answer": it.prompt}) + "\nHope this helps!",
        lambda it: "*Title* <<poem>>\n\n" + " ".join(["word"] * 400) + "\nP.S. bye",
    ]
    compared = 0
    for it in items:
        for make in answers:
            answer = make(it)
            ours = verify(it, answer)
            doc = {"key": it.key, "instruction_id_list": list(it.instruction_ids), "prompt": it.prompt}
            doc["kwargs"] = [dict(k) for k in it.kwargs]
            theirs = process_results(doc, [answer])
            assert list(ours.strict) == theirs["inst_level_strict_acc"], (it.key, answer[:80])
            assert list(ours.loose) == theirs["inst_level_loose_acc"], (it.key, answer[:80])
            compared += 1
    assert compared >= 300
    # the oracle comparison is not vacuous: both outcomes occur
    flat = [verify(it, make(it)).strict[0] for it in items[:20] for make in answers]
    assert any(flat) and not all(flat)


def test_records_give_the_four_accuracies_with_cis():
    items = [NO_COMMA, LOWER, WORDS]
    verdicts = [
        Verdict(NO_COMMA.instruction_ids, (True,), (True,)),
        Verdict(LOWER.instruction_ids, (False,), (True,)),
        Verdict(WORDS.instruction_ids, (True, False), (True, True)),
    ]
    run = IFEvalRun(tuple(items), ["a", "b", "c"], verdicts, 16, False, [False, True, False])
    recs = {r.metric: r for r in ifeval_records("ifeval:test", _set(items), run)}
    assert recs["prompt_strict"].value == pytest.approx(1 / 3)
    assert recs["prompt_loose"].value == pytest.approx(1.0)
    assert recs["inst_strict"].value == pytest.approx(2 / 4)
    assert recs["inst_loose"].value == pytest.approx(1.0)
    for r in recs.values():
        assert r.n == 3 and r.ci_low <= r.value <= r.ci_high
    d = recs["prompt_strict"].details
    assert d["answers_at_limit"] == 1 and d["per_instruction"]["punctuation:no_comma"] == [1, 2, 2]
    assert d["verifier"].startswith("if-verifiable")


def test_task_parsing_defaults_and_stable_keys():
    t = parse_task("ifeval:ifeval")
    assert t.max_new_tokens == ifeval.DEFAULT_MAX_NEW_TOKENS and t.chat is None
    assert parse_task({"task": "ifeval:ifeval", "chat": False}).chat is False
    with pytest.raises(ConfigError, match="chat must be"):
        parse_task({"task": "ifeval:ifeval", "chat": "yes"})
    # a task from before the `chat`, `temperature`, `seed`, `sample`, `kv` and `tag` fields keeps its
    # resume key
    old = TaskSpec("mc", "hellaswag", limit=5)
    later = ("chat", "temperature", "seed", "sample", "kv", "tag")
    legacy = {k: v for k, v in old.__dict__.items() if k not in later}
    assert old.key() == sha256_json(legacy)[:12]
    assert TaskSpec("mc", "hellaswag", limit=5, chat=True).key() != old.key()


def test_generation_resumes_from_the_partial_file(tmp_path, monkeypatch):
    loaded = make_tiny_model("llama", seed=1)
    data = _set([NO_COMMA, LOWER, WORDS])
    resume = tmp_path / "partial.jsonl"
    first = ifeval.run_ifeval(loaded, data, max_new_tokens=4, chat=False, batch_size=2, resume=resume)
    assert len(resume.read_text().splitlines()) == 3 and len(first.verdicts) == 3
    assert [len(v.strict) for v in first.verdicts] == [1, 1, 2]
    # a torn last line (crash mid-write) is ignored; everything else is reused, nothing regenerated
    with open(resume, "a") as fh:
        fh.write('{"key": 3, "te')
    import q2lab.eval.generation as gen

    monkeypatch.setattr(
        gen, "generate", lambda *a, **k: pytest.fail("answers should come from the resume file")
    )
    again = ifeval.run_ifeval(loaded, data, max_new_tokens=4, chat=False, batch_size=2, resume=resume)
    assert again.answers == first.answers
    # other settings do not reuse those answers
    monkeypatch.undo()
    other = ifeval.run_ifeval(loaded, data, max_new_tokens=3, chat=False, batch_size=3, resume=resume)
    assert len(other.answers) == 3 and len(resume.read_text().splitlines()) == 7


def test_evaluator_runs_ifeval_with_a_resume_file_per_candidate(tmp_path):
    loaded = make_tiny_model("llama", seed=1)
    path = tmp_path / "items.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "key": it.key,
                    "prompt": it.prompt,
                    "instruction_id_list": list(it.instruction_ids),
                    "kwargs": list(it.kwargs),
                }
            )
            + "\n"
            for it in (NO_COMMA, LOWER)
        )
    )
    task = parse_task({"task": f"ifeval:{path}", "max_new_tokens": 3, "chat": False})
    ev = Evaluator(None, workdir=tmp_path / "work")
    recs = ev.run(loaded, [task])
    assert [r.metric for r in recs] == ["prompt_strict", "prompt_loose", "inst_strict", "inst_loose"]
    assert all(0 <= r.value <= 1 and r.n == 2 for r in recs)
    assert len(list((tmp_path / "work" / "partial").glob("ifeval-*.jsonl"))) == 1
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompt(loaded, "hi", chat=True)
    np.testing.assert_equal(chat_prompt(loaded, "hi"), "hi")


def test_a_chat_rendering_that_starts_with_bos_gets_no_second_bos():
    from q2lab.eval.generation import encode_prompt

    loaded = make_tiny_model("llama", add_bos=True)
    bos = loaded.tokenizer.bos_token
    assert (
        encode_prompt(loaded, bos + "hi") == encode_prompt(loaded, "hi") == [loaded.info.bos_token_id, 73, 74]
    )
