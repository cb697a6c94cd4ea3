"""The chat suite: ≥ 200 generation prompts for judging collapse in chat use (issue 14).

The seed study's collapse happened when an instruct model was *used*: in dialogue,
summarization and long-form writing.  Eight continuation prompts cannot show that with any
statistical power, so the suite draws ≥ 200 requests of those kinds, in English and Polish
(≥ 40 % Polish), from the staged data (``$Q2LAB_DATA``):

=================  ==========================================================================
use                source
=================  ==========================================================================
``dialogue``       MT-Bench first turns (all eight categories); multi-turn follow-ups: MT-Bench
                   questions whose reference answer is staged, rendered as user → assistant
                   (the reference answer) → user (the second turn); Polish everyday requests
                   written for this suite (:data:`PL_DIALOGUE`)
``summarization``  a passage of WikiText-2 test (its tokenization undone) and of the Polish prose
                   evaluation books (not the calibration books), cut to whole sentences
``longform``       stories, explanations and letters from templates × topics (both languages)
``instruction``    English: IFEval prompts *held apart* from the ones the IFEval study scores
                   (the complement of its seeded half, :data:`IFEVAL_SCORED`); Polish:
                   verifiable-style requests written for this suite (:data:`PL_INSTRUCTIONS`)
=================  ==========================================================================

Everything is drawn with one seed, so the suite is a pure function of (data files, seed); its
sha256 (over the canonical JSON of every prompt) goes into records.  ``max_new_tokens`` is 256
for long-form writing and 128 otherwise.  Build it to a file with
``python -m q2lab.data.tasks.chat_suite --out suite.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from q2lab.data.registry import data_file, seeded_subset
from q2lab.errors import DataError
from q2lab.utils.io import atomic_path

Use = Literal["dialogue", "summarization", "longform", "instruction"]
Lang = Literal["en", "pl"]
USES: tuple[str, ...] = ("dialogue", "summarization", "longform", "instruction")
#: New tokens per use: long-form answers need room to show a late collapse.
MAX_NEW_TOKENS = {"longform": 256, "dialogue": 128, "summarization": 128, "instruction": 128}
#: The IFEval prompts the IFEval study scores (examples/ifeval_smollm2.yaml: sample 271, seed 0);
#: the suite's English instructions come from the other half only.
IFEVAL_SCORED = {"sample": 271, "seed": 0}


@dataclass(frozen=True)
class Message:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class SuitePrompt:
    """One request.  ``messages`` ends with a user turn; earlier turns make it multi-turn."""

    id: str
    lang: Lang
    use: Use
    source: str
    messages: tuple[Message, ...]
    max_new_tokens: int

    @property
    def text(self) -> str:
        """The last user turn (what a single-turn rendering asks)."""
        return self.messages[-1].content

    def to_dict(self) -> dict:
        return {**asdict(self), "messages": [asdict(m) for m in self.messages]}

    @classmethod
    def from_dict(cls, d: dict) -> SuitePrompt:
        msgs = tuple(Message(m["role"], m["content"]) for m in d["messages"])
        return cls(d["id"], d["lang"], d["use"], d["source"], msgs, int(d["max_new_tokens"]))


@dataclass(frozen=True)
class ChatSuite:
    prompts: tuple[SuitePrompt, ...]
    seed: int
    sha256: str

    def subset(self, lang: str | None) -> ChatSuite:
        """The English or Polish half (``None``: all), with its own hash."""
        kept = tuple(p for p in self.prompts if lang is None or p.lang == lang)
        return ChatSuite(kept, self.seed, suite_sha256(kept))


def suite_sha256(prompts: Sequence[SuitePrompt]) -> str:
    blob = "\n".join(json.dumps(p.to_dict(), ensure_ascii=False, sort_keys=True) for p in prompts)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _prompt(pid: str, lang: Lang, use: Use, source: str, *turns: str) -> SuitePrompt:
    roles: tuple[Literal["user", "assistant"], ...] = ("user", "assistant")
    msgs = tuple(Message(roles[i % 2], t.strip()) for i, t in enumerate(turns))
    return SuitePrompt(pid, lang, use, source, msgs, MAX_NEW_TOKENS[use])


# --------------------------------------------------------------------------- hand-written Polish
#: Everyday Polish requests (advice, explanation, opinion, planning), one user turn each.
PL_DIALOGUE: tuple[str, ...] = (
    "Jak mogę się przygotować do rozmowy kwalifikacyjnej na stanowisko księgowej?",
    "Mój kot przestał jeść od wczoraj. Co powinnam zrobić?",
    "Poleć mi trzy książki na długą podróż pociągiem i powiedz, dlaczego warto je przeczytać.",
    "Jaka jest różnica między pogodą a klimatem?",
    "Chcę zacząć biegać, ale nigdy nie uprawiałem sportu. Od czego zacząć?",
    "Jak wytłumaczyć siedmiolatkowi, dlaczego niebo jest niebieskie?",
    "Zaplanuj mi weekend w Krakowie dla dwóch osób z niewielkim budżetem.",
    "Co warto wiedzieć przed adopcją psa ze schroniska?",
    "Jak oszczędzać pieniądze, jeśli zarabiam niewiele?",
    "Dlaczego liście jesienią zmieniają kolor?",
    "Mam jutro ważny egzamin i nie mogę zasnąć. Co mi radzisz?",
    "Jak ugotować dobry żurek? Podaj składniki i kolejne kroki.",
    "Czym różni się wirus od bakterii?",
    "Jak napisać uprzejmą wiadomość do sąsiada, który głośno słucha muzyki w nocy?",
    "Jakie są zalety i wady pracy zdalnej?",
    "Wyjaśnij, jak działa kredyt hipoteczny, prostymi słowami.",
    "Co zobaczyć w Gdańsku w jeden dzień?",
    "Jak zadbać o storczyka, żeby znowu zakwitł?",
    "Jak nauczyć się języka obcego w domu, bez kursu?",
    "Dlaczego warto segregować śmieci?",
    "Pokłóciłam się z przyjaciółką o drobiazg. Jak się pogodzić?",
    "Jak przygotować mieszkanie na mroźną zimę?",
    "Opowiedz krótko o historii Warszawy.",
    "Jakie ćwiczenia można robić przy biurku, żeby nie bolały plecy?",
    "Co to jest inflacja i dlaczego ceny rosną?",
    "Jak zorganizować urodziny dla dziesięciorga dzieci w małym mieszkaniu?",
    "Jak rozpoznać fałszywą wiadomość w internecie?",
    "Czym się różni herbata zielona od czarnej?",
    "Jak poprawić swoją koncentrację podczas nauki?",
    "Jakie rośliny najlepiej posadzić na balkonie od strony północnej?",
    "Dlaczego w Polsce zmienia się czas z letniego na zimowy?",
    "Jak przygotować się do pierwszej wyprawy w Tatry?",
)

#: Polish requests with checkable constraints (format, length, wording), in IFEval's spirit.
PL_INSTRUCTIONS: tuple[str, ...] = (
    "Wymień pięć zalet jazdy na rowerze w formie listy numerowanej. Nie pisz nic poza listą.",
    "Napisz opis jesiennego poranka w dokładnie trzech zdaniach.",
    "Opisz swój wymarzony dom, nie używając ani jednego przecinka.",
    "Napisz krótki wiersz o morzu. Każdy wers zacznij od wielkiej litery, a tytuł umieść w "
    "podwójnych nawiasach ostrokątnych, np. <<tytuł>>.",
    "Podaj przepis na naleśniki. Odpowiedź podziel na dwie części zatytułowane „Składniki” i "
    "„Przygotowanie”.",
    "Wyjaśnij, czym jest fotosynteza, w mniej niż 50 słowach.",
    "Napisz zaproszenie na urodziny. Na końcu dodaj dopisek zaczynający się od „PS”.",
    "Odpowiedz wyłącznie małymi literami: jakie są twoje ulubione pory roku i dlaczego?",
    "Napisz trzy akapity o historii pisma, oddzielając je znakami ***.",
    "Opisz Warszawę tak, aby słowo „miasto” pojawiło się co najmniej trzy razy.",
    "Podaj cztery rady dla studentów pierwszego roku w punktach zaczynających się od myślnika.",
    "Napisz list motywacyjny do pracy w bibliotece. Nie używaj słowa „ja”.",
    "Odpowiedz w formacie JSON z polami „imię”, „miasto” i „hobby”, wymyślając dane osoby.",
    "Streść bajkę o Czerwonym Kapturku w jednym zdaniu, a całą odpowiedź ujmij w cudzysłów.",
    "Napisz tekst reklamy kawiarni, w którym co najmniej dwa słowa będą zapisane WIELKIMI LITERAMI.",
    "Zaproponuj tytuł i trzy śródtytuły artykułu o zdrowym śnie, każdy w osobnej linii.",
    "Wymień trzy polskie rzeki i przy każdej podaj jedno miasto, przez które płynie. Użyj listy.",
    "Napisz krótką notatkę służbową o zmianie godzin pracy biura, kończąc ją zdaniem „Dziękuję za "
    "uwagę.” i niczym więcej.",
)

_LONGFORM = {
    "en": {
        "story": (
            "Write a short story about {}.",
            (
                "a lighthouse keeper who finds a message in a bottle",
                "a girl who can hear what trees are saying",
                "the last bookshop in a small town",
                "two strangers stuck in a lift during a storm",
                "a robot that learns to cook",
                "an old fisherman and a stubborn seagull",
                "a village where it never stops snowing",
                "a detective who is afraid of the dark",
            ),
        ),
        "explanation": (
            "Explain {} to a curious twelve-year-old, in a few paragraphs.",
            (
                "how vaccines train the immune system",
                "why the Moon has phases",
                "how a bill becomes a law",
                "how the internet sends a message from one computer to another",
                "what causes earthquakes",
                "how bees make honey",
                "why we need sleep",
                "how a compass works",
            ),
        ),
        "letter": (
            "Write a letter {}.",
            (
                "to a friend you have not seen for ten years",
                "to your future self, to be opened in twenty years",
                "to a city council asking for a new park",
                "of complaint to a company about a broken washing machine",
                "thanking a teacher who changed your life",
                "to a pen pal in another country describing your hometown",
                "applying for a summer job at a zoo",
                "to your neighbours inviting them to a street party",
            ),
        ),
    },
    "pl": {
        "story": (
            "Napisz opowiadanie o {}.",
            (
                "latarniku, który znajduje list w butelce",
                "dziewczynce, która słyszy, co mówią drzewa",
                "ostatniej księgarni w małym miasteczku",
                "dwojgu nieznajomych uwięzionych w windzie podczas burzy",
                "robocie, który uczy się gotować",
                "starym rybaku i upartej mewie",
                "wsi, w której nigdy nie przestaje padać śnieg",
                "detektywie, który boi się ciemności",
            ),
        ),
        "explanation": (
            "Wyjaśnij ciekawskiemu dwunastolatkowi w kilku akapitach, {}.",
            (
                "jak szczepionki uczą układ odpornościowy",
                "skąd się biorą fazy Księżyca",
                "jak powstaje ustawa",
                "jak internet przesyła wiadomość z jednego komputera do drugiego",
                "dlaczego zdarzają się trzęsienia ziemi",
                "jak pszczoły robią miód",
                "dlaczego potrzebujemy snu",
                "jak działa kompas",
            ),
        ),
        "letter": (
            "Napisz list {}.",
            (
                "do przyjaciela, którego nie widziałeś od dziesięciu lat",
                "do siebie samego, do otwarcia za dwadzieścia lat",
                "do rady miasta z prośbą o nowy park",
                "z reklamacją do firmy w sprawie zepsutej pralki",
                "z podziękowaniem dla nauczyciela, który zmienił twoje życie",
                "do korespondencyjnego przyjaciela z innego kraju, opisując swoje miasto",
                "z prośbą o wakacyjną pracę w ogrodzie zoologicznym",
                "do sąsiadów z zaproszeniem na festyn na podwórku",
            ),
        ),
    },
}

_SUMMARIZE = {
    "en": "Summarize the following text in two or three sentences.\n\n{}",
    "pl": "Streść poniższy tekst w dwóch lub trzech zdaniach.\n\n{}",
}

#: Prompts per (language, use) source; English 125, Polish 100 (44 %).
COUNTS = {
    ("en", "mt_bench_first"): 50,
    ("en", "mt_bench_multi"): 15,
    ("en", "summarization"): 20,
    ("en", "longform"): 20,
    ("en", "instruction"): 20,
    ("pl", "dialogue"): len(PL_DIALOGUE),
    ("pl", "summarization"): 30,
    ("pl", "longform"): 20,
    ("pl", "instruction"): len(PL_INSTRUCTIONS),
}


# --------------------------------------------------------------------------- sources
def _jsonl(relative: str) -> list[dict]:
    path = data_file(relative)
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e})") from e
    return out


def _pick(rng: np.random.Generator, n_items: int, k: int, what: str) -> list[int]:
    if k > n_items:
        raise DataError(f"chat suite needs {k} {what}, the staged data has {n_items}")
    return sorted(int(i) for i in rng.choice(n_items, size=k, replace=False))


def _mt_bench(rng: np.random.Generator) -> list[SuitePrompt]:
    questions = _jsonl("mt_bench/question.jsonl")
    answers = {
        a["question_id"]: a["choices"][0]["turns"] for a in _jsonl("mt_bench/reference_answer_gpt-4.jsonl")
    }
    out = [
        _prompt(
            f"en-dialogue-mtb{q['question_id']}", "en", "dialogue", f"mt_bench:{q['category']}", q["turns"][0]
        )
        for q in (
            questions[i]
            for i in _pick(rng, len(questions), COUNTS["en", "mt_bench_first"], "MT-Bench questions")
        )
    ]
    multi = [q for q in questions if q["question_id"] in answers and len(q["turns"]) >= 2]
    for i in _pick(
        rng, len(multi), COUNTS["en", "mt_bench_multi"], "MT-Bench questions with reference answers"
    ):
        q = multi[i]
        out.append(
            _prompt(
                f"en-dialogue-mtb{q['question_id']}-turn2",
                "en",
                "dialogue",
                f"mt_bench:{q['category']}:multi-turn",
                q["turns"][0],
                answers[q["question_id"]][0],
                q["turns"][1],
            )
        )
    return out


_WIKI_FIXES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("( ", "("), (" )", ")"))


def _untokenize_wikitext(line: str) -> str:
    """WikiText's raw split keeps word-level spacing (``city , which``); undo the common cases."""
    text = line.strip()
    for a, b in _WIKI_FIXES:
        text = text.replace(a, b)
    text = re.sub(r" ([,.;:!?%])", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return re.sub(r" 's\b", "'s", text)


def _cut_sentences(text: str, min_words: int, max_words: int) -> str | None:
    """The longest run of whole sentences from the start with ≤ ``max_words`` words, if it has at
    least ``min_words``."""
    sentences = re.split(r"(?<=[.!?…])\s+", text.strip())
    kept: list[str] = []
    words = 0
    for s in sentences:
        n = len(s.split())
        if words + n > max_words:
            break
        kept.append(s)
        words += n
    return " ".join(kept) if words >= min_words else None


def _summaries(rng: np.random.Generator, lang: Lang) -> list[SuitePrompt]:
    if lang == "en":
        lines = data_file("wikitext2/wiki.test.raw").read_text(encoding="utf-8").splitlines()
        candidates = [
            (f"wikitext2:line{i + 1}", _cut_sentences(_untokenize_wikitext(line), 80, 180))
            for i, line in enumerate(lines)
            if line.strip() and not line.strip().startswith("=")
        ]
    else:
        candidates = [
            (f"polish_prose:{r['id']}", _cut_sentences(" ".join(r["text"].split()), 80, 180))
            for r in _jsonl("polish_prose/eval/eval.jsonl")
        ]
    usable = [(src, text) for src, text in candidates if text]
    picked = _pick(rng, len(usable), COUNTS[lang, "summarization"], f"{lang} passages of 80–180 words")
    return [
        _prompt(
            f"{lang}-summarization-{n:02d}",
            lang,
            "summarization",
            usable[i][0],
            _SUMMARIZE[lang].format(usable[i][1]),
        )
        for n, i in enumerate(picked)
    ]


def _longform(rng: np.random.Generator, lang: Lang) -> list[SuitePrompt]:
    pool = [
        (kind, j, template.format(topic))
        for kind, (template, topics) in _LONGFORM[lang].items()
        for j, topic in enumerate(topics)
    ]
    return [
        _prompt(
            f"{lang}-longform-{pool[i][0]}{pool[i][1]}", lang, "longform", f"q2lab:{pool[i][0]}", pool[i][2]
        )
        for i in _pick(rng, len(pool), COUNTS[lang, "longform"], f"{lang} long-form topics")
    ]


def _ifeval_held_apart(rng: np.random.Generator) -> list[SuitePrompt]:
    items = _jsonl("ifeval/input_data.jsonl")
    scored = set(seeded_subset(len(items), IFEVAL_SCORED["sample"], IFEVAL_SCORED["seed"]))
    apart = [items[i] for i in range(len(items)) if i not in scored]
    return [
        _prompt(
            f"en-instruction-ifeval{apart[i]['key']}",
            "en",
            "instruction",
            "ifeval:held-apart",
            apart[i]["prompt"],
        )
        for i in _pick(rng, len(apart), COUNTS["en", "instruction"], "held-apart IFEval prompts")
    ]


def _written(lang: Lang, use: Use, texts: Sequence[str]) -> list[SuitePrompt]:
    return [_prompt(f"{lang}-{use}-{i:02d}", lang, use, f"q2lab:{use}", t) for i, t in enumerate(texts)]


def build_chat_suite(seed: int = 0) -> ChatSuite:
    """The suite from ``$Q2LAB_DATA`` and ``seed`` (every draw from one generator, in a fixed
    order, so adding a source later changes only the draws after it)."""
    rng = np.random.default_rng(seed)
    prompts = [
        *_mt_bench(rng),
        *_summaries(rng, "en"),
        *_longform(rng, "en"),
        *_ifeval_held_apart(rng),
        *_written("pl", "dialogue", PL_DIALOGUE),
        *_summaries(rng, "pl"),
        *_longform(rng, "pl"),
        *_written("pl", "instruction", PL_INSTRUCTIONS),
    ]
    return ChatSuite(tuple(prompts), seed, suite_sha256(prompts))


def write_suite(suite: ChatSuite, path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for p in suite.prompts:
            fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build q2lab's chat suite from $Q2LAB_DATA.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="a .jsonl file, one prompt per line")
    args = ap.parse_args(argv)
    suite = build_chat_suite(args.seed)
    write_suite(suite, args.out)
    by = {(lang, use): 0 for lang in ("en", "pl") for use in USES}
    for p in suite.prompts:
        by[p.lang, p.use] += 1
    print(f"{len(suite.prompts)} prompts, sha256 {suite.sha256}")
    for (lang, use), n in by.items():
        print(f"  {lang} {use:<14} {n}")


if __name__ == "__main__":
    main()
