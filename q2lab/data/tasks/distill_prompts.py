"""Seed prompts for self-generated distillation data (UPQ's stage 2, issue 17).

The float teacher answers these through its chat template and the quantized student learns to
match the teacher's next-token distributions on the answers, so no post-training data is
needed.  The pool is kept apart from everything q2lab *evaluates* generation and instruction
following on, so a distilled model is never trained on its test prompts:

=================  ==========================================================================
use                source
=================  ==========================================================================
``dialogue``       MT-Bench first turns of questions the chat suite does not contain
``instruction``    IFEval prompts neither scored by the IFEval task (its seeded half) nor drawn
                   into the chat suite
``summarization``  WikiText-2 *valid* passages and Polish *calibration* books (the evaluation
                   splits — WikiText-2 test, the Polish eval books — are not used)
``longform``       "continue this passage" on Polish calibration-book passages
=================  ==========================================================================

:func:`distill_prompts` draws ``n`` of them with a seed; the draw's sha256 goes into records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from q2lab.data.registry import seeded_subset
from q2lab.data.tasks.chat_suite import (
    _SUMMARIZE,
    IFEVAL_SCORED,
    SuitePrompt,
    _cut_sentences,
    _jsonl,
    _prompt,
    _untokenize_wikitext,
    build_chat_suite,
    suite_sha256,
)
from q2lab.data.text import load_corpus
from q2lab.errors import DataError

_CONTINUE_PL = "Napisz dalszy ciąg tego fragmentu powieści (kilka zdań, tym samym stylem).\n\n{}"


@dataclass(frozen=True)
class DistillPrompts:
    prompts: tuple[SuitePrompt, ...]
    seed: int
    sha256: str


def _suite_ids() -> tuple[set[int], set[str]]:
    """MT-Bench question ids and IFEval keys that the chat suite (seed 0) asks."""
    mtb: set[int] = set()
    ifeval: set[str] = set()
    for p in build_chat_suite(0).prompts:
        if m := re.match(r"en-dialogue-mtb(\d+)", p.id):
            mtb.add(int(m.group(1)))
        if m := re.match(r"en-instruction-ifeval(.+)", p.id):
            ifeval.add(m.group(1))
    return mtb, ifeval


def _mt_bench(excluded: set[int]) -> list[SuitePrompt]:
    return [
        _prompt(
            f"distill-mtb{q['question_id']}", "en", "dialogue", f"mt_bench:{q['category']}", q["turns"][0]
        )
        for q in _jsonl("mt_bench/question.jsonl")
        if q["question_id"] not in excluded
    ]


def _ifeval(excluded: set[str]) -> list[SuitePrompt]:
    items = _jsonl("ifeval/input_data.jsonl")
    scored = set(seeded_subset(len(items), IFEVAL_SCORED["sample"], IFEVAL_SCORED["seed"]))
    return [
        _prompt(f"distill-ifeval{it['key']}", "en", "instruction", "ifeval:distill", it["prompt"])
        for i, it in enumerate(items)
        if i not in scored and str(it["key"]) not in excluded
    ]


def _passages(split: str, lang: str) -> list[str]:
    """Passages of 60–160 words: WikiText-2 valid lines (untokenized, none with ``<unk>``) or
    paragraphs of the Polish calibration books."""
    text = load_corpus(split, role="calib").text
    if lang == "en":
        blocks = [
            _untokenize_wikitext(line)
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("=") and "<unk>" not in line
        ]
    else:
        blocks = [" ".join(b.split()) for b in re.split(r"\n\s*\n", text)]
    return [p for p in (_cut_sentences(b, 60, 160) for b in blocks) if p]


def _from_passages(lang: str, kind: str, use: str, template: str, passages: list[str]) -> list[SuitePrompt]:
    source = "wikitext2-valid" if lang == "en" else "polish-calib"
    return [
        _prompt(f"distill-{lang}-{kind}-{i:04d}", lang, use, source, template.format(p))  # type: ignore[arg-type]
        for i, p in enumerate(passages)
    ]


def distill_pool() -> list[SuitePrompt]:
    """Every candidate seed prompt (deterministic order)."""
    mtb, ifeval = _suite_ids()
    pl = _passages("polish-calib", "pl")
    half = len(pl) // 2
    return [
        *_mt_bench(mtb),
        *_ifeval(ifeval),
        *_from_passages(
            "en", "summary", "summarization", _SUMMARIZE["en"], _passages("wikitext2-valid", "en")
        ),
        *_from_passages("pl", "summary", "summarization", _SUMMARIZE["pl"], pl[:half]),
        *_from_passages("pl", "continuation", "longform", _CONTINUE_PL, pl[half:]),
    ]


def distill_prompts(n: int, seed: int = 0, lang: str | None = None) -> DistillPrompts:
    """``n`` seed prompts drawn from :func:`distill_pool` with ``seed``, in a stratified order:
    every source is represented in proportion to its share of the pool.  English and Polish
    passages outnumber MT-Bench and IFEval, so each use gets an equal quarter of the draw (as far
    as its pool allows).  ``lang`` ("en"/"pl") keeps one language (a model that cannot write
    Polish — SmolLM2 — only teaches its own loops there)."""
    if n < 1:
        raise DataError(f"the distillation set needs at least 1 prompt, got {n}")
    if lang not in (None, "en", "pl"):
        raise DataError(f"distillation prompts: lang must be 'en', 'pl' or null, got {lang!r}")
    pool = [p for p in distill_pool() if lang is None or p.lang == lang]
    rng = np.random.default_rng(seed)
    by_use: dict[str, list[SuitePrompt]] = {}
    for p in pool:
        by_use.setdefault(f"{p.lang}-{p.use}", []).append(p)
    groups = [by_use[k] for k in sorted(by_use)]
    for g in groups:
        rng.shuffle(g)  # type: ignore[arg-type]
    picked: list[SuitePrompt] = []
    while len(picked) < n and any(groups):
        for g in groups:
            if g and len(picked) < n:
                picked.append(g.pop())
    if len(picked) < n:
        raise DataError(f"the distillation pool has {len(picked)} prompts; {n} were asked for")
    order = rng.permutation(len(picked))
    chosen = tuple(picked[i] for i in order)
    return DistillPrompts(chosen, seed, suite_sha256(chosen))
