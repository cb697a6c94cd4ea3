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

``ppl`` and ``kld`` on the same corpus and windows share one candidate forward pass.  The
reference's outputs (KLD log-probs, generation thresholds) are computed once per evaluator and
reused for every candidate, so a study pays for the reference once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from q2lab.data.text import corpus_windows, load_corpus
from q2lab.errors import ConfigError
from q2lab.eval.likelihood import ReferenceCache, kld_records, ppl_records, score_windows
from q2lab.eval.records import Record
from q2lab.models.loader import LoadedModel
from q2lab.utils.io import sha256_json

KINDS = ("ppl", "kld", "mc", "gen", "harness", "ifeval")
GEN_ALIASES = {"collapse": "default"}


# Kinds that compare a candidate with the reference: the reference cell has no rows for them.
COMPARISON_KINDS = frozenset({"kld"})


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    data: str
    windows: int | None = 32  # ppl/kld: first N windows of the evaluation split
    ctx: int = 512
    limit: int | None = None  # mc: first N items; gen: first N prompts
    max_new_tokens: int = 64
    batch_size: int | None = None
    chat: bool | None = None  # apply the chat template; None: ifeval when the tokenizer has one, gen never
    temperature: float | None = None  # gen: sample at this temperature (None: greedy)
    seed: int = 0  # gen: sampling seed (per prompt streams, see generation.generate)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.data}"

    def applies_to(self, is_reference: bool) -> bool:
        """Whether a cell gets rows for this task (the reference has no KLD to itself)."""
        return not (is_reference and self.kind in COMPARISON_KINDS)

    def key(self) -> str:
        """Hash of everything that changes the task's numbers (for resumable studies).  Fields
        added after the first release count only when set, so older results keep their keys."""
        d = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d.get(name) == default:
                d.pop(name)
        return sha256_json(d)[:12]


#: Fields added to TaskSpec later, with the default that leaves a task's key unchanged.
_LATER_FIELDS: dict[str, Any] = {"chat": None, "temperature": None, "seed": 0}


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
    if not sep or kind not in KINDS or not data:
        raise ConfigError(f"task {name!r} must look like KIND:DATA with KIND one of {', '.join(KINDS)}")
    if kind not in ("ppl", "kld"):
        opts.pop("windows", None)
    if kind == "ifeval" and "max_new_tokens" not in opts:
        from q2lab.eval.ifeval import DEFAULT_MAX_NEW_TOKENS

        opts["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    t = opts.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not t > 0):
        raise ConfigError(f"task {name}: temperature must be a number > 0 (or null for greedy), got {t!r}")
    seed = opts.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"task {name}: seed must be an integer ≥ 0, got {seed!r}")
    if opts.get("chat") is not None and not isinstance(opts["chat"], bool):
        raise ConfigError(f"task {name}: chat must be true, false or null, got {opts['chat']!r}")
    for key in ("windows", "ctx", "limit", "max_new_tokens", "batch_size"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"task {name}: {key} must be a positive integer, got {v!r}")
    return TaskSpec(kind, data, **{k: v for k, v in opts.items() if k in _OPTION_KEYS})


def check_data(task: TaskSpec) -> None:
    """Resolve a task's data now, so a typo fails before any model is loaded."""
    if task.kind in ("ppl", "kld"):
        load_corpus(task.data, role="eval")
    elif task.kind in ("mc", "harness"):
        from q2lab.data.tasks.mc import load_mc_task

        load_mc_task(task.data, limit=task.limit)
        if task.kind == "harness":
            from q2lab.eval.harness import _require

            _require()
    elif task.kind == "ifeval":
        from q2lab.eval.ifeval import _registry, load_ifeval

        load_ifeval(task.data, limit=task.limit)
        _registry()
    else:
        from q2lab.eval.generation import load_prompts

        load_prompts(GEN_ALIASES.get(task.data, task.data))


@dataclass
class Evaluator:
    """Runs tasks on candidates against one reference, caching the reference's outputs."""

    reference: LoadedModel | None
    workdir: Path | None = None  # where reference log-probs are cached (None: in lockstep)
    timings: dict[str, float] = field(default_factory=dict)
    candidate_key: str | None = None  # names the candidate in resume files (a study sets the cell id)
    _ref_caches: dict[str, ReferenceCache] = field(default_factory=dict)
    _thresholds: dict[str, Any] = field(default_factory=dict)
    _ref_samples: dict[str, Any] = field(default_factory=dict)  # reference generations per gen task

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
            if task.kind in ("ppl", "kld"):
                twins = [
                    t
                    for t in tasks
                    if t.kind in ("ppl", "kld")
                    and (t.data, t.windows, t.ctx) == (task.data, task.windows, task.ctx)
                ]
                done.update(twins)
                records += self._likelihood(candidate, twins, is_reference)
            elif task.kind == "mc":
                records += self._mc(candidate, task)
            elif task.kind == "harness":
                records += self._harness(candidate, task)
            elif task.kind == "ifeval":
                records += self._ifeval(candidate, task)
            else:
                records += self._gen(candidate, task, is_reference)
            done.add(task)
            self.timings[task.label] = round(time.time() - t0, 2)
            if on_records is not None:
                on_records([r for r in records if r.task in {t.label for t in done} - reported])
                reported = {t.label for t in done}
        return records

    # ----------------------------------------------------------------- ppl / kld
    def _likelihood(self, candidate: LoadedModel, twins: list[TaskSpec], is_reference: bool) -> list[Record]:
        task = twins[0]
        want_kld = any(t.kind == "kld" for t in twins) and not is_reference
        if want_kld and self.reference is None:
            raise ConfigError(f"task kld:{task.data} needs a reference model (--ref)")
        corpus = load_corpus(task.data, role="eval")
        windows = corpus_windows(candidate, corpus, task.windows, task.ctx)
        reference = self._reference_logprobs(task, corpus.sha256, windows) if want_kld else None
        stats = score_windows(candidate.model, windows, reference, desc=f"{task.data} ppl/kld")
        details = {
            "data": corpus.name,
            "data_sha256": corpus.sha256,
            "windows": int(windows.shape[0]),
            "ctx": task.ctx,
            "add_bos": candidate.info.add_bos,
            "scored": "positions 1..ctx-1 of each window",
            "tokens_scored": int(sum(stats.tokens)),
        }
        out: list[Record] = []
        for t in twins:
            if t.kind == "ppl":
                out += ppl_records(t.label, stats, details)
            elif want_kld:
                out += kld_records(t.label, stats, details)
        return out

    def _reference_logprobs(self, task: TaskSpec, corpus_sha: str, windows: torch.Tensor):
        assert self.reference is not None
        if self.workdir is None:
            return self.reference.model
        key = sha256_json(
            [
                self.reference.info.fingerprint,
                corpus_sha,
                task.windows,
                task.ctx,
                windows.shape[0],
                self.reference.info.add_bos,
            ]
        )[:16]
        if key not in self._ref_caches:
            path = Path(self.workdir) / f"reference-{key}.f16"
            self._ref_caches[key] = ReferenceCache.build(self.reference.model, windows, path, key)
        return self._ref_caches[key]

    # ----------------------------------------------------------------- multiple choice
    def _mc(self, candidate: LoadedModel, task: TaskSpec) -> list[Record]:
        from q2lab.data.tasks.mc import load_mc_task
        from q2lab.eval.multiple_choice import mc_records, score_mc

        mc = load_mc_task(task.data, limit=task.limit)
        kw = {"batch_size": task.batch_size} if task.batch_size else {}
        return mc_records(task.label, mc, score_mc(candidate, mc, **kw))

    def _harness(self, candidate: LoadedModel, task: TaskSpec) -> list[Record]:
        """lm-eval's own log-likelihoods on q2lab's items, recorded like ``mc:`` (with per-item
        units), so a report can pair the two scorers item by item."""
        import numpy as np

        from q2lab.data.tasks.mc import load_mc_task
        from q2lab.eval.harness import run_harness_mc
        from q2lab.eval.multiple_choice import MCResult, mc_records

        mc = load_mc_task(task.data, limit=task.limit)
        out = run_harness_mc(candidate, [mc], batch_size=task.batch_size or 8)[mc.name]
        result = MCResult(
            task=mc.name,
            loglik=out.loglik,
            lengths=[np.array([len(c) for c in item.choices], dtype=np.float64) for item in mc.items],
            labels=np.array([item.label for item in mc.items], dtype=np.int64),
            truncated=np.zeros(len(mc.items), dtype=bool),
        )
        records = mc_records(task.label, mc, result)
        for r in records:
            r.details["scorer"] = "lm-eval HFLM (simple_evaluate)"
        return records

    def _ifeval(self, candidate: LoadedModel, task: TaskSpec) -> list[Record]:
        """IFEval answers are the longest generation q2lab runs: with a workdir, finished
        answers go to a resume file per candidate and task, so an interrupted run continues."""
        from q2lab.eval.ifeval import ifeval_records, load_ifeval, run_ifeval

        data = load_ifeval(task.data, limit=task.limit)
        resume = self._resume_file(candidate, task, "ifeval")
        run = run_ifeval(
            candidate,
            data,
            max_new_tokens=task.max_new_tokens,
            chat=task.chat,
            batch_size=task.batch_size or 8,
            resume=resume,
        )
        return ifeval_records(task.label, data, run)

    def _resume_file(self, candidate: LoadedModel, task: TaskSpec, what: str) -> Path | None:
        """Where a long task keeps its partial results, keyed by candidate and task settings."""
        if self.workdir is None:
            return None
        who = self.candidate_key or candidate.info.fingerprint
        return Path(self.workdir) / "partial" / f"{what}-{sha256_json([who, task.key()])[:16]}.jsonl"

    # ----------------------------------------------------------------- generation
    def _gen(self, candidate: LoadedModel, task: TaskSpec, is_reference: bool) -> list[Record]:
        """Generations (greedy, or seeded sampling with ``temperature``), judged against
        thresholds calibrated on the reference's own generations; the reference also scores
        the candidate's text (NLL), which catches fluent-looking word salad that repetition
        metrics miss, and both models are compared teacher-forced along each other's text."""
        from q2lab.eval.generation import (
            collapse_records,
            continuation_kld,
            divergence_records,
            reference_nll,
        )

        prompts = self._gen_prompts(candidate, task)
        samples = self._generate(candidate, prompts, task)
        thresholds = self._gen_thresholds(task, prompts, samples if is_reference else None)
        ref_nll = reference_nll(self.reference, samples) if self.reference is not None else None
        records = collapse_records(task.label, samples, thresholds, ref_nll=ref_nll, prompt_set=prompts)
        if self.reference is not None and not is_reference:
            ref_samples = self._ref_samples[self._gen_key(task, prompts)]
            tf = continuation_kld(self.reference, candidate, ref_samples)
            fr = continuation_kld(self.reference, candidate, samples)
            records += divergence_records(
                task.label, ref_samples, samples, tf, fr, greedy=task.temperature is None
            )
        return records

    @staticmethod
    def _gen_prompts(candidate: LoadedModel, task: TaskSpec):
        """The prompt set, cut to ``limit`` and rendered through the chat template if asked."""
        from q2lab.eval.generation import PromptSet, chat_prompt, load_prompts

        prompts = load_prompts(GEN_ALIASES.get(task.data, task.data))
        texts = prompts.prompts[: task.limit] if task.limit else prompts.prompts
        if task.chat:
            texts = tuple(chat_prompt(candidate, p, True) for p in texts)
        if texts == prompts.prompts:
            return prompts
        return PromptSet.from_prompts(prompts.name, texts)

    @staticmethod
    def _generate(model: LoadedModel, prompts, task: TaskSpec):
        from q2lab.eval.generation import generate

        greedy = task.temperature is None
        return generate(
            model,
            prompts,
            max_new_tokens=task.max_new_tokens,
            greedy=greedy,
            temperature=1.0 if greedy else float(task.temperature),
            seed=task.seed,
            batch_size=task.batch_size or 8,
        )

    @staticmethod
    def _gen_key(task: TaskSpec, prompts) -> str:
        return f"{task.key()}|{prompts.sha256}"

    def _gen_thresholds(self, task: TaskSpec, prompts, own_samples):
        from q2lab.eval.generation import CollapseThresholds, reference_nll

        key = self._gen_key(task, prompts)
        if key not in self._thresholds:
            if self.reference is None:
                self._thresholds[key] = CollapseThresholds()
            else:
                ref_samples = own_samples or self._generate(self.reference, prompts, task)
                self._ref_samples[key] = ref_samples
                self._thresholds[key] = CollapseThresholds.from_reference(
                    ref_samples, ref_nll=reference_nll(self.reference, ref_samples)
                )
        return self._thresholds[key]
