"""Which language a text is in, without a model or a download.

One home for the detector that the generation checks (language drift of a continuation) and
the calibration-language check (the language of a corpus, a task's data, a calibration mix)
share.  It counts function words and language-specific letters: enough to tell English,
Polish, German, French and Spanish apart on a sentence, and robust on whole corpora.

Languages are ISO 639-1 codes; a set of them (a mixed calibration, a bilingual prompt suite)
is written ``"en+pl"`` (sorted, ``+``-joined) by :func:`join_languages`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Very frequent function words of the languages the drift check knows.  Function words make
#: up a third to a half of running text in every one of them and rarely coincide across them,
#: so counting them identifies the language of a few dozen words without a model or a download.
STOPWORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        # words shared by English and Polish ("a", "i", "to", "do", "go") are left out of both
        "en": "the and of in is that it was for on are with as his they be at this have from or had by not "
        "but what all were we when your can said there an which she their if will would my so about "
        "out them then he you how who into its our been has more between",
        "pl": "w nie na się z że jest jak o co ale po tak za od jego już tylko przez dla było może są być "
        "jej ich czy gdy który która które mnie mu ten ta też jeszcze bardzo tego tym kiedy był była "
        "oraz lub przy we ze pan pani sobie swoje swoich",
        "de": "der die und den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an "
        "werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über",
        "fr": "le la les de des et un une du est en que qui dans pour pas sur au avec ce il elle sont par "
        "plus ne se son sa mais nous vous ou leur aux",
        "es": "el la los las de del y en que un una es por con para se su al lo como más pero sus le ya "
        "fue este ha sí porque esta entre cuando muy sin sobre",
    }.items()
}
#: Letters that only one of those languages uses: a word holding one is evidence for it too.
MARK_LETTERS: dict[str, str] = {"pl": "ąćęłńśźż", "de": "äöüß", "fr": "àâçèêëîïôùûœ", "es": "ñ¿¡"}
#: Fewer function-word hits than this in a continuation: too little text to tell its language.
MIN_LANGUAGE_HITS = 5
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def language_counts(text: str) -> dict[str, int]:
    """Words that are evidence for each language of :data:`STOPWORDS` (a function word of it, or
    a word with one of its :data:`MARK_LETTERS`), plus ``"non-latin"``: words written
    in another script (Cyrillic, CJK, ...), which no Latin-script target language uses."""
    words = [w.lower() for w in _WORD.findall(text)]
    marks = {lang: set(letters) for lang, letters in MARK_LETTERS.items()}
    counts = {
        lang: sum(w in sw or not marks.get(lang, set()).isdisjoint(w) for w in words)
        for lang, sw in STOPWORDS.items()
    }
    counts["non-latin"] = sum(not _is_latin(w) for w in words)
    return counts


def _is_latin(word: str) -> bool:
    return all(ord(c) < 0x250 or 0x1E00 <= ord(c) <= 0x1EFF for c in word)


def detect_language(text: str) -> str | None:
    """The language with most evidence (:func:`language_counts`); None without evidence or on a
    tie (prompts are short, so one piece of evidence is enough when nothing contradicts it)."""
    counts = language_counts(text)
    counts.pop("non-latin")
    ranked = sorted(counts.values(), reverse=True)
    if ranked[0] == 0 or ranked[0] == ranked[1]:
        return None
    return max(counts, key=lambda k: counts[k])


#: Text sampled from a long corpus to detect its language (spread over the whole text).
SAMPLE_CHARS = 200_000
#: Share of the evidence a corpus's top language needs to be called that language.
CORPUS_MAJORITY = 0.6


def text_language(text: str, sample: int = SAMPLE_CHARS) -> str | None:
    """The language of a whole corpus or prompt file: the top language of
    :func:`language_counts` over up to ``sample`` characters taken in 8 spread slices, when it
    holds at least :data:`CORPUS_MAJORITY` of the Latin-script evidence and
    :data:`MIN_LANGUAGE_HITS` hits; None otherwise (too little text, or a mixed text)."""
    if len(text) > sample:
        step, part = len(text) // 8, sample // 8
        text = " ".join(text[i * step : i * step + part] for i in range(8))
    counts = language_counts(text)
    counts.pop("non-latin")
    total = sum(counts.values())
    best = max(counts, key=lambda k: counts[k])
    if counts[best] < MIN_LANGUAGE_HITS or counts[best] < CORPUS_MAJORITY * total:
        return None
    return best


def split_languages(lang: str | None) -> frozenset[str]:
    """``"en+pl"`` → ``{"en", "pl"}``; None or ``""`` → the empty set (unknown)."""
    return frozenset(x for x in (lang or "").split("+") if x)


def join_languages(langs: Iterable[str | None]) -> str | None:
    """The canonical name of a set of languages (each may itself be ``"a+b"``); None if unknown."""
    out: set[str] = set()
    for lang in langs:
        if lang is None:
            return None
        out |= split_languages(lang)
    return "+".join(sorted(out)) or None


def uncovered_languages(calibration: str | None, task: str | None) -> frozenset[str]:
    """Languages of a task that its model's calibration did not include (empty when either
    side is unknown: no warning without evidence)."""
    cal, want = split_languages(calibration), split_languages(task)
    if not cal or not want:
        return frozenset()
    return want - cal
