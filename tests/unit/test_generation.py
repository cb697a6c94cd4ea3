"""Generation-collapse check: metrics on hand-made sequences, the verdict on planted failure
modes, threshold calibration, records, prompt files, and decoding on the tiny model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from q2lab.errors import ConfigError, DataError, ShapeError
from q2lab.eval import generation as gen
from q2lab.eval.generation import (
    DEFAULT_PROMPTS,
    CollapseThresholds,
    GenSample,
    collapse_records,
    distinct_n,
    early_eos,
    generate,
    is_collapsed,
    load_prompts,
    longest_loop,
    ngram_entropy,
    rep_n,
    sample_metrics,
    zlib_ratio,
)
from tests.tiny import make_tiny_model

ABC3 = [1, 2, 3] * 3  # "a b c a b c a b c"

# ------------------------------------------------------------------ synthetic samples
# Word-level "tokenisation": one id per word or punctuation mark, roughly what a large BPE
# vocabulary does to English, so the thresholds meant for real tokenizers apply.
_VOCAB: dict[str, int] = {}

PARAGRAPHS = [
    "The committee met on a grey Thursday morning to review the budget. Most members agreed that the "
    "library needed a new roof before winter, but nobody could say where the money would come from. "
    "After an hour of polite argument, they asked the treasurer to prepare two options for next month.",
    "Honeybees tell each other where flowers are through a movement called the waggle dance. The angle "
    "of the dance shows the direction of the food, while its length signals the distance. Scientists "
    "first decoded this behaviour in the 1940s, and it is still studied in labs around the world.",
    "She opened the window and listened to the rain. Somewhere below, a dog barked twice and fell "
    "silent. The letter on the table was still unopened; she knew what it said, and she was not ready "
    "to read it yet. Instead she made tea and watched the street lights come on one by one.",
]


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def sample(
    text: str | list[str], *, hit_eos: bool = False, max_new: int = 64, prompt: str = "p"
) -> GenSample:
    toks = words(text) if isinstance(text, str) else text
    ids = tuple(_VOCAB.setdefault(w, len(_VOCAB) + 10) for w in toks)
    return GenSample(prompt, " ".join(toks), ids, hit_eos, len(ids), max_new)


def reasons_of(s: GenSample, thresholds: CollapseThresholds | None = None, **kw) -> list[str]:
    collapsed, reasons = is_collapsed(sample_metrics(s, **kw), thresholds or CollapseThresholds())
    assert collapsed == bool(reasons)
    return reasons


def families(reasons: list[str]) -> set[str]:
    return {r.split(":")[0] for r in reasons}


# ------------------------------------------------------------------ metrics
def test_metrics_on_abc_loop():
    # 4-grams: abca bcab cabc abca bcab cabc → 3 distinct of 6; bigrams ab bc ca … → 3 of 8
    assert rep_n(ABC3, 4) == pytest.approx(0.5)
    assert distinct_n(ABC3, 2) == pytest.approx(3 / 8)
    assert longest_loop(ABC3) == (9, 3)
    assert ngram_entropy(ABC3) == pytest.approx(math.log2(3))


def test_rep_and_distinct_edge_cases():
    assert rep_n(list(range(20)), 4) == 0.0
    assert distinct_n(list(range(20)), 2) == 1.0
    assert rep_n([7] * 10, 4) == pytest.approx(6 / 7)  # 7 four-grams, one distinct
    assert rep_n([1, 1, 2], 1) == pytest.approx(1 / 3)
    assert rep_n([1, 2, 3], 4) == 0.0  # shorter than n: no n-grams
    assert distinct_n([5], 2) == 1.0
    assert rep_n(np.array([3, 3, 3, 3]), 2) == pytest.approx(2 / 3)  # numpy input
    with pytest.raises(ConfigError):
        rep_n([1, 2], 0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 5, rng.integers(0, 40))
        assert rep_n(ids, 3) == pytest.approx(1 - distinct_n(ids, 3) if len(ids) >= 3 else 0.0)


def _brute_force_loop(a: list[int]) -> tuple[int, int]:
    best = (0, 0)
    for p in range(1, len(a) // 2 + 1):
        for i, j in itertools.combinations(range(len(a) + 1), 2):
            span = a[i:j]
            periodic = all(span[k] == span[k + p] for k in range(len(span) - p))
            if len(span) >= 2 * p and periodic and len(span) > best[0]:
                best = (len(span), p)
    return best


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        ("abcabcabc", (9, 3)),
        ("abcabcab", (8, 3)),  # a partial repeat at the end still belongs to the loop
        ("aaaa", (4, 1)),  # ties go to the shortest period
        ("xyzababababq", (8, 2)),  # loop in the middle
        ("hello world", (2, 1)),  # "ll": a one-token stutter
        ("abcdefg", (0, 0)),
        ("", (0, 0)),
        ("a", (0, 0)),
    ],
)
def test_longest_loop_known(seq, expected):
    assert longest_loop([ord(c) for c in seq]) == expected


def test_longest_loop_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(60):
        a = rng.integers(0, 3, rng.integers(0, 18)).tolist()
        length, period = longest_loop(a)
        assert length == _brute_force_loop(a)[0], a
        if length:  # the reported period generates a span of that length
            assert length >= 2 * period
            assert any(
                all(a[i + k] == a[i + k + period] for k in range(length - period))
                for i in range(len(a) - length + 1)
            ), a


def test_zlib_ratio():
    text = "The quick brown fox jumps over the lazy dog."
    raw = text.encode()
    assert zlib_ratio(text) == pytest.approx(len(raw) / len(zlib.compress(raw, 9)))
    assert zlib_ratio("") == 0.0
    assert zlib_ratio("I am sorry. " * 30) > 5
    assert zlib_ratio(PARAGRAPHS[0]) < 2


def test_ngram_entropy():
    assert ngram_entropy(list(range(8))) == pytest.approx(3.0)
    assert ngram_entropy([4] * 10) == 0.0
    assert ngram_entropy([1, 1, 2, 2]) == pytest.approx(1.0)
    assert ngram_entropy([]) == 0.0
    m = sample_metrics(sample(list("abcdefgh")))
    assert m.entropy_ratio == pytest.approx(1.0)


def test_early_eos():
    assert early_eos(3, True, 8)
    assert not early_eos(3, False, 8)  # cut off by max_new_tokens is never early
    assert not early_eos(8, True, 8)


# ------------------------------------------------------------------ planted failure modes
def test_normal_paragraphs_not_flagged():
    for p in PARAGRAPHS:
        s = sample(words(p)[:64])
        assert reasons_of(s) == [], p
        assert reasons_of(s, ref_nll=3.5) == []  # human prose costs ~3.5 nats/token


def test_pure_loop_flagged():
    s = sample("the cat sat on the mat . " * 9)
    m = sample_metrics(s)
    assert (m.longest_loop, m.loop_period) == (63, 7)
    assert {"loop", "repetition"} <= families(reasons_of(s))


def test_repeated_phrase_flagged():
    # the same long phrase comes back with different endings: no immediate loop, but repetition
    phrase = "the bees are genetically engineered to produce a certain type of honey"
    text = f"{phrase} that is sweet . {phrase} , and {phrase} which is rare . In fact {phrase} ."
    s = sample(text)
    assert sample_metrics(s).longest_loop < CollapseThresholds().max_loop
    assert "repetition" in families(reasons_of(s))


def test_random_tokens_flagged():
    rng = np.random.default_rng(0)
    ids = tuple(int(i) for i in rng.choice(50_000, 64, replace=False))
    s = GenSample("p", "".join(chr(0x4E00 + i % 2000) for i in ids), ids, False, 64, 64)
    reasons = reasons_of(s)
    assert any("near-random" in r for r in reasons)
    assert families(reasons) == {"gibberish"}


def test_few_token_babble_flagged():
    rng = np.random.default_rng(0)
    s = sample([[",", "the", "of", "and"][i] for i in rng.integers(0, 4, 64)])
    assert any("few distinct tokens" in r for r in reasons_of(s))


def test_fluent_gibberish_needs_reference_nll():
    """Varied word salad passes the repetition metrics; the reference's NLL catches it."""
    rng = np.random.default_rng(0)
    pool = sorted(set(words(" ".join(PARAGRAPHS))))
    salad = sample([pool[i] for i in rng.integers(0, len(pool), 64)])
    assert reasons_of(salad, ref_nll=9.0) == ["gibberish: reference NLL 9.0 nats/token (> 6.0)"]
    assert sample_metrics(salad, ref_nll=float("nan")).ref_nll is None


def test_early_eos_flagged():
    s = sample("Yes .", hit_eos=True)
    assert families(reasons_of(s)) == {"early EOS"}
    assert reasons_of(sample("Yes .", hit_eos=False)) == []  # cut off, not stopped
    assert families(reasons_of(sample("", hit_eos=True))) == {"empty answer"}  # its own family


def test_empty_answer_flagged_even_when_the_reference_stops_at_once():
    """IFEval's QTIP 2-bit model put its end-of-turn token first on most prompts: an empty
    answer is a failure whatever the early-EOS threshold, and a blank one too."""
    permissive = dataclasses.replace(CollapseThresholds(), min_new_tokens=0)
    assert reasons_of(sample("", hit_eos=True), permissive) == [
        "empty answer: 0 tokens, nothing but whitespace"
    ]
    blank = GenSample("p", "\n\n  \n", (5, 5, 6), True, 3, 64)
    assert families(reasons_of(blank, permissive)) == {"empty answer"}
    assert reasons_of(sample("Yes .", hit_eos=True), permissive) == []


def test_echoing_the_prompt_flagged():
    """A model that copies the question or the passage back is collapsed; a summary that keeps a
    few names and phrases of its passage is not."""
    passage = PARAGRAPHS[1]
    prompt = f"Summarize in two sentences: {passage}"
    echo = sample(passage, prompt=prompt)
    assert gen.echo_share(prompt, echo.text) == pytest.approx(1.0)
    assert families(reasons_of(echo)) == {"echo"}
    summary = sample(
        "Honeybees use the waggle dance to tell each other the direction and distance of flowers . "
        "Scientists decoded it in the 1940s .",
        prompt=prompt,
    )
    assert gen.echo_share(prompt, summary.text) < 0.2 and reasons_of(summary) == []
    assert gen.echo_share(prompt, "the waggle dance") == 0.0  # fewer words than one n-gram
    # a reference that quotes its passages raises the threshold, within its bounds
    quoting = [sample(PARAGRAPHS[0][:200], prompt=PARAGRAPHS[0]), *reference_samples()]
    t = CollapseThresholds.from_reference(quoting)
    assert t.max_echo == gen.THRESHOLD_BOUNDS["max_echo"].blind


# ------------------------------------------------------------------ thresholds
def reference_samples() -> list[GenSample]:
    out = [sample(words(p)[:64], prompt=f"p{i}") for i, p in enumerate(PARAGRAPHS)]
    out.append(sample(words(PARAGRAPHS[0])[:20], hit_eos=True, prompt="short"))
    return out


def test_from_reference_formula():
    ref = reference_samples()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean reference does not break its own thresholds
        t = CollapseThresholds.from_reference(ref, margin=1.0)
    ms = [sample_metrics(s) for s in ref]
    b = gen.THRESHOLD_BOUNDS
    assert t.max_rep4 == pytest.approx(max(0.15, max(m.rep4 for m in ms) + 0.15))
    assert t.min_distinct2 == pytest.approx(min(0.75, min(m.distinct2 for m in ms) - 0.15))
    assert t.max_loop == max(b["max_loop"].sensitive, max(m.longest_loop for m in ms) + 8)
    assert t.max_zlib == pytest.approx(min(max(2.0, max(m.zlib_ratio for m in ms) + 0.5), 3.0))
    assert t.min_new_tokens == 8  # the reference stopped at 20 tokens: 20 − 8 clipped to 8
    assert t.max_ref_nll == CollapseThresholds().max_ref_nll  # not calibrated without NLLs
    assert t.max_new_tokens == 64 and t.source.startswith("reference (4 samples")
    assert all(not is_collapsed(m, t)[0] for m in ms)


def test_reference_without_eos_keeps_strict_early_eos():
    t = CollapseThresholds.from_reference(reference_samples()[:3])  # none of them stops
    assert t.min_new_tokens == gen.THRESHOLD_BOUNDS["min_new_tokens"].sensitive
    one_word = [sample("Yes .", hit_eos=True), *reference_samples()[:3]]
    assert CollapseThresholds.from_reference(one_word).min_new_tokens == 1  # only empty replies flagged
    silent = [sample("", hit_eos=True), *reference_samples()[:3]]
    with pytest.warns(UserWarning, match="empty answer"):  # the reference itself said nothing
        CollapseThresholds.from_reference(silent)


def test_margin_scales_thresholds():
    ref = reference_samples()
    tight = CollapseThresholds.from_reference(ref, margin=0.0)
    loose = CollapseThresholds.from_reference(ref, margin=2.0)
    assert tight.max_rep4 <= loose.max_rep4 and tight.min_distinct2 >= loose.min_distinct2
    assert tight.max_zlib <= loose.max_zlib and tight.max_loop <= loose.max_loop
    with pytest.raises(ConfigError):
        CollapseThresholds.from_reference(ref, margin=-1)
    with pytest.raises(ConfigError):
        CollapseThresholds.from_reference([])


def test_slightly_repetitive_reference_raises_thresholds():
    phrase = "I am not sure about the job market"
    repeats = sample(f"{phrase} . I know {phrase} , but I like it here and I will stay for another year .")
    ref = [*reference_samples(), repeats]
    t = CollapseThresholds.from_reference(ref)
    rep = sample_metrics(ref[-1]).rep4
    assert 0.15 < rep < 0.25
    assert t.max_rep4 == pytest.approx(rep + 0.15)


def test_looping_reference_does_not_blind_the_detector():
    loop = sample("he jumped out of the window . " * 9)
    ref = [*reference_samples(), loop]
    with pytest.warns(UserWarning, match="reference itself collapses on 1 of 5"):
        t = CollapseThresholds.from_reference(ref)
    assert t.max_loop == gen.THRESHOLD_BOUNDS["max_loop"].blind
    assert t.max_rep4 == pytest.approx(0.40) and t.min_distinct2 == pytest.approx(0.45)
    assert "loop" in families(reasons_of(sample("the cat sat on the mat . " * 9), t))


def test_reference_nll_calibration():
    ref = reference_samples()
    t = CollapseThresholds.from_reference(ref, ref_nll=[1.0, 1.2, 0.8, 1.1])
    assert t.max_ref_nll == 5.0  # 1.2 + 3 nats, raised to the strictest bound
    t = CollapseThresholds.from_reference(ref, ref_nll=[4.0, 4.5, 3.0, 3.0])
    assert t.max_ref_nll == pytest.approx(7.5)
    with pytest.raises(ShapeError, match="4 reference samples"):
        CollapseThresholds.from_reference(ref, ref_nll=[1.0])


def test_calibration_leaves_out_the_worst_five_percent_of_a_large_reference():
    """With 200 prompts one degenerate reference answer must not set the threshold for all: the
    worst 5 % are left out (none below 20 samples, so small sets keep "worst + margin")."""
    healthy = [sample(words(PARAGRAPHS[i % 3])[:64], prompt=f"p{i}") for i in range(38)]
    loops = [sample("he jumped out of the window . " * 9, prompt=f"loop{i}") for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2 of 40 collapsed = the share left out: no warning
        t = CollapseThresholds.from_reference(healthy + loops)
    assert "worst 2 left out" in t.source
    assert t.max_loop == gen.THRESHOLD_BOUNDS["max_loop"].sensitive  # not the loops' blind bound
    assert is_collapsed(sample_metrics(loops[0]), t)[0]
    worst_kept = CollapseThresholds.from_reference(healthy + loops, ignore=0.0)
    assert worst_kept.max_loop == gen.THRESHOLD_BOUNDS["max_loop"].blind
    assert (
        CollapseThresholds.from_reference(healthy[:10] + loops[:1], ignore=0.05).max_loop
        == worst_kept.max_loop
    )
    with pytest.raises(ConfigError, match="ignored share"):
        CollapseThresholds.from_reference(healthy, ignore=0.5)
    with pytest.warns(UserWarning, match="reference itself collapses on 3 of 41"):
        CollapseThresholds.from_reference([*healthy, *loops, loops[0]])


def test_saturated_reference_warning_is_one_bounded_line():
    """A reference that loops on most prompts is summarized: counts per reason family and the
    first prompts by name, not every prompt's reasons (a 225-prompt base-model run printed
    tens of kilobytes)."""
    loops = [sample("he jumped out of the window . " * 9, prompt=f"loop{i}") for i in range(30)]
    with pytest.warns(UserWarning) as caught:
        CollapseThresholds.from_reference([*reference_samples(), *loops], ignore=0.0)
    (msg,) = [str(w.message) for w in caught if "reference itself collapses" in str(w.message)]
    assert "collapses on 30 of 34 prompts" in msg and "loop 30" in msg
    assert msg.count("prompt ") == gen.WARN_SHOWN and "; 25 more)" in msg
    assert len(msg) < 2000


def test_thresholds_per_generation_length():
    """Each length is judged against the reference's samples of that length."""
    short = [sample(words(p)[:40], max_new=48, prompt=f"s{i}") for i, p in enumerate(PARAGRAPHS)]
    long = [sample(words(p)[:64], prompt=f"l{i}") for i, p in enumerate(PARAGRAPHS)]
    by_len = gen.calibrate_thresholds(short + long)
    assert sorted(by_len) == [48, 64]
    assert by_len[48] == CollapseThresholds.from_reference(short)
    assert by_len[64] == CollapseThresholds.from_reference(long)
    recs = collapse_records("gen:x", [long[0], short[1]], by_len)
    assert set(recs[0].details["thresholds"]) == {"48", "64"} and recs[0].value == 0.0
    with pytest.raises(ConfigError, match=r"calibrated on \[48, 64\]-token .* max_new_tokens 32"):
        collapse_records("gen:x", [sample("a b c", max_new=32)], by_len)


def test_heldout_flags_estimate_the_false_positive_rate():
    """Judged by thresholds calibrated on the other prompts, healthy reference answers pass and
    the reference's own loop is caught (a real positive, so the rate is an upper bound)."""
    healthy = [sample(words(PARAGRAPHS[i % 3])[i % 5 :][:60], prompt=f"p{i}") for i in range(21)]
    loop = sample("he jumped out of the window . " * 9, prompt="loop")
    flags = gen.heldout_flags([*healthy, loop])
    assert [hit for hit, _ in flags] == [False] * 21 + [True]
    assert "loop" in families(flags[-1][1])
    rec = gen.heldout_record("gen:x", [*healthy, loop])
    assert rec.metric == "heldout_flag_rate" and rec.value == pytest.approx(1 / 22)
    assert rec.details["flagged_prompts"] == [21] and rec.details["units"]
    with pytest.raises(ConfigError, match="2 folds"):
        gen.heldout_flags(healthy, folds=1)


def test_thresholds_serialise():
    t = CollapseThresholds.from_reference(reference_samples())
    d = json.loads(json.dumps(t.to_dict()))
    assert CollapseThresholds.from_dict(d) == t
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.max_rep4 = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_rep5"):
        CollapseThresholds.from_dict({"max_rep5": 0.1})


def test_defaults_inside_bounds():
    t = CollapseThresholds()
    for name, b in gen.THRESHOLD_BOUNDS.items():
        lo, hi = sorted((b.sensitive, b.blind))
        assert lo <= getattr(t, name) <= hi, name


# ------------------------------------------------------------------ records
def test_collapse_records():
    ref = reference_samples()
    t = CollapseThresholds.from_reference(ref)
    cand = [ref[0], sample("the cat sat on the mat . " * 9), ref[1], sample("Yes .", hit_eos=True)]
    records = collapse_records("gen:collapse", cand, t)
    by = {r.metric: r for r in records}
    assert list(by) == ["collapse_rate", "rep4", "distinct2", "zlib_ratio", "longest_loop", "drift", "echo"]
    assert all(r.details["units"] for r in records)  # every measure pairs with the reference
    assert by["collapse_rate"].value == pytest.approx(0.5)
    assert not by["collapse_rate"].higher_is_better and by["distinct2"].higher_is_better
    assert by["longest_loop"].value == pytest.approx(np.mean([sample_metrics(s).longest_loop for s in cand]))
    for r in records:
        assert r.task == "gen:collapse" and r.n == 4
        assert r.ci_low <= r.value <= r.ci_high
        json.dumps(r.to_dict())
    d = by["collapse_rate"].details
    assert d["thresholds"] == t.to_dict() and d["max_new_tokens"] == 64
    assert d["collapsed_prompts"] == [1, 3]
    assert d["reason_counts"] == {"early EOS": 1, "gibberish": 1, "loop": 1, "repetition": 1}
    assert d["prompts"]["n"] == 4 and d["prompts"]["name"] == "custom" and len(d["prompts"]["sha256"]) == 64
    assert len(d["examples"]) == 3 and d["examples"][1]["reasons"]
    assert all(len(e["text"]) <= 300 for e in d["examples"])
    again = collapse_records("gen:collapse", cand, t)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]  # seeded bootstrap


def test_collapse_records_with_reference_nll_and_checks():
    ref = reference_samples()
    t = CollapseThresholds.from_reference(ref)
    records = collapse_records("gen:collapse", ref, t, ref_nll=[1.0, 9.0, 1.0, 1.0])
    by = {r.metric: r for r in records}
    assert by["collapse_rate"].value == pytest.approx(0.25)
    assert by["ref_nll"].value == pytest.approx(3.0) and not by["ref_nll"].higher_is_better
    with pytest.raises(ConfigError, match="max_new_tokens"):
        collapse_records("gen:collapse", [sample("a b c", max_new=32)], t)
    with pytest.raises(ConfigError):
        collapse_records("gen:collapse", [], t)
    with pytest.raises(ConfigError, match="prompt set"):
        collapse_records("gen:collapse", ref, t, prompt_set=load_prompts("default"))


# ------------------------------------------------------------------ prompts
def test_default_prompts():
    ps = load_prompts("default")
    assert ps.prompts == DEFAULT_PROMPTS and 6 <= len(ps.prompts) <= 10
    assert ps.name == "default" and ps.sha256 == gen.prompts_sha256(DEFAULT_PROMPTS)
    assert all(p.strip() and not p.endswith(" ") for p in ps.prompts)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\n  \nSpeaker A: hi\\nSpeaker B:\n", encoding="utf-8")
    assert load_prompts(str(txt)).prompts == ("First prompt", "Speaker A: hi\nSpeaker B:")
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        '{"prompt": "First prompt"}\n\n{"prompt": "Speaker A: hi\\nSpeaker B:"}\n', encoding="utf-8"
    )
    assert load_prompts(str(jl)).sha256 == load_prompts(str(txt)).sha256


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', r"bad.jsonl:2"),
        ("bad2.jsonl", "not json\n", r"bad2.jsonl:1"),
        ("bad3.jsonl", '{"prompt": ""}\n', "non-empty"),
        ("empty.txt", "\n \n", "no prompts"),
        ("p.csv", "a,b\n", r"\.txt"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_prompts(str(path))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(DataError, match="neither one of default"):
        load_prompts(str(tmp_path / "nope.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_prompts(str(tmp_path / "latin1.txt"))


# ------------------------------------------------------------------ decoding on the tiny model
TINY_PROMPTS = ["The quick brown fox", "A stitch in time saves nine. All that", "Numbers"]


def test_generate_deterministic_and_consistent(tiny):
    a = generate(tiny, TINY_PROMPTS, max_new_tokens=12)
    b = generate(tiny, TINY_PROMPTS, max_new_tokens=12)
    assert a == b
    for s, p in zip(a, TINY_PROMPTS):
        assert s.prompt == p and s.max_new_tokens == 12
        assert s.n_new == len(s.token_ids) <= 12
        assert s.text == tiny.tokenizer.decode(list(s.token_ids))
        assert 1 not in s.token_ids  # EOS is never part of the continuation
        assert s.hit_eos or s.n_new == 12


def test_generate_matches_uncached_greedy(tiny):
    """The KV-cache loop with left padding picks the argmax of a plain full forward pass."""
    for s in generate(tiny, TINY_PROMPTS, max_new_tokens=10):
        prompt = gen.encode_prompt(tiny, s.prompt)
        full = torch.tensor([prompt + list(s.token_ids)])
        with torch.no_grad():
            logits = tiny.model(full).logits[0]
        preds = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        assert preds == list(s.token_ids)


def test_generate_independent_of_batching(tiny):
    one = generate(tiny, TINY_PROMPTS, max_new_tokens=10, batch_size=1)
    assert generate(tiny, TINY_PROMPTS, max_new_tokens=10, batch_size=3) == one
    s1 = generate(tiny, TINY_PROMPTS, max_new_tokens=10, greedy=False, seed=3, batch_size=1)
    s3 = generate(tiny, TINY_PROMPTS, max_new_tokens=10, greedy=False, seed=3, batch_size=3)
    assert s1 == s3
    assert generate(tiny, TINY_PROMPTS, max_new_tokens=10, greedy=False, seed=4) != s1


@pytest.mark.parametrize("greedy", [True, False])
def test_rows_leaving_the_batch_at_eos_change_no_token(tiny, monkeypatch, greedy):
    """Finished rows drop out of the batch (and their KV cache); the others' tokens must equal
    what each prompt gives alone.  EOS is redefined as a token the model emits mid-answer so that
    rows finish at different steps."""
    prompts = [*TINY_PROMPTS, "zz top", "hello again"]
    free = generate(tiny, prompts, max_new_tokens=12, greedy=greedy, seed=2, batch_size=1)
    stop_token = free[0].token_ids[3]
    monkeypatch.setattr(gen, "eos_ids", lambda loaded: [int(stop_token)])
    alone = generate(tiny, prompts, max_new_tokens=12, greedy=greedy, seed=2, batch_size=1)
    batched = generate(tiny, prompts, max_new_tokens=12, greedy=greedy, seed=2, batch_size=len(prompts))
    assert batched == alone
    lengths = {s.n_new for s in alone}
    assert any(s.hit_eos for s in alone) and len(lengths) > 1  # rows did leave at different steps


def test_generate_stops_at_eos_per_row(tiny):
    eos = tiny.tokenizer.eos_token_id
    stop_after = {0: 2, 1: 5}  # row → number of tokens before EOS; row 2 never stops
    calls = {"n": 0}

    def force_eos(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        step, calls["n"] = calls["n"], calls["n"] + 1
        for row, k in stop_after.items():
            if step == k:
                logits[row] = -math.inf
                logits[row, eos] = 0.0
        return logits

    out = generate(tiny, TINY_PROMPTS, max_new_tokens=8, logits_processor=force_eos)
    assert [(s.n_new, s.hit_eos) for s in out] == [(2, True), (5, True), (8, False)]
    assert out[0].token_ids == generate(tiny, TINY_PROMPTS, max_new_tokens=8)[0].token_ids[:2]


def test_generate_prepends_bos():
    bos_model = make_tiny_model("llama", add_bos=True)
    ids = gen.encode_prompt(bos_model, "The quick")
    assert ids[0] == bos_model.info.bos_token_id and len(ids) > 1
    out = generate(bos_model, ["The quick"], max_new_tokens=4)
    full = torch.tensor([ids + list(out[0].token_ids)])
    with torch.no_grad():
        preds = bos_model.model(full).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
    assert preds == list(out[0].token_ids)


def test_eos_ids_include_generation_config():
    fake = SimpleNamespace(
        tokenizer=SimpleNamespace(eos_token_id=2),
        model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7])),
    )
    assert gen.eos_ids(fake) == [2, 7]


def test_generate_rejects_bad_arguments(tiny):
    with pytest.raises(ConfigError):
        generate(tiny, ["x"], max_new_tokens=0)
    with pytest.raises(ConfigError):
        generate(tiny, ["x"], greedy=False, temperature=0)
    with pytest.raises(DataError, match="empty prompt"):
        generate(tiny, [""], max_new_tokens=2)


def test_reference_nll_matches_direct_computation(tiny):
    samples = generate(tiny, TINY_PROMPTS, max_new_tokens=6)
    samples[1] = dataclasses.replace(samples[1], token_ids=samples[1].token_ids[:2], n_new=2, hit_eos=True)
    samples.append(dataclasses.replace(samples[0], token_ids=(), n_new=0, text="", hit_eos=True))
    batched = gen.reference_nll(tiny, samples, batch_size=4)
    for s, v in zip(samples, batched):
        if not s.n_new:
            assert math.isnan(v)
            continue
        prompt = gen.encode_prompt(tiny, s.prompt)
        with torch.no_grad():
            logits = tiny.model(torch.tensor([prompt + list(s.token_ids)])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        direct = -lp.gather(-1, torch.tensor(s.token_ids)[:, None]).mean()
        assert v == pytest.approx(float(direct), abs=1e-4)


def test_forced_loop_on_tiny_model_is_flagged(tiny):
    def loop(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -math.inf)
        forced[:, 40 + ids.shape[1] % 3] = 0.0  # cycle through three tokens
        return forced

    out = generate(tiny, TINY_PROMPTS, max_new_tokens=24, logits_processor=loop)
    records = collapse_records("gen:collapse", out, CollapseThresholds())
    assert records[0].metric == "collapse_rate" and records[0].value == 1.0
    assert all(sample_metrics(s).loop_period == 3 for s in out)


# ------------------------------------------------------------------ language drift
PL_TEXT = (
    "Wakacje spędziłem nad morzem, a potem pojechaliśmy w góry. Było bardzo ciepło i nie padało ani "
    "razu, więc każdego dnia chodziliśmy na długie spacery. Wieczorem siadaliśmy przy ognisku, "
    "które paliło się do późna, i rozmawialiśmy o tym, co będzie we wrześniu."
)


def test_builtin_prompts_have_the_language_they_claim():
    assert {gen.detect_language(p) for p in gen.DEFAULT_PROMPTS} == {"en"}
    assert {gen.detect_language(p) for p in gen.PL_PROMPTS} == {"pl"}
    assert [gen.detect_language(p) for p in gen.CHAT_PROMPTS] == ["en", "pl"] * 4
    assert load_prompts("en_pl").prompts == gen.DEFAULT_PROMPTS + gen.PL_PROMPTS
    assert gen.detect_language("12345 ...") is None


def test_language_drift_is_flagged():
    """A Polish prompt answered in English, or any prompt answered in another script, drifts."""
    pl_prompt = gen.PL_PROMPTS[3]
    english = sample(PARAGRAPHS[0], prompt=pl_prompt)
    assert gen.language_drift(pl_prompt, english.text) == pytest.approx(1.0, abs=0.05)
    assert families(reasons_of(english)) == {"language drift"}
    polish = sample(PL_TEXT, prompt=pl_prompt)
    assert gen.language_drift(pl_prompt, PL_TEXT) < 0.1 and reasons_of(polish) == []
    cyrillic = sample("Это был очень длинный день , и мы все устали после работы в поле до вечера .")
    cyrillic = dataclasses.replace(cyrillic, prompt=gen.DEFAULT_PROMPTS[5])
    assert "language drift" in families(reasons_of(cyrillic))
    # too little evidence, or a prompt of unknown language: no verdict
    assert gen.language_drift(pl_prompt, "OK .") == 0.0
    assert gen.language_drift("12345", PARAGRAPHS[0]) == 0.0
    # the threshold calibrates like the others: the reference's worst drift plus a margin
    ref = [sample(PL_TEXT, prompt=pl_prompt), sample(PARAGRAPHS[1], prompt=gen.DEFAULT_PROMPTS[0])]
    t = CollapseThresholds.from_reference(ref)
    assert t.max_drift == pytest.approx(0.4)


# ------------------------------------------------------------------ teacher-forced vs free-running
def test_continuation_kld_matches_direct_computation(tiny):
    other = make_tiny_model("llama", seed=5)
    samples = generate(tiny, TINY_PROMPTS, max_new_tokens=5)
    samples[1] = dataclasses.replace(samples[1], token_ids=samples[1].token_ids[:2], n_new=2, hit_eos=True)
    samples.append(dataclasses.replace(samples[0], token_ids=(), n_new=0, text="", hit_eos=True))
    assert all(v == 0 or math.isnan(v) for v in gen.continuation_kld(tiny, tiny, samples))
    batched = gen.continuation_kld(tiny, other, samples, batch_size=2)
    for s, v in zip(samples, batched):
        if not s.n_new:
            assert math.isnan(v)
            continue
        ids = torch.tensor([gen.encode_prompt(tiny, s.prompt) + list(s.token_ids)])
        start = ids.shape[1] - s.n_new - 1
        with torch.no_grad():
            p = torch.log_softmax(tiny.model(ids).logits[0, start:-1], -1)
            q = torch.log_softmax(other.model(ids).logits[0, start:-1], -1)
        direct = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
        assert v == pytest.approx(float(direct), rel=1e-4, abs=1e-6) and v > 0


def test_agreeing_prefix_and_divergence_records():
    a, b = sample("a b c d e"), sample("a b x d e")
    assert gen.agreeing_prefix(a, b) == 2 and gen.agreeing_prefix(a, a) == 5
    assert gen.agreeing_prefix(a, sample("a b")) == 2
    recs = gen.divergence_records("gen:x", [a, a], [b, a], [0.1, 0.3], [0.5, float("nan")])
    got = {r.metric: r for r in recs}
    assert got["tf_kld"].value == pytest.approx(0.2) and got["fr_kld"].n == 1
    assert got["agree_tokens"].value == pytest.approx(3.5) and got["agree_tokens"].higher_is_better
    assert "agree_tokens" not in {
        r.metric for r in gen.divergence_records("g", [a], [b], [0.1], [0.2], False)
    }


def test_gen_task_with_reference_sampling_and_chat(tiny):
    from q2lab.eval.tasks import Evaluator, parse_task

    cand = make_tiny_model("llama", seed=5)
    ev = Evaluator(tiny)
    greedy = parse_task({"task": "gen:pl", "limit": 2, "max_new_tokens": 6})
    recs = {r.metric: r for r in ev.run(cand, [greedy])}
    assert {"collapse_rate", "tf_kld", "fr_kld", "agree_tokens"} <= set(recs)
    assert recs["tf_kld"].value > 0 and recs["tf_kld"].n == 2
    sampled = parse_task({"task": "gen:pl", "limit": 2, "max_new_tokens": 6, "temperature": 0.8, "seed": 3})
    assert sampled.key() != greedy.key()
    first = {r.metric: r.value for r in ev.run(cand, [sampled])}
    assert "agree_tokens" not in first and first == {r.metric: r.value for r in ev.run(cand, [sampled])}
    with pytest.raises(ConfigError, match="temperature"):
        parse_task({"task": "gen:pl", "temperature": 0})
    with pytest.raises(ConfigError, match="no chat template"):
        ev.run(cand, [parse_task({"task": "gen:chat", "limit": 1, "chat": True})])
