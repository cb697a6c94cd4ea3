"""``gen:chat_suite``: the suite as a prompt set (turns, per-prompt lengths, metadata), rendered
through a chat template or the stated plain frame, generated with each prompt's own length."""

from __future__ import annotations

import pytest

from q2lab.errors import ConfigError, ShapeError
from q2lab.eval import generation as gen
from q2lab.eval.tasks import Evaluator, parse_task

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture()
def suite(data_root):
    return gen.load_prompts("chat_suite")


def test_the_suite_is_a_prompt_set_with_turns_lengths_and_metadata(suite) -> None:
    n = len(suite.prompts)
    assert n >= 200 and len(suite.turns) == len(suite.lengths) == len(suite.meta) == n
    assert all(t[-1] == ("user", p) for t, p in zip(suite.turns, suite.prompts))
    assert {m["use"]: n for m, n in zip(suite.meta, suite.lengths)}["longform"] == 256
    pl = gen.load_prompts("chat_suite_pl")
    assert {m["lang"] for m in pl.meta} == {"pl"} and pl.sha256 != suite.sha256
    head = suite.head(10)
    assert head.prompts == suite.prompts[:10] and head.lengths == suite.lengths[:10]
    assert head.sha256 != suite.sha256 and suite.head(None) is suite
    # one hash formula: a cut suite hashes as the suite builder hashes those prompts
    from q2lab.data.tasks.chat_suite import build_chat_suite, suite_sha256

    assert head.sha256 == suite_sha256(build_chat_suite(0).prompts[:10])
    assert suite.sha256 == build_chat_suite(0).sha256


def test_a_seeded_sample_spreads_over_every_use_and_language(suite) -> None:
    """``sample: N`` on a gen task: N prompts drawn with the task's seed, kept in suite order, so
    a large model's cell covers what the whole suite covers (a head cut is MT-Bench only)."""
    from q2lab.data.tasks.chat_suite import build_chat_suite, suite_sha256
    from q2lab.eval.kinds.gen import _selected
    from q2lab.eval.tasks import parse_task

    s = suite.sample(60, seed=0)
    all_ids = [m["id"] for m in suite.meta]
    ids = [m["id"] for m in s.meta]
    assert len(ids) == len(set(ids)) == 60 and ids == sorted(ids, key=all_ids.index)
    assert {m["lang"] for m in s.meta} == {"en", "pl"}
    assert {m["use"] for m in s.meta} == {m["use"] for m in suite.meta}
    assert {m["use"] for m in suite.head(60).meta} == {"dialogue"}
    assert s.sha256 == suite_sha256([p for p in build_chat_suite(0).prompts if p.id in set(ids)])
    assert suite.sample(60, seed=0).sha256 == s.sha256 != suite.sample(60, seed=1).sha256
    assert suite.sample(None) is suite and suite.sample(10**6) is suite
    task = parse_task({"task": "gen:chat_suite", "sample": 60})
    assert _selected(task).sha256 == s.sha256 and task.key() != parse_task("gen:chat_suite").key()


def test_plain_frame_and_chat_template(tiny) -> None:
    turns = (("user", "Hi?"), ("assistant", "Hello."), ("user", "And now?"))
    text, how = gen.render_conversation(tiny, turns)  # the tiny tokenizer has no template
    assert how == "user/assistant frame"
    assert text == "User: Hi?\n\nAssistant: Hello.\n\nUser: And now?\n\nAssistant:"
    with pytest.raises(ConfigError, match="has no chat template; set chat: false"):
        gen.render_conversation(tiny, turns, chat=True)
    tiny.tokenizer.chat_template = TEMPLATE
    try:
        text, how = gen.render_conversation(tiny, turns)
        assert how == "chat template"
        assert text == "<|user|>Hi?\n<|assistant|>Hello.\n<|user|>And now?\n<|assistant|>"
        assert gen.render_conversation(tiny, turns, chat=False)[1] == "user/assistant frame"
    finally:
        tiny.tokenizer.chat_template = None


@pytest.mark.parametrize("greedy", [True, False])
def test_per_prompt_lengths_equal_generating_each_length_alone(tiny, greedy) -> None:
    prompts = ["The quick brown fox", "Numbers", "A stitch in time", "zz top"]
    lengths = [6, 11, 6, 11]
    mixed = gen.generate(tiny, prompts, max_new_tokens=lengths, greedy=greedy, seed=5, batch_size=4)
    assert [s.max_new_tokens for s in mixed] == lengths and [s.prompt for s in mixed] == prompts
    for n in (6, 11):
        alone = gen.generate(tiny, prompts, max_new_tokens=n, greedy=greedy, seed=5, batch_size=4)
        assert [a for a, m in zip(alone, lengths) if m == n] == [s for s in mixed if s.max_new_tokens == n]
    with pytest.raises(ShapeError, match="3 max_new_tokens values for 4 prompts"):
        gen.generate(tiny, prompts, max_new_tokens=[4, 4, 4])


@pytest.mark.filterwarnings("ignore:the reference itself collapses")  # a random tiny model loops
def test_suite_task_end_to_end(tiny, data_root, monkeypatch) -> None:
    monkeypatch.setattr(tiny.model.config, "max_position_embeddings", 1024)  # suite prompts + 256
    task = parse_task({"task": "gen:chat_suite", "limit": 6, "batch_size": 6})
    assert task.max_new_tokens is None  # each prompt's own
    assert parse_task({"task": "gen:chat_suite", "max_new_tokens": 5}).max_new_tokens == 5
    assert parse_task("gen:collapse").max_new_tokens == 64
    recs = {r.metric: r for r in Evaluator(tiny).run(tiny, [task])}
    prompts = recs["collapse_rate"].details["prompts"]
    assert prompts["n"] == 6 and prompts["rendering"] == "user/assistant frame"
    assert prompts["suite_sha256"] == gen.load_prompts("chat_suite").head(6).sha256
    assert sum(n for _, n in prompts["collapsed_by_group"].values()) == 6
    assert recs["collapse_rate"].details["max_new_tokens"] == 128


def test_a_plain_prompt_set_needs_a_length(tiny) -> None:
    from q2lab.eval.kinds.gen import _lengths

    with pytest.raises(ConfigError, match="max_new_tokens is needed"):
        _lengths(gen.load_prompts("default"), parse_task({"task": "gen:collapse", "max_new_tokens": None}))


@pytest.mark.filterwarnings("ignore:the reference itself collapses")
def test_samples_resume_from_the_workdir_and_are_shared_across_evaluators(
    tiny, tmp_path, monkeypatch
) -> None:
    """A study keeps every generated batch: a second evaluator on the same workdir (another
    process, or the same cell judged again) reuses the reference's and the candidate's samples."""
    from tests.tiny import make_tiny_model

    cand = make_tiny_model("llama", seed=3)
    task = parse_task({"task": "gen:default", "limit": 4, "max_new_tokens": 6, "batch_size": 2})
    first = Evaluator(tiny, workdir=tmp_path, candidate_key="cell-a").run(cand, [task])
    files = sorted(p.name for p in (tmp_path / "partial").glob("gen-*.jsonl"))
    assert len(files) == 2  # the reference's and the candidate's
    assert len(list((tmp_path / "partial").glob("refnll-*.jsonl"))) == 1  # its NLL of its own samples
    monkeypatch.setattr(gen, "_generate_batch", lambda *a, **k: pytest.fail("samples should be reused"))
    monkeypatch.setattr(gen, "reference_nll", lambda *a, **k: pytest.fail("the NLL should be reused"))
    again = Evaluator(tiny, workdir=tmp_path, candidate_key="cell-a").run(cand, [task])
    assert [(r.metric, r.value) for r in again] == [(r.metric, r.value) for r in first]
    monkeypatch.undo()
    # other settings (another length) are another task key: decoded again, into their own files
    longer = parse_task({"task": "gen:default", "limit": 4, "max_new_tokens": 7, "batch_size": 2})
    Evaluator(tiny, workdir=tmp_path, candidate_key="cell-a").run(cand, [longer])
    lines = {p.name: len(p.read_text().splitlines()) for p in (tmp_path / "partial").glob("gen-*.jsonl")}
    assert set(files) < set(lines) and len(lines) == 4 and set(lines.values()) == {4}


def test_a_prompt_longer_than_the_context_is_one_clear_error(tiny) -> None:
    from q2lab.errors import DataError
    from q2lab.eval.multiple_choice import max_context

    limit = max_context(tiny)
    with pytest.raises(
        DataError, match=rf"prompt 1 is \d+ tokens; with max_new_tokens 4 it exceeds .*{limit}"
    ):
        gen.generate(tiny, ["short", "word " * limit], max_new_tokens=4)
