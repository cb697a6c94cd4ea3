"""The chat suite (issue 14 part 1): built from the staged data, deterministic in its seed, the
composition the issue asks for, and IFEval prompts held apart from the scored ones."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from q2lab.data.registry import seeded_subset
from q2lab.data.tasks import chat_suite as cs
from q2lab.errors import DataError

_BUILT: dict[int, cs.ChatSuite] = {}


@pytest.fixture()
def suite(data_root):  # data_root skips (fails under CI) without the staged data
    if 0 not in _BUILT:
        _BUILT[0] = cs.build_chat_suite(seed=0)
    return _BUILT[0]


def test_composition_meets_the_issue(suite) -> None:
    prompts = suite.prompts
    assert len(prompts) >= 200
    langs = Counter(p.lang for p in prompts)
    assert langs["pl"] / len(prompts) >= 0.40
    uses = Counter((p.lang, p.use) for p in prompts)
    for lang in ("en", "pl"):
        for use in cs.USES:
            assert uses[lang, use] >= 15, (lang, use)
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.messages for p in prompts}) == len(prompts)  # no request twice
    multi = [p for p in prompts if len(p.messages) == 3]
    assert len(multi) >= 10 and all(
        [m.role for m in p.messages] == ["user", "assistant", "user"] for p in multi
    )
    for p in prompts:
        assert p.messages[-1].role == "user" and p.text.strip()
        assert p.max_new_tokens == (256 if p.use == "longform" else 128)


def test_held_apart_ifeval_prompts_are_not_the_scored_ones(suite, data_root) -> None:
    from q2lab.eval.ifeval import load_ifeval

    scored = {it.prompt for it in load_ifeval("ifeval", **cs.IFEVAL_SCORED).items}
    apart = [p for p in suite.prompts if p.source == "ifeval:held-apart"]
    assert len(apart) == cs.COUNTS["en", "instruction"]
    assert not scored & {p.text for p in apart}
    staged = {json.loads(line)["prompt"] for line in (data_root / "ifeval" / "input_data.jsonl").open()}
    assert {p.text for p in apart} <= staged


def test_the_suite_is_a_function_of_the_seed(suite) -> None:
    again = cs.build_chat_suite(seed=0)
    assert again.sha256 == suite.sha256 and again.prompts == suite.prompts
    other = cs.build_chat_suite(seed=1)
    assert other.sha256 != suite.sha256 and len(other.prompts) == len(suite.prompts)
    assert suite.subset("pl").sha256 != suite.sha256
    assert {p.lang for p in suite.subset("en").prompts} == {"en"}


def test_summaries_are_whole_cleaned_sentences(suite) -> None:
    for p in suite.prompts:
        if p.use != "summarization":
            continue
        passage = p.text.split("\n\n", 1)[1]
        assert 80 <= len(passage.split()) <= 180
        assert passage.rstrip()[-1] in '.!?…"”»)', passage[-40:]
        assert " @-@ " not in passage and " , " not in passage


def test_round_trip_through_a_file(suite, tmp_path) -> None:
    path = tmp_path / "suite.jsonl"
    cs.main(["--seed", "0", "--out", str(path)])
    back = tuple(cs.SuitePrompt.from_dict(json.loads(line)) for line in path.read_text().splitlines())
    assert back == suite.prompts and cs.suite_sha256(back) == suite.sha256


def test_untokenize_wikitext() -> None:
    raw = ' The city , which was built in 1 @,@ 200 , had a " well @-@ known " market ( the largest ) . '
    assert (
        cs._untokenize_wikitext(raw)
        == 'The city, which was built in 1,200, had a "well-known" market (the largest).'
    )


def test_seeded_subset_is_what_ifeval_sampled_before() -> None:
    """The shared helper keeps the IFEval study's subset (its records pair on these ids)."""
    import numpy as np

    old = sorted(int(i) for i in np.random.default_rng(0).choice(541, size=271, replace=False))
    assert seeded_subset(541, 271, 0) == old


def test_missing_data_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("Q2LAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"missing data file .*mt_bench/question.jsonl"):
        cs.build_chat_suite()
