"""``gen:DATA``: generation on a prompt set (``gen:collapse`` = ``gen:default``, ``gen:pl``,
``gen:en_pl``, ``gen:chat`` or a .txt/.jsonl prompt file), greedy or seeded sampling, judged
against collapse thresholds calibrated on the reference's own generations, with the
reference's NLL of the candidate's text and teacher-forced / free-running KLD."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from q2lab.errors import ConfigError
from q2lab.eval.registry import TaskKind, register_kind

if TYPE_CHECKING:
    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel

#: Task data names that stand for a packaged prompt set.
GEN_ALIASES = {"collapse": "default"}
_THRESHOLDS = "gen.thresholds"  # Evaluator.cache: collapse thresholds per (task key, prompts)
_REF_SAMPLES = "gen.reference_samples"  # Evaluator.cache: the reference's generations, same key
_REF_NLL = "gen.reference_nll"  # Evaluator.cache: the reference's NLL of its own generations
_REFERENCE = "reference"  # names the reference's resume file, whichever cell generates its samples


@register_kind
class GenerationKind(TaskKind):
    name = "gen"
    summary = "generation: collapse rate, repetition, language drift; tf_kld / fr_kld / agree_tokens"
    samples_items = True  # ``sample: N``: a seeded random N of the prompts (after ``limit``)

    def prepare_options(self, opts: dict[str, Any], data: str) -> None:
        """A chat suite sets each prompt's length (long-form 256, else 128) unless the task
        gives one ``max_new_tokens`` for all."""
        super().prepare_options(opts, data)
        from q2lab.eval.generation import SUITES

        if data in SUITES and "max_new_tokens" not in opts:
            opts["max_new_tokens"] = None

    def check_data(self, task: TaskSpec) -> None:
        from q2lab.eval.generation import load_prompts

        load_prompts(GEN_ALIASES.get(task.data, task.data))

    def language(self, task: TaskSpec) -> str | None:
        """The languages of the prompts (each detected; ``"en+pl"`` for a bilingual set)."""
        from q2lab.data.language import detect_language, join_languages

        prompts = _selected(task).prompts
        found = {detect_language(p) for p in prompts} - {None}
        return join_languages(sorted(found)) if found else None

    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        """Generations (greedy, or seeded sampling with ``temperature``), judged against
        thresholds calibrated on the reference's own generations; the reference also scores
        the candidate's text (NLL), which catches fluent-looking word salad that repetition
        metrics miss, and both models are compared teacher-forced along each other's text."""
        from q2lab.eval.generation import (
            collapse_records,
            continuation_kld,
            continuation_scores,
            divergence_records,
            heldout_record,
        )

        (task,) = tasks
        reference = evaluator.reference
        prompts = _prompts(candidate, task)
        who = _REFERENCE if is_reference else None
        run_as = _float_cache(task) if is_reference else task
        resume = evaluator.resume_file(candidate, run_as, "gen", who=who)
        samples = _generate(candidate, prompts, task, resume, quantized_cache=not is_reference)
        thresholds = _thresholds(evaluator, task, prompts, samples if is_reference else None)
        fr = None
        if is_reference:  # scored once already, to calibrate the thresholds
            ref_nll = evaluator.cache(_REF_NLL).get(_key(task, prompts))
        elif reference is not None:  # one reference pass: its NLL of the text and fr_kld
            ref_nll, fr = continuation_scores(reference, candidate, samples)
        else:
            ref_nll = None
        records = collapse_records(task.label, samples, thresholds, ref_nll=ref_nll, prompt_set=prompts)
        if is_reference:
            records.append(heldout_record(task.label, samples, ref_nll=ref_nll, prompt_set=prompts))
        if fr is not None:
            ref_samples = evaluator.cache(_REF_SAMPLES)[_key(task, prompts)]
            tf = continuation_kld(reference, candidate, ref_samples)
            records += divergence_records(
                task.label, ref_samples, samples, tf, fr, greedy=task.temperature is None
            )
        return records


def _selected(task: TaskSpec):
    """The task's prompts: the first ``limit``, then a seeded random ``sample`` of those."""
    from q2lab.eval.generation import load_prompts

    return load_prompts(GEN_ALIASES.get(task.data, task.data)).head(task.limit).sample(task.sample, task.seed)


def _prompts(candidate: LoadedModel, task: TaskSpec):
    """The prompt set, cut to ``limit`` and ``sample`` and rendered: a suite's conversations through the chat
    template when the model has one (``chat: false`` or a base model: the plain user/assistant
    frame), a plain prompt set through the template only with ``chat: true``."""
    import dataclasses

    from q2lab.eval.generation import PromptSet, chat_prompt, render_conversation

    prompts = _selected(task)
    if prompts.turns is not None:
        rendered = [render_conversation(candidate, turns, task.chat) for turns in prompts.turns]
        return dataclasses.replace(prompts, prompts=tuple(t for t, _ in rendered), rendering=rendered[0][1])
    if not task.chat:
        return prompts
    texts = tuple(chat_prompt(candidate, p, True) for p in prompts.prompts)
    return dataclasses.replace(PromptSet.from_prompts(prompts.name, texts), rendering="chat template")


def _lengths(prompts, task: TaskSpec) -> int | tuple[int, ...]:
    """The task's ``max_new_tokens``, or each suite prompt's own (the task leaves it unset)."""
    if task.max_new_tokens is not None:
        return task.max_new_tokens
    if prompts.lengths is None:
        raise ConfigError(f"task {task.label}: max_new_tokens is needed (only the chat suites set their own)")
    return prompts.lengths


def _generate(
    model: LoadedModel, prompts, task: TaskSpec, resume: Path | None = None, quantized_cache: bool = False
):
    """The model's samples of every prompt; with a ``resume`` file (a study's workdir) finished
    batches are kept there, so an interrupted cell, a re-judged cell and another process's cells
    reuse them instead of decoding again (the whole chat suite is ~10 min on 2 CPU cores).
    ``quantized_cache``: decode through the task's ``kv`` cache (the candidate; the reference
    always decodes with a float cache)."""
    from q2lab.eval.generation import GenSample, generate, prompts_sha256
    from q2lab.quant.kv import KVConfig
    from q2lab.utils.resume import append_resume, read_resume

    kv = KVConfig(**dict(task.kv)) if quantized_cache and task.kv is not None else None

    greedy = task.temperature is None
    lengths = _lengths(prompts, task)
    per_prompt = [lengths] * len(prompts.prompts) if isinstance(lengths, int) else list(lengths)
    settings = {
        "prompts": prompts_sha256(prompts.prompts),
        "max_new_tokens": per_prompt,
        "temperature": task.temperature,
        "seed": task.seed,
    } | ({"kv": dict(task.kv)} if kv is not None else {})
    done = {
        int(k): GenSample(
            prompts.prompts[int(k)],
            r["text"],
            tuple(r["token_ids"]),
            r["hit_eos"],
            len(r["token_ids"]),
            per_prompt[int(k)],
        )
        for k, r in read_resume(resume, settings).items()
    }

    def keep(fresh: dict[int, GenSample]) -> None:
        if resume is not None:
            rows = {
                i: {"text": s.text, "token_ids": list(s.token_ids), "hit_eos": s.hit_eos}
                for i, s in fresh.items()
            }
            append_resume(resume, settings, rows)

    return generate(
        model,
        prompts,
        max_new_tokens=lengths,
        greedy=greedy,
        temperature=1.0 if greedy else float(task.temperature),
        seed=task.seed,
        batch_size=task.batch_size or 8,
        done=done,
        on_batch=keep,
        kv=kv,
    )


def _float_cache(task: TaskSpec) -> TaskSpec:
    """The task as the reference runs it: ``kv`` quantizes the candidate's cache only, so the
    reference's samples, NLL and thresholds are shared with the same task without ``kv``."""
    import dataclasses

    return dataclasses.replace(task, kv=None)


def _key(task: TaskSpec, prompts) -> str:
    return f"{_float_cache(task).key()}|{prompts.sha256}"


def _thresholds(evaluator: Evaluator, task: TaskSpec, prompts, own_samples: Any):
    """Collapse thresholds of (task, prompts), one set per generation length, calibrated once
    per evaluator on the reference's generations (``own_samples`` when the candidate is the
    reference); defaults without a reference."""
    from q2lab.eval.generation import CollapseThresholds, calibrate_thresholds, prompt_langs

    key = _key(task, prompts)
    cache = evaluator.cache(_THRESHOLDS)
    if key not in cache:
        reference = evaluator.reference
        if reference is None:
            cache[key] = CollapseThresholds()
        else:
            resume = evaluator.resume_file(reference, _float_cache(task), "gen", who=_REFERENCE)
            ref_samples = own_samples or _generate(reference, prompts, task, resume)
            evaluator.cache(_REF_SAMPLES)[key] = ref_samples
            nll = evaluator.cache(_REF_NLL)[key] = _own_nll(evaluator, task, reference, ref_samples)
            cache[key] = calibrate_thresholds(ref_samples, ref_nll=nll, langs=prompt_langs(prompts))
    return cache[key]


def _own_nll(evaluator: Evaluator, task: TaskSpec, reference: LoadedModel, samples: list) -> list[float]:
    """The reference's NLL of its own samples, kept beside them in the study's workdir: every
    process that judges a cell calibrates its thresholds with it, and scoring the whole suite
    again costs minutes (one forward pass over each prompt + answer)."""
    from q2lab.eval.generation import reference_nll
    from q2lab.utils.io import sha256_json
    from q2lab.utils.resume import append_resume, read_resume

    resume = evaluator.resume_file(reference, _float_cache(task), "refnll", who=_REFERENCE)
    settings = {"samples": sha256_json([[s.prompt, list(s.token_ids)] for s in samples])}
    done = read_resume(resume, settings)
    if len(done) == len(samples):
        return [float(done[str(i)]["nll"]) for i in range(len(samples))]
    nll = reference_nll(reference, samples)
    if resume is not None:
        append_resume(resume, settings, {i: {"nll": v} for i, v in enumerate(nll)})
    return nll
