"""Polish classification sets scored as multiple choice over verbalized labels.

No Polish multiple-choice benchmark could be staged, but the Polish LLM leaderboard scores
these classification sets as multiple choice, and so does q2lab: the item shows the text and a
question, and each choice is the label's verbalization (a Polish word or phrase, scored as the
continuation " {label}").  The prompts below are q2lab's own (zero-shot, in Polish, in the
style of lm-eval's Polish tasks); they are recorded with every result.

* ``polish_ppc``: ``Zdanie A: "{a}"\nZdanie B: "{b}"\nPytanie: Czy zdania A i B znaczą to
  samo?\nOdpowiedź:`` → dokładnie to samo / prawie to samo / coś innego (labels 1 / 2 / 3);
* ``polish_8tags``: ``Zdanie: "{s}"\nPytanie: Jakiego tematu dotyczy to zdanie?\nOdpowiedź:``
  → film / historia / jedzenie / medycyna / motoryzacja / praca / sport / technologia;
* ``polish_cdsc_e``: ``Zdanie A: "{a}"\nZdanie B: "{b}"\nPytanie: Czy zdanie B wynika ze
  zdania A?\nOdpowiedź:`` → tak / nie / nie wiadomo (ENTAILMENT / CONTRADICTION / NEUTRAL);
* ``polish_wccrs_hotels``, ``polish_wccrs_medicine`` (PolEmo 2.0 sentences): ``Opinia:
  "{s}"\nPytanie: Jaki wydźwięk ma ta opinia?\nOdpowiedź:`` → neutralny / ambiwalentny /
  pozytywny / negatywny (labels 0 / 1 / 2 / 3).

Label meanings that SOURCES.md marks as unverified were checked by reading examples: 8TAGS
0 = film ("Film Zimna Wojna ... nominowany do Oskara"), 2 = food ("Szakszuka ... z pieczywem"),
4 = motoring, 6 = sport, 7 = technology; WCCRS 0 = neutral, 1 = ambivalent, 2 = positive,
3 = negative.  The texts stay as staged (space-separated punctuation in 8TAGS, CDSC and WCCRS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from q2lab.data.tasks.mc import MCItem, _lines, _located
from q2lab.errors import DataError

PPC_CHOICES = ["dokładnie to samo", "prawie to samo", "coś innego"]
TAGS_CHOICES = ["film", "historia", "jedzenie", "medycyna", "motoryzacja", "praca", "sport", "technologia"]
CDSC_CHOICES = ["tak", "nie", "nie wiadomo"]
CDSC_LABELS = {"ENTAILMENT": 0, "CONTRADICTION": 1, "NEUTRAL": 2}
WCCRS_CHOICES = ["neutralny", "ambiwalentny", "pozytywny", "negatywny"]


def _pair(a: str, b: str, question: str) -> str:
    return f'Zdanie A: "{a.strip()}"\nZdanie B: "{b.strip()}"\nPytanie: {question}\nOdpowiedź:'


def _tsv(path: Path, header: str) -> Iterator[tuple[int, list[str]]]:
    lines = _lines(path)
    if not lines or lines[0].split("\t")[: len(header.split("\t"))] != header.split("\t"):
        raise DataError(f"{path}: expected a TSV header starting with {header!r}")
    for n, line in enumerate(lines[1:], 2):
        if line.strip():
            yield n, line.split("\t")


def _labelled_lines(path: Path) -> Iterator[tuple[int, int, str]]:
    """``<label> <sentence>`` lines (8TAGS, WCCRS)."""
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        with _located(path, n):
            label, _, text = line.partition(" ")
            yield n, int(label), text.strip()


def parse_ppc(paths: list[Path]) -> Iterator[MCItem]:
    (path,) = paths
    for n, row in _tsv(path, "sentence_A\tsentence_B\tlabel"):
        with _located(path, n):
            q = _pair(row[0], row[1], "Czy zdania A i B znaczą to samo?")
            item = MCItem(q, list(PPC_CHOICES), int(row[2]) - 1)
        yield item


def _labelled_task(kind: str, question: str, choices: list[str]) -> Callable[[list[Path]], Iterator[MCItem]]:
    """A parser of "label text" lines into MC items asking ``question`` about the quoted text."""

    def parse(paths: list[Path]) -> Iterator[MCItem]:
        (path,) = paths
        for n, label, text in _labelled_lines(path):
            with _located(path, n):
                q = f'{kind}: "{text}"\nPytanie: {question}\nOdpowiedź:'
                item = MCItem(q, list(choices), label)
            yield item

    return parse


parse_8tags = _labelled_task("Zdanie", "Jakiego tematu dotyczy to zdanie?", TAGS_CHOICES)


def parse_cdsc_e(paths: list[Path]) -> Iterator[MCItem]:
    (path,) = paths
    for n, row in _tsv(path, "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"):
        with _located(path, n):
            q = _pair(row[1], row[2], "Czy zdanie B wynika ze zdania A?")
            item = MCItem(q, list(CDSC_CHOICES), CDSC_LABELS[row[4].strip()], id=f"cdsc/{row[0]}")
        yield item


parse_wccrs = _labelled_task("Opinia", "Jaki wydźwięk ma ta opinia?", WCCRS_CHOICES)
