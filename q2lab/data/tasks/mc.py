"""Multiple-choice task data, formatted the way lm-eval-harness formats it.

An item is scored as one ``(context, continuation)`` request per choice (see
:mod:`q2lab.eval.multiple_choice`).  Two shapes of item exist, and both reduce to the same list
of requests (:attr:`MCItem.pairs`), so the scorer has a single code path:

* ordinary items (HellaSwag, ARC, PIQA, …): one shared ``context``, each choice is a
  continuation: requests ``(context, choices[i])``;
* partial-scoring items (WinoGrande): each choice has its own context and all of them share one
  continuation: requests ``(contexts[i], choices[i])`` with every ``choices[i]`` equal to that
  continuation (:meth:`MCItem.partial`).  lm-eval scores WinoGrande this way because comparing
  the likelihood of the *same* text after different fillers is a fairer test than comparing
  the fillers themselves.

Named tasks (files under ``$Q2LAB_DATA``, see its SOURCES.md; several are 70% subsets):

==============  ==========================================  =========================================
name            file(s)                                     formatting
==============  ==========================================  =========================================
hellaswag       hellaswag/hellaswag_val_full.txt            "{activity}: {ctx}" + " {ending}"
arc_easy        arc_easy/arc_easy.jsonl                     "Question: {q}\\nAnswer:" + " {choice}"
arc_challenge   arc_challenge/arc_challenge.jsonl           same as arc_easy
piqa            piqa/valid.jsonl + piqa/valid-labels.lst    "Question: {goal}\\nAnswer:" + " {sol}"
commonsense_qa  commonsense_qa/dev_rand_split.jsonl         "Question: {stem}\\nAnswer:" + " {text}"
mmlu            mmlu/test/*_test.csv (57 subjects)          lm-eval's: subject header, question, "A. …"
                                                            … "D. …", "Answer:" + " {letter}"
mmlu_5shot      + mmlu/dev/*_dev.csv                        the same after 5 solved dev questions
winogrande      winogrande/winogrande.jsonl                 partial: "{sentence up to _, filled}"
                                                            + " {rest of the sentence}"
==============  ==========================================  =========================================

HellaSwag comes from llama.cpp's text file, which was preprocessed like lm-eval's copy except
that lm-eval capitalizes ``ctx_b`` (the trailing fragment, e.g. "... on a roof. He") and the
file keeps it as written ("... on a roof. he"); about a third of the contexts differ that way.
CommonsenseQA deviates from lm-eval, which shows the lettered options and scores the letter;
scoring the choice texts keeps every task in the same zero-shot cloze format.

Polish classification sets (``polish_ppc``, ``polish_8tags``, ``polish_cdsc_e``,
``polish_wccrs_hotels``, ``polish_wccrs_medicine``) are scored over verbalized labels with the
prompts documented in :mod:`q2lab.data.tasks.polish`; ``continuation_polish`` is constructed
from the Polish evaluation text by :mod:`q2lab.data.tasks.continuation` (which turns any corpus
into a "which sentence comes next" task).

Any local ``.jsonl`` path with one ``{"context": str, "choices": [str, ...], "label": int}``
per line (optional ``"id"``) is a task too; every line is validated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q2lab.data.registry import data_file, data_root, hash_files, local_file, looks_like_path
from q2lab.errors import ConfigError, DataError

GENERIC_SCHEMA = '{"context": str, "choices": [str, ...], "label": int}'


@dataclass
class MCItem:
    """One question.  ``choices[i]`` is always the text scored for choice ``i``; it follows
    ``contexts[i]`` when ``contexts`` is given (partial scoring), else the shared ``context``.
    For partial items ``context`` is only informational (the text common to all contexts)."""

    context: str
    choices: list[str]
    label: int
    id: str | None = None
    contexts: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, str):
            raise DataError(f"context must be a string, got {type(self.context).__name__}")
        _check_strings(self.choices, "choices")
        if len(self.choices) < 2:
            raise DataError(f"an item needs at least 2 choices, got {len(self.choices)}")
        if self.contexts is not None:
            _check_strings(self.contexts, "contexts")
            if len(self.contexts) != len(self.choices):
                raise DataError(f"{len(self.contexts)} contexts for {len(self.choices)} choices")
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise DataError(f"label must be an integer, got {self.label!r}")
        if not 0 <= self.label < len(self.choices):
            raise DataError(f"label {self.label} is out of range for {len(self.choices)} choices")

    @classmethod
    def partial(cls, contexts: list[str], continuation: str, label: int, id: str | None = None) -> MCItem:
        """A partial-scoring item: the same ``continuation`` scored after each context."""
        _check_strings(contexts, "contexts")
        shared = _common_prefix(contexts)
        shared = shared[: shared.rfind(" ") + 1]  # whole words only: "… but the " not "… but the b"
        return cls(shared, [continuation] * len(contexts), label, id, list(contexts))

    @property
    def is_partial(self) -> bool:
        return self.contexts is not None

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The ``(context, choice)`` request of every choice, in choice order."""
        contexts = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return list(zip(contexts, self.choices))


@dataclass
class MCTask:
    """A loaded task: its items (after ``limit``) and the provenance recorded with results."""

    name: str
    items: list[MCItem]
    sha256: str  # of the bytes of ``files``, in order
    files: tuple[str, ...]
    prompt: str  # how a request is formatted, recorded in the results
    limit: int | None = None
    n_available: int | None = None  # items in the files before ``limit``


# --------------------------------------------------------------------------- validation helpers
def _common_prefix(texts: list[str]) -> str:
    """Longest common prefix (the lexicographic extremes bound every other string)."""
    if not texts:
        return ""
    lo, hi = min(texts), max(texts)
    n = next((i for i, (a, b) in enumerate(zip(lo, hi)) if a != b), min(len(lo), len(hi)))
    return lo[:n]


def _check_strings(values: Any, what: str) -> None:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{what} must be a list of strings")


@contextmanager
def _located(path: Path, line: int) -> Iterator[None]:
    """Turn any problem with one record into a DataError that names the file and line."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{path}:{line}: {e}") from e
    except KeyError as e:
        raise DataError(f"{path}:{line}: missing key {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from e
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise DataError(f"{path}:{line}: malformed record ({e})") from e


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            with _located(path, n):
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise DataError(f"expected a JSON object, got {type(record).__name__}")
            yield n, record


def _lines(path: Path) -> list[str]:
    """Lines split on ``\\n`` only: ``str.splitlines`` would also split on U+2028 and friends,
    which occur inside HellaSwag text and would shift the fixed 6-line records."""
    text = path.read_text(encoding="utf-8")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


# --------------------------------------------------------------------------- parsers
Parser = Callable[[list[Path]], Iterator[MCItem]]


def _hellaswag(paths: list[Path]) -> Iterator[MCItem]:
    """llama.cpp's format: context line, gold label line, then the 4 endings, per item."""
    (path,) = paths
    lines = _lines(path)
    if len(lines) % 6:
        raise DataError(f"{path} has {len(lines)} lines, not a multiple of 6 (llama.cpp HellaSwag format)")
    for k in range(0, len(lines), 6):
        with _located(path, k + 2):
            item = MCItem(lines[k].strip(), [e.strip() for e in lines[k + 2 : k + 6]], int(lines[k + 1]))
        yield item


def _arc(paths: list[Path]) -> Iterator[MCItem]:
    """MosaicML's ARC: the query already starts with "Question: "."""
    (path,) = paths
    for n, rec in _jsonl(path):
        with _located(path, n):
            item = MCItem(rec["query"] + "\nAnswer:", rec["choices"], rec["gold"])
        yield item


def _piqa(paths: list[Path]) -> Iterator[MCItem]:
    data, labels = paths
    gold = [line.strip() for line in _lines(labels) if line.strip()]
    records = list(_jsonl(data))
    if len(records) != len(gold):
        raise DataError(f"{data} has {len(records)} records but {labels} has {len(gold)} labels")
    for (n, rec), label in zip(records, gold):
        with _located(data, n):
            item = MCItem(f"Question: {rec['goal']}\nAnswer:", [rec["sol1"], rec["sol2"]], int(label))
        yield item


def _commonsense_qa(paths: list[Path]) -> Iterator[MCItem]:
    (path,) = paths
    for n, rec in _jsonl(path):
        with _located(path, n):
            question = rec["question"]
            letters = [c["label"] for c in question["choices"]]
            texts = [c["text"] for c in question["choices"]]
            item = MCItem(
                f"Question: {question['stem']}\nAnswer:",
                texts,
                letters.index(rec["answerKey"]),
                id=rec.get("id"),
            )
        yield item


def _winogrande(paths: list[Path]) -> Iterator[MCItem]:
    """MosaicML's partial-evaluation format; the continuation is stripped as lm-eval's
    ``partial_target`` strips it (the scorer adds the " " delimiter)."""
    (path,) = paths
    for n, rec in _jsonl(path):
        with _located(path, n):
            item = MCItem.partial(rec["context_options"], rec["continuation"].strip(), rec["gold"])
        yield item


_MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_SHOTS = 5


def _mmlu_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    for n, r in enumerate(rows, 1):
        if len(r) != 6 or r[5].strip() not in _MMLU_LETTERS:
            raise DataError(
                f"{path}:{n}: expected question, 4 choices and an answer letter A–D, got {len(r)} fields"
            )
    return rows


def _mmlu_question(row: list[str], answer: bool) -> str:
    lines = [row[0].strip(), *(f"{k}. {c.strip()}" for k, c in zip(_MMLU_LETTERS, row[1:5]))]
    return "\n".join(lines) + "\nAnswer:" + (f" {row[5].strip()}" if answer else "")


def _mmlu(paths: list[Path], shots: int) -> Iterator[MCItem]:
    """MMLU in lm-eval's format: a subject header, ``shots`` solved dev questions, the question
    with its lettered options, ``Answer:`` — and the letter scored.  Items are interleaved across
    the 57 subjects (round-robin in file order), so ``limit: N`` keeps a stratified subset."""
    tests = [p for p in paths if p.name.endswith("_test.csv")]
    devs = {p.name[: -len("_dev.csv")]: p for p in paths if p.name.endswith("_dev.csv")}
    per_subject = []
    for path in tests:
        subject = path.name[: -len("_test.csv")]
        topic = subject.replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        if shots:
            if subject not in devs:
                raise DataError(f"MMLU subject {subject}: no dev file for the {shots}-shot examples")
            header += "".join(_mmlu_question(r, True) + "\n\n" for r in _mmlu_rows(devs[subject])[:shots])
        items = [
            MCItem(
                header + _mmlu_question(r, False),
                list(_MMLU_LETTERS),
                _MMLU_LETTERS.index(r[5].strip()),
                id=f"{subject}/{i}",
            )
            for i, r in enumerate(_mmlu_rows(path))
        ]
        per_subject.append(items)
    for k in range(max((len(x) for x in per_subject), default=0)):
        for items in per_subject:
            if k < len(items):
                yield items[k]


def _generic(paths: list[Path]) -> Iterator[MCItem]:
    (path,) = paths
    for n, rec in _jsonl(path):
        with _located(path, n):
            missing = [k for k in ("context", "choices", "label") if k not in rec]
            if missing:
                raise DataError(f"missing key(s) {', '.join(missing)}; every line must be {GENERIC_SCHEMA}")
            item_id = None if rec.get("id") is None else str(rec["id"])
            item = MCItem(rec["context"], rec["choices"], rec["label"], id=item_id)
        yield item


@dataclass(frozen=True)
class _Spec:
    files: tuple[str, ...]  # relative to $Q2LAB_DATA
    parse: Parser
    prompt: str
    lang: str = "en"  # ISO 639-1 language of the items


def _qa_prompt(question: str, choice: str, lm_eval_task: str) -> str:
    return (
        f'context "Question: {{{question}}}\\nAnswer:", continuation " {{{choice}}}" (lm-eval {lm_eval_task})'
    )


TASKS: dict[str, _Spec] = {
    "hellaswag": _Spec(
        ("hellaswag/hellaswag_val_full.txt",),
        _hellaswag,
        'context "{activity_label}: {ctx_a} {ctx_b}", continuation " {ending}" (lm-eval '
        "hellaswag on llama.cpp's preprocessed text, where ctx_b is not capitalized)",
    ),
    "arc_easy": _Spec(("arc_easy/arc_easy.jsonl",), _arc, _qa_prompt("question", "choice", "arc_easy")),
    "arc_challenge": _Spec(
        ("arc_challenge/arc_challenge.jsonl",), _arc, _qa_prompt("question", "choice", "arc_challenge")
    ),
    "piqa": _Spec(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, _qa_prompt("goal", "sol", "piqa")),
    "commonsense_qa": _Spec(
        ("commonsense_qa/dev_rand_split.jsonl",),
        _commonsense_qa,
        'context "Question: {stem}\\nAnswer:", continuation " {choice text}" '
        "(cloze over choice texts; lm-eval's commonsense_qa scores letters instead)",
    ),
    "mmlu": _Spec(
        ("mmlu/test/*_test.csv",),
        lambda paths: _mmlu(paths, 0),
        'zero-shot, lm-eval mmlu format: "The following are multiple choice questions (with answers) '
        'about {subject}.\\n\\n{question}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:", continuation " {letter}"; '
        "items interleaved across subjects",
    ),
    "mmlu_5shot": _Spec(
        ("mmlu/test/*_test.csv", "mmlu/dev/*_dev.csv"),
        lambda paths: _mmlu(paths, MMLU_SHOTS),
        "five-shot (the subject's first 5 dev questions, solved) in the mmlu format; items "
        "interleaved across subjects",
    ),
    "winogrande": _Spec(
        ("winogrande/winogrande.jsonl",),
        _winogrande,
        'partial scoring: context "{sentence before _}{option}", continuation '
        '" {sentence after _}" (lm-eval winogrande)',
    ),
}


def _lazy(module: str, func: str) -> Parser:
    """A parser living in another module (which imports this one)."""

    def parse(paths: list[Path]) -> Iterator[MCItem]:
        import importlib

        return getattr(importlib.import_module(module), func)(paths)

    return parse


_PL = "q2lab.data.tasks.polish"
_PL_NOTE = " (q2lab's Polish prompt, choices are label verbalizations; see q2lab.data.tasks.polish)"
TASKS.update(
    {
        "polish_ppc": _Spec(
            ("polish_ppc/test.txt",),
            _lazy(_PL, "parse_ppc"),
            'context "Zdanie A: "{a}"\nZdanie B: "{b}"\nPytanie: Czy zdania A i B znaczą to samo?'
            '\nOdpowiedź:", continuation " {label}"' + _PL_NOTE,
            "pl",
        ),
        "polish_8tags": _Spec(
            ("polish_8tags/test.txt",),
            _lazy(_PL, "parse_8tags"),
            'context "Zdanie: "{s}"\nPytanie: Jakiego tematu dotyczy to zdanie?\nOdpowiedź:", '
            'continuation " {topic}"' + _PL_NOTE,
            "pl",
        ),
        "polish_cdsc_e": _Spec(
            ("polish_cdsc_e/CDS_test_annotated.txt",),
            _lazy(_PL, "parse_cdsc_e"),
            'context "Zdanie A: "{a}"\nZdanie B: "{b}"\nPytanie: Czy zdanie B wynika ze zdania A?'
            '\nOdpowiedź:", continuation " {tak|nie|nie wiadomo}"' + _PL_NOTE,
            "pl",
        ),
        **{
            f"polish_wccrs_{domain}": _Spec(
                (f"polish_wccrs/{domain}_test.txt",),
                _lazy(_PL, "parse_wccrs"),
                'context "Opinia: "{s}"\nPytanie: Jaki wydźwięk ma ta opinia?\nOdpowiedź:", '
                'continuation " {sentiment}"' + _PL_NOTE,
                "pl",
            )
            for domain in ("hotels", "medicine")
        },
        "continuation_polish": _Spec(
            ("polish_prose/eval/eval.jsonl",),
            _lazy("q2lab.data.tasks.continuation", "parse_continuation_polish"),
            'context "{3 consecutive sentences}", continuation " {next sentence | 3 length-matched '
            'sentences from elsewhere}" (constructed, seed 0; see q2lab.data.tasks.continuation)',
            "pl",
        ),
    }
)
_GENERIC = _Spec((), _generic, 'context "{context}", continuation " {choice}" (generic jsonl)')


def mc_task_names() -> list[str]:
    return sorted(TASKS)


def mc_language(name_or_path: str) -> str | None:
    """A task's language: the registry's for named tasks, detected on the items of a local file
    (contexts and choices); None when unclear."""
    key = name_or_path.lower()
    if key in TASKS:
        return TASKS[key].lang
    from q2lab.data.language import text_language

    items = load_mc_task(name_or_path).items
    return text_language(" ".join(f"{it.context} {' '.join(it.choices)}" for it in items))


def load_mc_task(name_or_path: str, limit: int | None = None) -> MCTask:
    """Load a named task (or a generic ``.jsonl``); ``limit`` keeps the first N items, as
    lm-eval's ``--limit`` does, after the whole file has been validated."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive number of items, got {limit!r}")
    name, spec, files = _resolve(name_or_path)
    items = list(spec.parse(files))
    if not items:
        raise DataError(f"multiple-choice file {files[0]} holds no items")
    n_available = len(items)
    items = items[:limit]
    for i, item in enumerate(items):
        if item.id is None:
            item.id = f"{name}/{i}"
    return MCTask(name, items, hash_files(files), tuple(map(str, files)), spec.prompt, limit, n_available)


def _data_files(pattern: str) -> list[Path]:
    """The staged file, or the sorted files a ``dir/*glob`` pattern matches (an error when none)."""
    if "*" not in pattern:
        return [data_file(pattern)]
    folder, glob = pattern.rsplit("/", 1)
    files = sorted(data_file(folder).glob(glob))
    if not files:
        raise DataError(f"no data files match {data_root() / pattern} (Q2LAB_DATA selects the data folder)")
    return files


def _resolve(name_or_path: str) -> tuple[str, _Spec, list[Path]]:
    key = name_or_path.lower()
    if key in TASKS:
        spec = TASKS[key]
        return key, spec, [p for f in spec.files for p in _data_files(f)]
    if looks_like_path(name_or_path):
        path = local_file(name_or_path, "multiple-choice task")
        if path.suffix != ".jsonl":
            raise DataError(f"multiple-choice task file {path} is not .jsonl (one {GENERIC_SCHEMA} per line)")
        return name_or_path, _GENERIC, [path]
    raise ConfigError(
        f"unknown multiple-choice task {name_or_path!r}; known: {', '.join(mc_task_names())}, "
        f"or a path to a .jsonl file with lines {GENERIC_SCHEMA}"
    )
