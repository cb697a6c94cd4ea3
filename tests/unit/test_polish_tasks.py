"""Polish classification sets as multiple choice, and continuation MC built from any corpus."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from q2lab.data.tasks import continuation as cont
from q2lab.data.tasks.mc import load_mc_task
from q2lab.data.tasks.polish import PPC_CHOICES, TAGS_CHOICES
from q2lab.errors import ConfigError, DataError

# 40 paragraphs of 6 numbered sentences of varied length: every sentence is unique and its place
# in the text can be read back from its words.
_WORDS = [
    "alfa",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def _sentence(p: int, k: int) -> str:
    n = 6 + (p * 7 + k * 3) % 12
    return f"Zdanie {p} {k} " + " ".join(_WORDS[(p + k + i) % len(_WORDS)] for i in range(n)) + "."


TEXT = "\n\n".join(" ".join(_sentence(p, k) for k in range(6)) for p in range(40))


def test_split_sentences_keeps_paragraphs():
    paras = cont.split_sentences("Ala ma kota. Kot ma Alę!  Czy tak?\n\nNowy akapit… „Cytat” dalej. 3 koty.")
    assert paras == [
        ["Ala ma kota.", "Kot ma Alę!", "Czy tak?"],
        ["Nowy akapit…", "„Cytat” dalej.", "3 koty."],
    ]


def test_continuation_items_are_well_formed():
    cfg = cont.ContinuationConfig(n_items=30, min_chars=10, min_distance=12, seed=1)
    items = cont.build_continuation_items(TEXT, cfg)
    assert 25 <= len(items) <= 30
    sentences = [s for p in cont.split_sentences(TEXT) for s in p]
    index = {s: i for i, s in enumerate(sentences)}
    for it in items:
        true = it.choices[it.label]
        ctx = it.context.split(". ")
        assert len(it.choices) == 4 and len({c.lower() for c in it.choices}) == 4
        # the true choice is the sentence right after the context, in the same paragraph
        assert TEXT.find(it.context + " " + true) >= 0 and len(ctx) == 3
        for j, c in enumerate(it.choices):
            if j != it.label:
                assert abs(index[c] - index[true]) >= 12  # distractors come from far away
                assert abs(len(c) / len(true) - 1) <= 0.25  # and are length-matched
    # no true sentence is used twice; the answer position is spread over the choices
    assert len({it.choices[it.label] for it in items}) == len(items)
    assert len(collections.Counter(it.label for it in items)) == 4
    again = cont.build_continuation_items(TEXT, cfg)
    assert [(i.context, i.choices, i.label) for i in again] == [
        (i.context, i.choices, i.label) for i in items
    ]
    other = cont.build_continuation_items(
        TEXT, cont.ContinuationConfig(n_items=30, min_chars=10, min_distance=12)
    )
    assert [i.choices for i in other] != [i.choices for i in items]


def test_continuation_round_trips_through_the_generic_schema(tmp_path):
    items = cont.build_continuation_items(
        TEXT, cont.ContinuationConfig(n_items=10, min_chars=10, min_distance=12)
    )
    path = cont.write_jsonl(items, tmp_path / "c.jsonl")
    task = load_mc_task(str(path))
    assert [(i.context, i.choices, i.label, i.id) for i in task.items] == [
        (i.context, i.choices, i.label, i.id) for i in items
    ]
    cont.main([str(_txt(tmp_path)), str(tmp_path / "d.jsonl"), "5", "2"])
    assert len(load_mc_task(str(tmp_path / "d.jsonl")).items) == 5


def _txt(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT * 2, encoding="utf-8")
    return p


def test_continuation_refuses_unusable_text():
    with pytest.raises(DataError, match="enough context"):
        cont.build_continuation_items("Jedno zdanie tylko tutaj, nic więcej nie ma w tym tekście.")
    with pytest.raises(ConfigError):
        cont.ContinuationConfig(n_choices=1)
    with pytest.raises(DataError, match="distinct distractors"):
        cont.build_continuation_items(
            " ".join(_sentence(0, k) for k in range(8)), cont.ContinuationConfig(min_chars=10)
        )


def test_staged_polish_sets(data_root):
    sizes = {"polish_ppc": 700, "polish_8tags": 3060, "polish_cdsc_e": 700}
    sizes |= {"polish_wccrs_hotels": 1069, "polish_wccrs_medicine": 1436}
    for name, n in sizes.items():
        task = load_mc_task(name)
        assert len(task.items) == n, name
        assert "Odpowiedź:" in task.items[0].context and "Polish prompt" in task.prompt
    ppc = load_mc_task("polish_ppc", limit=1).items[
        0
    ]  # "Piasek nad Chinami." / "Burza piaskowa w Chinach." 2
    assert ppc.choices == PPC_CHOICES and ppc.label == 1 and '"Piasek nad Chinami."' in ppc.context
    tags = load_mc_task("polish_8tags", limit=3).items
    assert [t.label for t in tags] == [4, 4, 2] and tags[0].choices == TAGS_CHOICES  # motoring, food
    labels = np.array([i.label for i in load_mc_task("polish_cdsc_e").items])
    assert labels.max() == 2 and (labels == 2).mean() > 0.6  # NEUTRAL dominates, as in the original


def test_malformed_polish_files_raise(tmp_path, monkeypatch):
    from q2lab.data.tasks import polish

    bad = tmp_path / "ppc.txt"
    bad.write_text("a\tb\tc\nx\ty\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="TSV header"):
        list(polish.parse_ppc([bad]))
    bad.write_text("x zdanie bez etykiety\n", encoding="utf-8")
    with pytest.raises(DataError):
        list(polish.parse_8tags([bad]))


def test_continuation_polish_is_a_named_task(data_root):
    task = load_mc_task("continuation_polish", limit=20)
    assert task.n_available >= 400 and len(task.items) == 20
    assert all(len(i.choices) == 4 for i in task.items) and "constructed" in task.prompt
