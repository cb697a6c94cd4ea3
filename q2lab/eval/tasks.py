"""Evaluation tasks named by strings, and the :class:`Evaluator` that runs them.

Task strings (CLI ``--task``, study YAML ``tasks:``) are ``KIND:DATA``:

=========================  ==========================================================
``ppl:wikitext2``          perplexity on a corpus (name or .txt/.jsonl path)
``kld:wikitext2``          KL(reference ‖ candidate), median, p99, top-1 agreement
``mc:hellaswag``           multiple choice (name or generic .jsonl path): acc, acc_norm
``gen:collapse``           greedy generation on the default prompts (``gen:default`` is the
                           same; ``gen:pl``, ``gen:en_pl``, ``gen:chat`` or a .txt/.jsonl
                           prompt file): collapse rate, repetition, language drift, and
                           with a reference tf_kld / fr_kld / agree_tokens; options
                           ``chat``, ``temperature`` (seeded sampling), ``seed``
``ifeval:ifeval``          IFEval (staged prompts or a path): prompt/instruction-level strict
                           and loose accuracy; chat template for instruct models
``harness:hellaswag``      the same MC items scored by lm-eval itself through
                           :mod:`q2lab.eval.harness` (needs ``q2lab[eval]``): acc, acc_norm
=========================  ==========================================================

Each kind is a registered :class:`~q2lab.eval.registry.TaskKind` (:mod:`q2lab.eval.kinds`, one
module per kind): its option defaults, its data check and how it runs; :class:`Evaluator` looks
kinds up by name.  ``ppl`` and ``kld`` on the same corpus and windows share one candidate
forward pass.  Two variants of one task (another ``ctx``, a ``kv`` cache) are told apart by their
label ``KIND:DATA@TAG`` (option ``tag``; a ``kv`` task is ``@kvB`` by default), which is the
records' ``task``.  Every record states the task's language (``details.lang``) and, for a quantized
candidate, its calibration's (``details.calib_lang``); when the calibration did not include the
task's language the evaluator warns once per task (:func:`language_warning`).
The reference's outputs (KLD log-probs, generation thresholds) are computed once
per evaluator and reused for every candidate, so a study pays for the reference once.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q2lab.calib.store import calibration_language
from q2lab.data.language import uncovered_languages
from q2lab.errors import CalibrationLanguageWarning, ConfigError, Q2labError
from q2lab.eval.records import Record
from q2lab.eval.registry import get_kind, kind_names
from q2lab.models.loader import LoadedModel
from q2lab.utils.io import sha256_json


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    data: str
    windows: int | None = 32  # ppl/kld: first N windows of the evaluation split
    ctx: int = 512
    limit: int | None = None  # mc: first N items; gen: first N prompts
    max_new_tokens: int | None = 64  # gen chat suites: None = each prompt's own
    batch_size: int | None = None
    chat: bool | None = None  # apply the chat template; None: ifeval when the tokenizer has one, gen never
    temperature: float | None = None  # gen: sample at this temperature (None: greedy)
    seed: int = 0  # gen: sampling seed (per prompt streams, see generation.generate); ifeval: subset seed
    sample: int | None = None  # ifeval: a seeded random subset of N items (after limit)
    kv: tuple | None = (
        None  # ppl/kld/gen: the candidate's KV cache quantized, ((bits, b), (group, g), (residual, r))
    )
    tag: str | None = None  # a variant's name: the label becomes KIND:DATA@TAG

    @property
    def label(self) -> str:
        """``KIND:DATA``, the records' ``task``; a variant of the same data (another ``ctx``, a
        quantized KV cache) is ``KIND:DATA@TAG`` so both fit in one study: ``tag`` when given,
        else ``kvB`` for a task with a B-bit KV cache (``kvB-BACKEND`` through a peer's cache)."""
        tag = self.tag
        if tag is None and self.kv is not None:
            kv = dict(self.kv)
            tag = f"kv{kv['bits']}" + (f"-{kv['backend']}" if "backend" in kv else "")
        return f"{self.kind}:{self.data}" + (f"@{tag}" if tag else "")

    def applies_to(self, is_reference: bool) -> bool:
        """Whether a cell gets rows for this task: the reference has no KLD to itself, except
        through a quantized KV cache (``kv``), which is all that differs then."""
        return not (is_reference and get_kind(self.kind).compares_to_reference and self.kv is None)

    def key(self) -> str:
        """Hash of everything that changes the task's numbers (for resumable studies).  Fields
        added after the first release count only when set, so older results keep their keys."""
        d = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d.get(name) == default:
                d.pop(name)
        return sha256_json(d)[:12]


#: Fields added to TaskSpec later, with the default that leaves a task's key unchanged.
_LATER_FIELDS: dict[str, Any] = {
    "chat": None,
    "temperature": None,
    "seed": 0,
    "sample": None,
    "kv": None,
    "tag": None,
}
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")


_OPTION_KEYS = {f.name for f in dataclasses.fields(TaskSpec)} - {"kind", "data"}


def parse_task(spec: str | dict[str, Any], **defaults: Any) -> TaskSpec:
    """``"mc:hellaswag"`` or ``{"task": "mc:hellaswag", "limit": 100}`` → :class:`TaskSpec`."""
    opts: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("task", None)
        if not isinstance(name, str):
            raise ConfigError(f"a task entry needs a 'task: KIND:DATA' string, got {spec!r}")
        unknown = sorted(set(spec) - _OPTION_KEYS)
        if unknown:
            raise ConfigError(f"unknown task option(s) {unknown} for {name}; known: {sorted(_OPTION_KEYS)}")
        opts.update(spec)
    elif isinstance(spec, str):
        name = spec
    else:
        raise ConfigError(f"a task must be a string like 'ppl:wikitext2' or a mapping, got {spec!r}")
    kind, sep, data = name.partition(":")
    kinds = kind_names()
    if not sep or kind not in kinds or not data:
        raise ConfigError(f"task {name!r} must look like KIND:DATA with KIND one of {', '.join(kinds)}")
    get_kind(kind).prepare_options(opts, data)
    t = opts.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not t > 0):
        raise ConfigError(f"task {name}: temperature must be a number > 0 (or null for greedy), got {t!r}")
    seed = opts.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"task {name}: seed must be an integer ≥ 0, got {seed!r}")
    if opts.get("chat") is not None and not isinstance(opts["chat"], bool):
        raise ConfigError(f"task {name}: chat must be true, false or null, got {opts['chat']!r}")
    if opts.get("kv") is not None:
        from q2lab.quant.kv import KVConfig

        if kind not in ("ppl", "kld", "gen"):
            raise ConfigError(f"task {name}: kv (a quantized KV cache) applies to ppl, kld and gen tasks")
        opts["kv"] = tuple(sorted(KVConfig.parse(opts["kv"]).to_dict().items()))
    tag = opts.get("tag")
    if tag is not None and (not isinstance(tag, str) or not _TAG.fullmatch(tag)):
        raise ConfigError(
            f"task {name}: tag must be a short name of letters, digits and _.+- (it becomes "
            f"{name}@TAG), got {tag!r}"
        )
    for key in ("windows", "ctx", "limit", "max_new_tokens", "batch_size", "sample"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"task {name}: {key} must be a positive integer, got {v!r}")
    return TaskSpec(kind, data, **{k: v for k, v in opts.items() if k in _OPTION_KEYS})


def check_data(task: TaskSpec) -> None:
    """Resolve a task's data now, so a typo fails before any model is loaded."""
    get_kind(task.kind).check_data(task)


@functools.lru_cache(maxsize=256)
def task_language(task: TaskSpec) -> str | None:
    """The language of a task's text (its kind's :meth:`~q2lab.eval.registry.TaskKind.language`);
    None when unknown or when the data cannot be read (language never fails an evaluation)."""
    try:
        return get_kind(task.kind).language(task)
    except (Q2labError, OSError):
        return None


def language_warning(model: str, calibration: dict[str, Any] | None, task: TaskSpec) -> str | None:
    """One line when ``model``'s calibration did not include the language of ``task``; None
    when it did or when either language is unknown."""
    cal, lang = calibration_language(calibration), task_language(task)
    missing = uncovered_languages(cal, lang)
    if not missing:
        return None
    corpus = (calibration or {}).get("corpus")
    return (
        f"{model} was calibrated on {corpus} ({cal}) but {task.label} is {lang} text: GPTQ-style "
        f"methods keep much less of their gain off the calibration language; calibrate on "
        f"{'+'.join(sorted(missing))} text or a mix (e.g. --corpus wikitext2+polish)"
    )


def _warn(message: str) -> None:
    warnings.warn(message, CalibrationLanguageWarning, stacklevel=3)


@dataclass
class Evaluator:
    """Runs tasks on candidates against one reference, caching the reference's outputs."""

    reference: LoadedModel | None
    workdir: Path | None = None  # where reference log-probs are cached (None: in lockstep)
    timings: dict[str, float] = field(default_factory=dict)
    candidate_key: str | None = None  # names the candidate in resume files (a study sets the cell id)
    #: Where calibration-language warnings go (one line each; default: a Python warning).
    warn: Callable[[str], None] = _warn
    _caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    _warned: set[tuple[str, str, str]] = field(default_factory=set)

    def run(
        self,
        candidate: LoadedModel,
        tasks: list[TaskSpec],
        on_records: Callable[[list[Record]], None] | None = None,
    ) -> list[Record]:
        """All records for ``candidate``; ``kld`` needs a reference, as does calibrating ``gen``.
        ``on_records`` receives each task's records as soon as it finishes (a study appends
        them to its results, so an interrupted cell resumes at the first unfinished task)."""
        records: list[Record] = []
        is_reference = self.reference is not None and candidate is self.reference
        done: set[TaskSpec] = set()
        reported: set[str] = set()
        for task in tasks:
            if task in done:
                continue
            t0 = time.time()
            kind = get_kind(task.kind)
            shared = kind.shared_pass(task)
            group = (
                [task] if shared is None else [t for t in tasks if get_kind(t.kind).shared_pass(t) == shared]
            )
            done.update(group)
            # a quantized KV cache makes the reference a candidate: its weights with another cache
            new = kind.run(self, candidate, group, is_reference and task.kv is None)
            self._languages(candidate, group, new)
            records += new
            done.add(task)
            self.timings[task.label] = round(time.time() - t0, 2)
            if on_records is not None:
                on_records([r for r in records if r.task in {t.label for t in done} - reported])
                reported = {t.label for t in done}
        return records

    def _languages(self, candidate: LoadedModel, group: list[TaskSpec], records: list[Record]) -> None:
        """State each record's task and calibration languages; warn once per mismatched task."""
        info = getattr(candidate, "info", None)  # duck-typed candidates (tests, plugins) may lack one
        calibration = getattr(info, "calibration", None)
        cal = calibration_language(calibration)
        by_label = {t.label: t for t in group}
        for r in records:
            t = by_label.get(r.task)
            r.details.setdefault("lang", task_language(t) if t else None)
            if cal:
                r.details.setdefault("calib_lang", cal)
        if info is None:
            return
        for t in group:
            message = language_warning(info.name, calibration, t)
            seen = (info.fingerprint, str((calibration or {}).get("key")), t.label)
            if message and seen not in self._warned:
                self._warned.add(seen)
                self.warn(message)

    def cache(self, name: str) -> dict[str, Any]:
        """A kind's cache of reference outputs under ``name``, kept for this evaluator's life."""
        return self._caches.setdefault(name, {})

    def resume_file(
        self, candidate: LoadedModel, task: TaskSpec, what: str, who: str | None = None
    ) -> Path | None:
        """Where a long task keeps its partial results, keyed by candidate and task settings
        (``who`` names the model instead of the candidate key: the reference's samples are one
        file whichever cell generates them)."""
        if self.workdir is None:
            return None
        who = (
            f"{who}|{candidate.info.fingerprint}" if who else self.candidate_key or candidate.info.fingerprint
        )
        return Path(self.workdir) / "partial" / f"{what}-{sha256_json([who, task.key()])[:16]}.jsonl"
