"""IFEval: verifiable instruction following (Zhou et al. 2023), on the staged prompts.

Each of the 541 prompts carries one to three machine-checkable instructions ("answer in
fewer than 40 words", "no commas", "wrap the whole answer in JSON", ...).  The model answers
every prompt greedily (through its chat template when it has one: IFEval is meant for
instruct models), and each instruction is checked on the answer:

* **strict**: the answer as written;
* **loose**: the instruction passes on any of eight variants of the answer (first and/or last
  line removed, markdown ``*`` removed), IFEval's allowance for preambles and formatting.

``prompt_strict`` / ``prompt_loose`` are the fraction of prompts whose instructions *all*
pass; ``inst_strict`` / ``inst_loose`` the fraction of instructions that pass (pooled over
prompts).  These are the four numbers lm-eval's ``ifeval`` task reports.

The checks come from the maintained ``if-verifiable`` package (the Google reference checks,
packaged; installed by ``pip install 'q2lab[eval]'``).  Two adaptations are recorded in every
record's details:

* Its sentence counter wants NLTK's trained Punkt model, which NLTK downloads at run time; q2lab
  runs offline, so sentences are split by Punkt with no trained parameters plus a short list of
  common English abbreviations (a data folder written to q2lab's cache).  It only affects the
  ``length_constraints:number_sentences`` instruction (about 5 % of instructions).
* An empty answer fails every one of its instructions (the package would drop them from the
  instruction-level denominator).
* A few staged prompts give a check an argument it cannot use (``keywords:letter_frequency``
  with ``letter: "#"``); the Google code then draws a random letter from Python's global
  ``random``, so the verdict changes from run to run (lm-eval has the same quirk).  q2lab seeds
  that draw with the prompt key, so every model is judged by the same check and paired
  comparisons stay fair.  For the same reason ``langdetect`` (used by the language and
  letter-case checks) is seeded.

Generation is the long part (hundreds of tokens per prompt), so with a ``resume`` file every
finished batch of answers is appended to it and a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from q2lab.data.registry import data_file, hash_files, local_file, looks_like_path, seeded_subset
from q2lab.errors import ConfigError, DataError
from q2lab.eval.records import Record
from q2lab.eval.stats import UNITS_KEY, UnitScores, bootstrap_ci, ids_sha256, mean_ci
from q2lab.utils.io import cache_dir

STAGED = "ifeval/input_data.jsonl"
DEFAULT_MAX_NEW_TOKENS = 512  # lm-eval uses 1280; 512 keeps a CPU run of 541 prompts in hours, not days
VERIFIER = "if-verifiable"
#: Abbreviations given to the untrained Punkt splitter so "e.g. this" is not two sentences.
_ABBREVIATIONS = (
    *("e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "no", "fig"),
    *("approx", "inc", "ltd", "co", "u.s", "a.m", "p.m"),
)


@dataclass(frozen=True)
class IFEvalItem:
    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class IFEvalSet:
    name: str
    items: tuple[IFEvalItem, ...]
    sha256: str
    n_available: int
    sample: int | None = None  # a seeded random subset of this many prompts (None: all / first N)
    seed: int = 0


def load_ifeval(
    name_or_path: str = "ifeval", limit: int | None = None, sample: int | None = None, seed: int = 0
) -> IFEvalSet:
    """The staged prompts (``"ifeval"``) or a local file in the same JSON-lines format.

    ``limit`` keeps the first N prompts; ``sample`` then keeps a random subset of that many,
    drawn with ``seed`` (NumPy's default generator, without replacement) and kept in file order,
    so every model of a study is scored on the same prompts and paired comparisons hold."""
    if name_or_path in ("ifeval", "default"):
        path = data_file(STAGED)
    elif looks_like_path(name_or_path):
        path = local_file(name_or_path, "IFEval")
    else:
        raise ConfigError(f"unknown IFEval set {name_or_path!r}; use 'ifeval' or a path to input_data.jsonl")
    items = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids, kwargs = list(rec["instruction_id_list"]), list(rec["kwargs"])
                item = IFEvalItem(int(rec["key"]), str(rec["prompt"]), tuple(ids), tuple(kwargs))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{n}: not an IFEval record ({e})") from e
            if len(ids) != len(kwargs) or not ids:
                raise DataError(
                    f"{path}:{n}: instruction_id_list and kwargs must be non-empty and equally long"
                )
            items.append(item)
    if not items:
        raise DataError(f"IFEval file {path} holds no prompts")
    kept = items[:limit]
    if sample is not None:
        if not 0 < sample <= len(kept):
            raise ConfigError(f"IFEval sample of {sample} prompts: the set has {len(kept)}")
        kept = [kept[i] for i in seeded_subset(len(kept), sample, seed)]
    return IFEvalSet(str(name_or_path), tuple(kept), hash_files([path]), len(items), sample, seed)


# --------------------------------------------------------------------------- verification
def _registry() -> dict[str, Any]:
    try:
        from if_verifiable.ifeval import instructions_util
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise ConfigError(f"IFEval needs the {VERIFIER} package: pip install 'q2lab[eval]' ({e})") from e
    _offline_punkt(instructions_util)
    _deterministic_langdetect()
    return dict(INSTRUCTION_DICT)


def _deterministic_langdetect() -> None:
    """``langdetect`` (the language and lowercase/uppercase checks) samples at random unless
    its factory is seeded, so a borderline answer could pass on one run and fail on the next."""
    try:
        from langdetect import DetectorFactory
    except ImportError:  # pragma: no cover - a dependency of the verifier package
        return
    DetectorFactory.seed = 0


def _offline_punkt(util: Any) -> None:
    """Give NLTK an English ``punkt_tab`` with no trained parameters but common abbreviations,
    and point the package's sentence splitter at it (see the module docstring)."""
    import nltk

    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if not (english / "abbrev_types.txt").exists():
        english.mkdir(parents=True, exist_ok=True)
        for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
            (english / name).touch()
        (english / "abbrev_types.txt").write_text("\n".join(_ABBREVIATIONS) + "\n", encoding="utf-8")
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    util._get_sentence_tokenizer = lambda: nltk.tokenize.PunktTokenizer("english")


@dataclass(frozen=True)
class Verdict:
    """Strict and loose pass of each instruction of one answer."""

    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def verify(item: IFEvalItem, response: str, registry: dict[str, Any] | None = None) -> Verdict:
    """Check every instruction of ``item`` on ``response`` (strict and loose)."""
    from if_verifiable.common import evaluate_instructions

    registry = registry if registry is not None else _registry()
    unknown = [i for i in item.instruction_ids if i not in registry]
    if unknown:
        raise DataError(f"IFEval prompt {item.key}: unknown instruction(s) {unknown} for {VERIFIER}")
    state = random.getstate()
    random.seed(item.key)  # same random check for every model (docstring)
    try:
        results, _ = evaluate_instructions(
            response, list(item.instruction_ids), [dict(k) for k in item.kwargs], item.prompt, registry
        )
    finally:
        random.setstate(state)
    if not results:  # empty answer: every instruction fails
        fail = (False,) * len(item.instruction_ids)
        return Verdict(item.instruction_ids, fail, fail)
    return Verdict(
        item.instruction_ids, tuple(r.strict_pass for r in results), tuple(r.loose_pass for r in results)
    )


# --------------------------------------------------------------------------- generation
@dataclass
class IFEvalRun:
    """Answers and verdicts of one model (``answers`` in item order)."""

    items: tuple[IFEvalItem, ...]
    answers: list[str]
    verdicts: list[Verdict]
    max_new_tokens: int
    chat: bool
    hit_limit: list[bool] = field(default_factory=list)  # answer cut at max_new_tokens


def run_ifeval(
    loaded: Any,
    data: IFEvalSet,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool | None = None,
    batch_size: int = 8,
    resume: str | Path | None = None,
) -> IFEvalRun:
    """Greedy answers to every prompt, then the checks.  Prompts are generated shortest first
    (less padding per batch); with ``resume`` finished answers are read from, and new ones
    appended to, that JSON-lines file (keyed by prompt key, checked against the settings)."""
    from q2lab.eval.generation import chat_prompt, encode_prompt, generate
    from q2lab.utils.progress import progress
    from q2lab.utils.resume import append_resume, read_resume

    use_chat = bool(getattr(loaded.tokenizer, "chat_template", None)) if chat is None else chat
    texts = {it.key: chat_prompt(loaded, it.prompt, use_chat) for it in data.items}
    settings = {"max_new_tokens": max_new_tokens, "chat": use_chat, "data": data.sha256}
    done = {int(k): (str(r["text"]), bool(r["hit_limit"])) for k, r in read_resume(resume, settings).items()}
    todo = sorted(
        (it for it in data.items if it.key not in done),
        key=lambda it: len(encode_prompt(loaded, texts[it.key])),
    )
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in progress(batches, "ifeval generate", total=len(batches), unit="batch"):
        samples = generate(
            loaded, [texts[it.key] for it in batch], max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        fresh = {it.key: (s.text, not s.hit_eos) for it, s in zip(batch, samples)}
        done.update(fresh)
        if resume:
            append_resume(resume, settings, {k: {"text": t, "hit_limit": h} for k, (t, h) in fresh.items()})
    registry = _registry()
    answers = [done[it.key][0] for it in data.items]
    verdicts = [verify(it, a, registry) for it, a in zip(data.items, answers)]
    return IFEvalRun(
        data.items, answers, verdicts, max_new_tokens, use_chat, [done[it.key][1] for it in data.items]
    )


# --------------------------------------------------------------------------- records
def ifeval_records(task_label: str, data: IFEvalSet, run: IFEvalRun) -> list[Record]:
    """prompt_strict, prompt_loose, inst_strict, inst_loose with bootstrap CIs over prompts
    (instruction level: ratio estimator, instructions of one prompt resampled together)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        verifier = f"{VERIFIER} {version(VERIFIER)}"
    except PackageNotFoundError:  # pragma: no cover - _registry() already required it
        verifier = VERIFIER
    ids = ids_sha256([f"{data.sha256}:{it.key}" for it in data.items])
    details: dict[str, Any] = {
        "data_sha256": data.sha256,
        "prompts": len(data.items),
        "prompts_available": data.n_available,
        "sample": data.sample,
        "sample_seed": data.seed if data.sample is not None else None,
        "max_new_tokens": run.max_new_tokens,
        "chat_template": run.chat,
        "decoding": "greedy",
        "verifier": verifier,
        "sentence_splitter": "NLTK Punkt without trained parameters + common abbreviations (offline)",
        "answers_at_limit": int(sum(run.hit_limit)),
        "per_instruction": _per_instruction(run.verdicts),
        "examples": [
            {"key": it.key, "prompt": it.prompt[:200], "text": a[:400], "strict": list(v.strict)}
            for it, a, v in list(zip(run.items, run.answers, run.verdicts))[:3]
        ],
    }
    records = []
    for name, attr in (("prompt_strict", "prompt_strict"), ("prompt_loose", "prompt_loose")):
        ok = np.array([getattr(v, attr) for v in run.verdicts], dtype=np.float64)
        value, lo, hi = mean_ci(ok)
        units = UnitScores(ok, ids_sha256=ids).to_json()
        records.append(Record(task_label, name, value, lo, hi, len(ok), True, {**details, UNITS_KEY: units}))
    for name, attr in (("inst_strict", "strict"), ("inst_loose", "loose")):
        passed = np.array([sum(getattr(v, attr)) for v in run.verdicts], dtype=np.float64)
        total = np.array([len(v.instruction_ids) for v in run.verdicts], dtype=np.float64)
        lo, hi = bootstrap_ci(passed, weights=total)
        units = UnitScores(passed, total, ids_sha256=ids).to_json()
        value = float(passed.sum() / total.sum())
        records.append(
            Record(task_label, name, value, lo, hi, len(passed), True, {**details, UNITS_KEY: units})
        )
    return records


def _per_instruction(verdicts: Sequence[Verdict]) -> dict[str, list[int]]:
    """instruction id → [strict passes, loose passes, count] (which instructions broke)."""
    out: dict[str, list[int]] = {}
    for v in verdicts:
        for i, s, lo in zip(v.instruction_ids, v.strict, v.loose):
            row = out.setdefault(i, [0, 0, 0])
            row[0] += int(s)
            row[1] += int(lo)
            row[2] += 1
    return dict(sorted(out.items()))
