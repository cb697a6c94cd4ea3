"""``ppl:DATA`` (perplexity) and ``kld:DATA`` (KL(reference ‖ candidate), median, p99, top-1
agreement): one candidate pass over the same windows serves both; the reference's log-probs are
cached on disk once per evaluator (or computed in lockstep without a workdir)."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

from q2lab.data.text import corpus_language, corpus_windows, load_corpus
from q2lab.errors import ConfigError
from q2lab.eval.likelihood import ReferenceCache, kld_records, ppl_records, score_windows
from q2lab.eval.registry import TaskKind, register_kind
from q2lab.quant.kv import KVConfig
from q2lab.utils.io import sha256_json

if TYPE_CHECKING:
    import torch

    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel

_CACHE = "ppl_kld.reference_logprobs"  # Evaluator.cache: reference log-prob caches by key


class _Likelihood(TaskKind):
    """What ppl and kld share: corpus windows and the one candidate pass."""

    uses_windows = True

    def check_data(self, task: TaskSpec) -> None:
        load_corpus(task.data, role="eval")

    def language(self, task: TaskSpec) -> str | None:
        return corpus_language(task.data)

    def shared_pass(self, task: TaskSpec) -> Hashable:
        return ("likelihood", task.data, task.windows, task.ctx, task.kv)

    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        task = tasks[0]
        want_kld = any(t.kind == KLDKind.name for t in tasks) and not is_reference
        if want_kld and evaluator.reference is None:
            raise ConfigError(f"task kld:{task.data} needs a reference model (--ref)")
        corpus = load_corpus(task.data, role="eval")
        windows = corpus_windows(candidate, corpus, task.windows, task.ctx)
        reference = _reference_logprobs(evaluator, task, corpus.sha256, windows) if want_kld else None
        kv = None if task.kv is None else KVConfig(**dict(task.kv))
        stats = score_windows(candidate.model, windows, reference, desc=f"{task.data} ppl/kld", kv=kv)
        details = {
            "data": corpus.name,
            "data_sha256": corpus.sha256,
            "windows": int(windows.shape[0]),
            "ctx": task.ctx,
            "add_bos": candidate.info.add_bos,
            "scored": "positions 1..ctx-1 of each window",
            "tokens_scored": int(sum(stats.tokens)),
        }
        if kv is not None:
            details["kv"] = {
                **dict(task.kv),
                "scored": f"each window fed in chunks of {kv.group} tokens through the quantized cache",
                "bytes_per_token": stats.kv_bytes_per_token,
                "float_bytes_per_token": stats.kv_float_bytes_per_token,
            }
        out: list[Record] = []
        for t in tasks:
            if t.kind == PerplexityKind.name:
                out += ppl_records(t.label, stats, details)
            elif want_kld:
                out += kld_records(t.label, stats, details)
        return out


@register_kind
class PerplexityKind(_Likelihood):
    name = "ppl"
    summary = "perplexity on a corpus (name or .txt/.jsonl path)"


@register_kind
class KLDKind(_Likelihood):
    name = "kld"
    summary = "KL(reference ‖ candidate), median, p99, top-1 agreement"
    compares_to_reference = True


def _reference_logprobs(evaluator: Evaluator, task: TaskSpec, corpus_sha: str, windows: torch.Tensor):
    """The reference's log-probs of ``windows``: an on-disk cache built once per evaluator and
    key, or the reference model itself (scored in lockstep) without a workdir."""
    ref = evaluator.reference
    assert ref is not None
    if evaluator.workdir is None:
        return ref.model
    key = sha256_json(
        [ref.info.fingerprint, corpus_sha, task.windows, task.ctx, windows.shape[0], ref.info.add_bos]
    )[:16]
    caches = evaluator.cache(_CACHE)
    if key not in caches:
        path = Path(evaluator.workdir) / f"reference-{key}.f16"
        caches[key] = ReferenceCache.build(ref.model, windows, path, key)
    return caches[key]
