"""Calibration language: corpus mixes, languages of corpora and tasks, the mismatch warning and
the report's flag (issue 20)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from q2lab import cli
from q2lab.calib.store import CalibSpec, calibrate, calibration_windows, store_key
from q2lab.data.language import join_languages, text_language, uncovered_languages
from q2lab.data.text import (
    corpus_language,
    corpus_windows,
    load_corpus,
    mix_counts,
    mix_windows,
    parse_mix,
    tokenize,
)
from q2lab.errors import ConfigError, DataError
from q2lab.eval.tasks import parse_task, task_language
from q2lab.study.config import parse_study
from q2lab.study.markdown import render_markdown
from tests.tiny import make_tiny_model

EN = (
    "The river flows through the old town and the bridge was built of stone. "
    "They said that it would rain, but the sky was clear for all of the day. "
    "When the train came in, we had already left the station with our bags. "
)
PL = (
    "Rzeka płynie przez stare miasto, a most był zbudowany z kamienia. "
    "Mówili, że będzie padać, ale niebo było czyste przez cały dzień. "
    "Kiedy pociąg wjechał, już wyszliśmy ze stacji z naszymi torbami. "
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lang")
    (root / "en.txt").write_text(EN * 40, encoding="utf-8")
    (root / "pl.txt").write_text(PL * 40, encoding="utf-8")
    (root / "short.txt").write_text(PL, encoding="utf-8")
    return root


# --------------------------------------------------------------------------- languages
def test_staged_corpora_are_detected_as_their_registered_language(data_root):
    for name, lang in [("wikitext2-test", "en"), ("wikitext2-valid", "en"), ("polish-calib", "pl")]:
        corpus = load_corpus(name)
        assert corpus.language == lang
        assert text_language(corpus.text) == lang  # the detector agrees with the registry
    assert text_language(load_corpus("polish-eval").text) == "pl"
    assert corpus_language("wikitext2+polish") == "en+pl"


def test_local_files_get_a_detected_language(texts):
    assert load_corpus(str(texts / "en.txt")).language == "en"
    assert load_corpus(str(texts / "pl.txt")).language == "pl"
    assert text_language("12345 67890") is None  # no evidence: unknown, never a guess
    assert text_language(EN + PL) is None  # no clear majority: a mixed text is not one language


def test_language_sets_and_coverage():
    assert join_languages(["pl", "en", "en+pl"]) == "en+pl"
    assert join_languages(["en", None]) is None
    assert uncovered_languages("en", "pl") == {"pl"}
    assert uncovered_languages("en+pl", "pl") == frozenset()
    assert uncovered_languages("en", "en+pl") == {"pl"}  # a bilingual suite needs both
    assert uncovered_languages(None, "pl") == frozenset()  # unknown: no claim


def test_task_languages(texts):
    assert task_language(parse_task("ppl:polish")) == "pl"
    assert task_language(parse_task("kld:wikitext2")) == "en"
    assert task_language(parse_task("mc:polish_ppc")) == "pl"
    assert task_language(parse_task("mc:arc_easy")) == "en"
    assert task_language(parse_task("gen:pl")) == "pl"
    assert task_language(parse_task("gen:en_pl")) == "en+pl"
    assert task_language(parse_task(f"ppl:{texts / 'pl.txt'}")) == "pl"


# --------------------------------------------------------------------------- mixes
def test_mix_counts_largest_remainder():
    assert mix_counts(128, (0.5, 0.5)) == [64, 64]
    assert mix_counts(5, (0.5, 0.5)) == [3, 2]
    assert mix_counts(128, (0.25, 0.75)) == [32, 96]
    assert mix_counts(10, (1 / 3, 1 / 3, 1 / 3)) == [4, 3, 3]
    assert all(sum(mix_counts(n, (0.2, 0.3, 0.5))) == n for n in range(1, 40))


@pytest.mark.parametrize(
    ("corpus", "weights", "message"),
    [
        ("wikitext2+nosuch", None, "unknown corpus 'nosuch' in calibration mix wikitext2+nosuch"),
        ("wikitext2+polish", (0.5, 0.6), "sum to 1.1, not 1"),
        ("wikitext2+polish", (1.0,), "has 2 corpora but 1 weights"),
        ("wikitext2+polish", (1.5, -0.5), "must be positive numbers"),
        ("polish+polish", None, "names a corpus twice"),
    ],
)
def test_bad_mixes_fail_with_one_line(corpus, weights, message):
    with pytest.raises(ConfigError) as e:
        CalibSpec(corpus, windows=8, ctx=32, weights=weights)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_normalises_mixes():
    assert CalibSpec("wikitext2", weights=(1.0,)).weights is None  # one corpus is not a mix
    assert CalibSpec(["wikitext2", "polish"]).corpus == "wikitext2+polish"  # type: ignore[arg-type]
    assert parse_mix("wikitext2 + polish").weights == (0.5, 0.5)
    assert CalibSpec("wikitext2+polish").to_dict()["weights"] == [0.5, 0.5]
    assert "weights" not in CalibSpec("wikitext2").to_dict()


def _rows_in(windows: torch.Tensor, tokens: torch.Tensor) -> list[bool]:
    """Whether each window (BOS dropped) is a contiguous run of ``tokens``."""
    seq = tokens.tolist()
    text = ",".join(map(str, seq))
    return [",".join(map(str, w[1:].tolist())) in text for w in windows]


def test_mix_draws_each_share_from_its_corpus(texts):
    lm = make_tiny_model("llama")
    en, pl = load_corpus(str(texts / "en.txt")), load_corpus(str(texts / "pl.txt"))
    mix = parse_mix([str(texts / "en.txt"), str(texts / "pl.txt")], (0.25, 0.75))
    w = mix_windows(lm, mix, 8, 24, seed=3)
    assert w.shape == (8, 24)
    from_en = _rows_in(w, tokenize(lm.tokenizer, en))
    from_pl = _rows_in(w, tokenize(lm.tokenizer, pl))
    assert sum(from_en) == 2 and sum(from_pl) == 6 and all(a != b for a, b in zip(from_en, from_pl))
    assert torch.equal(w, mix_windows(lm, mix, 8, 24, seed=3))  # seeded
    assert not torch.equal(w, mix_windows(lm, mix, 8, 24, seed=4))
    # a one-corpus "mix" is exactly the single corpus's calibration windows
    single = mix_windows(lm, parse_mix(str(texts / "en.txt")), 8, 24, seed=3)
    assert torch.equal(single, corpus_windows(lm, en, 8, 24, mode="random", seed=3))


def test_mix_rejects_a_corpus_too_short_for_its_share(texts):
    lm = make_tiny_model("llama")
    mix = parse_mix([str(texts / "en.txt"), str(texts / "short.txt")])
    with pytest.raises(DataError, match="too short for its share of 8 windows"):
        mix_windows(lm, mix, 16, 64, seed=0)
    with pytest.raises(ConfigError, match="gets 0 of 1 windows"):
        mix_windows(lm, mix, 1, 16, seed=0)


def test_store_of_a_mix(texts, tmp_path):
    lm = make_tiny_model("llama")
    en, pl = str(texts / "en.txt"), str(texts / "pl.txt")
    single = calibrate(lm, CalibSpec(en, windows=4, ctx=24), root=tmp_path)
    # the single-corpus key is what it was before mixes existed: the corpus file's hash
    spec = CalibSpec(en, windows=4, ctx=24)
    assert single.key == store_key(lm.info.fingerprint, load_corpus(en).sha256, spec, lm.info.add_bos)
    assert single.describe()["language"] == "en"
    half = calibrate(lm, CalibSpec(f"{en}+{pl}", windows=4, ctx=24), root=tmp_path)
    skew = calibrate(lm, CalibSpec(f"{en}+{pl}", windows=4, ctx=24, weights=(0.25, 0.75)), root=tmp_path)
    assert len({single.key, half.key, skew.key}) == 3  # the mix and its weights are in the key
    d = half.describe()
    assert d["language"] == "en+pl" and d["weights"] == [0.5, 0.5]
    assert [p["windows"] for p in d["parts"]] == [2, 2]
    assert [p["language"] for p in d["parts"]] == ["en", "pl"]
    # training that needs the calibration data sees the same mixed windows
    again = calibration_windows(lm, half)
    assert torch.equal(again, mix_windows(lm, CalibSpec(f"{en}+{pl}", windows=4, ctx=24).mix, 4, 24))


# --------------------------------------------------------------------------- study config
def test_study_with_named_calibrations(texts):
    en, pl = str(texts / "en.txt"), str(texts / "pl.txt")
    raw = {
        "models": ["m"],
        "calibration": [
            {"name": "en", "corpus": en, "windows": 4},
            {"name": "mix", "corpus": [en, pl], "weights": [0.5, 0.5], "windows": 4},
        ],
        "methods": ["fp", {"method": "rtn", "bits": 3}, {"method": "gptq", "bits": 3}],
        "tasks": [f"ppl:{en}"],
    }
    cfg = parse_study(raw)
    ids = [c.id for c in cfg.cells]
    assert ids[0] == "m/fp" and ids[1].startswith("m/rtn-") and "@" not in ids[1]
    assert [i.rsplit("@", 1)[1] for i in ids[2:]] == ["en", "mix"]
    assert cfg.cells[3].label.endswith("@mix") and cfg.calibrations["mix"].weights == (0.5, 0.5)
    single = parse_study({**raw, "calibration": {"corpus": en, "windows": 4}})
    assert all("@" not in c.id for c in single.cells)  # one calibration: ids as before


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([{"corpus": "wikitext2"}], "needs a 'name'"),
        ([{"name": "a", "corpus": "wikitext2"}, {"name": "a", "corpus": "polish"}], "appears twice"),
        ([{"name": "a", "corpus": "wikitext2", "store": "/x"}], "'store' applies"),
        ({"corpus": ["wikitext2", "nosuch"]}, "unknown corpus 'nosuch'"),
        ({"corpus": ["wikitext2", "polish"], "weights": [0.7, 0.7]}, "not 1"),
    ],
)
def test_bad_calibration_sections(calibration, message):
    raw = {"models": ["m"], "calibration": calibration, "methods": ["gptq"], "tasks": ["ppl:wikitext2"]}
    with pytest.raises(ConfigError, match=message):
        parse_study(raw)


# --------------------------------------------------------------------------- warning and records
def test_cli_warns_when_calibration_and_task_languages_differ(texts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    en, pl, ck = str(texts / "en.txt"), str(texts / "pl.txt"), tmp_path / "ck"
    argv = ["quantize", str(tmp_path / "tiny"), "--method", "gptq", "--bits", "3", "--group-size", "32"]
    assert cli.main([*argv, "--corpus", en, "--windows", "4", "--ctx", "32", "--out", str(ck)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    args = ["--windows", "2", "--ctx", "32", "--json", str(out)]
    assert cli.main(["eval", str(ck), "--task", f"ppl:{pl}", *args]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "calibrated on" in err[0] and "(en)" in err[0] and "is pl text" in err[0]
    (rec,) = json.loads(out.read_text())
    assert rec["details"]["lang"] == "pl" and rec["details"]["calib_lang"] == "en"
    # a matched calibration: no warning
    assert cli.main(["eval", str(ck), "--task", f"ppl:{en}", *args]) == 0
    assert "warning:" not in capsys.readouterr().err
    (rec,) = json.loads(out.read_text())
    assert rec["details"]["lang"] == "en" and rec["details"]["calib_lang"] == "en"
    # a mix covering both languages: no warning on either
    mixed = tmp_path / "ck-mix"
    mix_args = ["--corpus", f"{en}+{pl}", "--corpus-weights", "0.5,0.5", "--windows", "4", "--ctx", "32"]
    assert cli.main([*argv, *mix_args, "--out", str(mixed)]) == 0
    assert cli.main(["eval", str(mixed), "--task", f"ppl:{pl}", "--task", f"ppl:{en}", *args]) == 0
    assert "warning:" not in capsys.readouterr().err
    # bad weights on the command line: one clear line, exit 2
    assert cli.main([*argv, "--corpus", f"{en}+{pl}", "--corpus-weights", "0.9,0.3", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("q2lab: error:") and "not 1" in err and "\n" not in err


def _row(cell: str, task: str, lang: str | None, calib: str | None, **extra) -> dict:
    details = {} if lang is None else {"lang": lang, "calib_lang": calib}
    return {
        "cell": cell,
        "model": "m",
        "method": "fp" if cell.endswith("/fp") else "gptq",
        "bits": None if cell.endswith("/fp") else 3,
        "label": cell,
        "is_reference": cell.endswith("/fp"),
        "bpw": 16.0 if cell.endswith("/fp") else 3.2,
        "task": task,
        "metric": "ppl",
        "value": 10.0,
        "ci_low": 9.0,
        "ci_high": 11.0,
        "n": 4,
        "details": details,
        **extra,
    }


def test_report_flags_cells_calibrated_on_another_language():
    rows = [
        _row("m/fp", "ppl:polish", "pl", None),
        _row("m/gptq@en", "ppl:polish", "pl", "en"),
        _row("m/gptq@en", "ppl:wikitext2", "en", "en"),
        _row("m/gptq@mix", "ppl:polish", "pl", "en+pl"),
    ]
    text = render_markdown(rows)
    assert "Calibration language" in text
    flagged = [line for line in text.splitlines() if line.startswith("> - **")]
    assert flagged == ["> - **m/gptq@en** calibrated on en: ppl:polish (pl)"]
    assert "Calibration language" not in render_markdown([rows[0], rows[2], rows[3]])


def test_report_derives_languages_of_old_rows():
    """Rows written before languages were recorded: the store's corpus and the task's registry."""
    old = {
        "provenance": {"hessians": {"corpus": "wikitext2"}},
        "task_settings": {"kind": "ppl", "data": "polish"},
    }
    rows = [_row("m/fp", "ppl:polish", None, None), _row("m/gptq", "ppl:polish", None, None, **old)]
    assert "> - **m/gptq** calibrated on en (wikitext2): ppl:polish (pl)" in render_markdown(rows)


def test_study_yaml_examples_parse():
    from pathlib import Path

    examples = Path(__file__).parents[2] / "examples"
    cfg = parse_study(yaml.safe_load((examples / "calibration-language.yaml").read_text()))
    assert set(cfg.calibrations) == {"en", "pl", "mix"}
    assert cfg.calibrations["mix"].corpus == "wikitext2+polish"
    sweep = parse_study(yaml.safe_load((examples / "calibration-windows.yaml").read_text()))
    assert sorted({c.windows for c in sweep.calibrations.values()}) == [8, 32, 128, 512]


def test_study_logs_the_warning_and_rows_name_their_calibration(texts, tmp_path, monkeypatch):
    from q2lab.study import runner

    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    en, pl = str(texts / "en.txt"), str(texts / "pl.txt")
    raw = {
        "name": "lang",
        "models": [str(tmp_path / "tiny")],
        "calibration": [
            {"name": "en", "corpus": en, "windows": 4, "ctx": 32},
            {"name": "pl", "corpus": pl, "windows": 4, "ctx": 32},
        ],
        "methods": [{"method": "gptq", "bits": 3, "group_size": 32}],
        "tasks": [f"ppl:{pl}"],
        "eval": {"windows": 2, "ctx": 32},
    }
    messages: list[str] = []
    results = runner.run_study(parse_study(raw), tmp_path / "out", log=messages.append)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "(en)" in warnings[0] and "is pl text" in warnings[0]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    by_calib = {r["calibration"]: r for r in rows}
    assert set(by_calib) == {"en", "pl"}
    assert by_calib["en"]["details"]["calib_lang"] == "en" and by_calib["pl"]["details"]["calib_lang"] == "pl"
    assert by_calib["pl"]["provenance"]["hessians"]["language"] == "pl"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Calibration language" in report and "GPTQ 3b g32 @en** calibrated on en" in report
    assert "@pl** calibrated" not in report
