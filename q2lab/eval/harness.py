"""lm-evaluation-harness interoperability: any q2lab model as an lm-eval model, and local
lm-eval task configs over the staged data (no hub access).

Why: users trust numbers that the standard harness reproduces.  :func:`as_lm_eval` wraps a
:class:`~q2lab.models.loader.LoadedModel` — float or quantized, since a quantized model is
the same transformers module with :class:`~q2lab.quant.linear.QuantLinear` layers — in
lm-eval's own ``HFLM``, so lm-eval's request building, batching and metrics run unchanged on
it.  :func:`write_task_configs` turns any q2lab multiple-choice task (HellaSwag, ARC, PIQA,
WinoGrande, CommonsenseQA, the Polish classification sets, constructed ``continuation``
tasks, generic ``.jsonl``) into a JSON-lines file plus an lm-eval YAML config that reads it
with the ``json`` dataset builder, so ``lm_eval --include_path DIR --tasks q2lab_hellaswag``
evaluates exactly the items q2lab evaluates.  :func:`run_harness_mc` runs them in process
and returns per-item log-likelihoods for the agreement check against
:func:`q2lab.eval.multiple_choice.score_mc`.

lm-eval is optional (``pip install 'q2lab[eval]'``); everything here raises a one-line
:class:`~q2lab.errors.ConfigError` without it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q2lab.data.tasks.mc import MCTask
from q2lab.errors import ConfigError
from q2lab.models.loader import LoadedModel
from q2lab.utils.io import atomic_path

TASK_PREFIX = "q2lab_"
INSTALL_HINT = "lm-eval is not installed: pip install 'q2lab[eval]' (lm-eval 0.4.x)"


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not lm_eval_available():
        raise ConfigError(INSTALL_HINT)


@contextmanager
def _offline() -> Any:
    """No hub access while lm-eval builds datasets and models (restores the environment)."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def as_lm_eval(loaded: LoadedModel, batch_size: int = 8, max_length: int | None = None) -> Any:
    """lm-eval's ``HFLM`` around ``loaded``'s module and tokenizer, BOS as q2lab records it.

    lm-eval adds BOS by asking the tokenizer for its special tokens.  When q2lab's BOS setting
    comes from elsewhere (a GGUF's ``add_bos_token`` flag) and the tokenizer would not add it
    itself, a thin subclass puts BOS in front of every encoding that lm-eval would have given
    special tokens, so both scorers see the same tokens.
    """
    _require()
    from lm_eval.models.huggingface import HFLM

    from q2lab.eval.multiple_choice import max_context
    from q2lab.models.loader import tokenizer_adds_bos

    cls = HFLM
    if loaded.info.add_bos and not tokenizer_adds_bos(loaded.tokenizer):
        cls = _with_bos(HFLM, int(loaded.info.bos_token_id))  # type: ignore[arg-type]
    return cls(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=batch_size,
        max_length=max_length or max_context(loaded),
        add_bos_token=loaded.info.add_bos,
    )


def _with_bos(base: type, bos_id: int) -> type:
    class _BosLM(base):  # type: ignore[misc, valid-type]
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = super().tok_encode(string, add_special_tokens=False, **kwargs)
            if add_special_tokens is not False and (not ids or ids[0] != bos_id):
                ids = [bos_id, *ids]
            return ids[-left_truncate_len:] if left_truncate_len else ids

    return _BosLM


# --------------------------------------------------------------------------- task configs
def _docs(task: MCTask) -> tuple[list[dict[str, Any]], bool]:
    partial = {item.is_partial for item in task.items}
    if len(partial) > 1:
        raise ConfigError(
            f"task {task.name} mixes partial-scoring and ordinary items; lm-eval needs one kind"
        )
    if partial.pop():
        docs = [
            {"id": item.id, "contexts": item.contexts, "continuation": item.choices[0], "label": item.label}
            for item in task.items
        ]
        return docs, True
    docs = [
        {"id": item.id, "context": item.context, "choices": item.choices, "label": item.label}
        for item in task.items
    ]
    return docs, False


def _yaml(name: str, data_file: Path, partial: bool, cache_dir: Path) -> str:
    """An lm-eval multiple-choice config.  Field names (not Jinja templates) are used, so
    lm-eval reads the text verbatim; an integer ``doc_to_text`` marks partial scoring (the
    WinoGrande convention: choices are contexts, the continuation is shared)."""
    text, choice, target = (
        ("label", "contexts", "continuation") if partial else ("context", "choices", "label")
    )
    cfg = {
        "task": TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_choice": choice,
        "doc_to_target": target,
        "target_delimiter": " ",
        "metric_list": [  # lm-eval's acc_norm would divide by the contexts' lengths for partial items
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in (("acc",) if partial else ("acc", "acc_norm"))
        ],
        "metadata": {"version": 1.0, "source": "q2lab"},
    }
    return json.dumps(cfg, indent=2, ensure_ascii=False)  # JSON is valid YAML


def safe_task_name(name: str) -> str:
    stem = Path(name).stem if os.sep in name or name.endswith(".jsonl") else name
    return "".join(c if c.isalnum() or c == "_" else "_" for c in stem.lower())


def write_task_configs(tasks: Sequence[MCTask], out_dir: str | Path) -> dict[str, str]:
    """One ``<name>.jsonl`` + ``<name>.yaml`` per task in ``out_dir``; returns q2lab name →
    lm-eval task name.  Point lm-eval at the folder with ``--include_path``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for task in tasks:
        name = safe_task_name(task.name)
        docs, partial = _docs(task)
        data = out / f"{name}.jsonl"
        with atomic_path(data) as tmp:
            tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        with atomic_path(out / f"{name}.yaml") as tmp:
            tmp.write_text(_yaml(name, data, partial, out / ".hf_cache"), encoding="utf-8")
        names[task.name] = TASK_PREFIX + name
    return names


# --------------------------------------------------------------------------- running
@dataclass
class HarnessMC:
    """lm-eval's per-item output for one task, in q2lab's item order (``acc_norm`` is ``acc``
    for partial-scoring tasks, where lm-eval reports only ``acc``)."""

    task: str
    loglik: list[np.ndarray]
    acc: np.ndarray
    acc_norm: np.ndarray


def run_harness_mc(
    loaded: LoadedModel, tasks: Sequence[MCTask], batch_size: int = 8, workdir: str | Path | None = None
) -> dict[str, HarnessMC]:
    """Evaluate ``tasks`` with lm-eval itself (``simple_evaluate``, zero-shot, no hub)."""
    _require()
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="q2lab-lmeval-") as tmp, _offline():
        names = write_task_configs(tasks, workdir or tmp)
        manager = TaskManager(include_path=str(workdir or tmp), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=as_lm_eval(loaded, batch_size=batch_size),
            tasks=list(names.values()),
            task_manager=manager,
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
        )
    assert out is not None
    return {task.name: _parse_samples(task, out["samples"][names[task.name]]) for task in tasks}


def _parse_samples(task: MCTask, samples: list[dict[str, Any]]) -> HarnessMC:
    by_doc = sorted(samples, key=lambda s: s["doc_id"])
    if len(by_doc) != len(task.items):
        raise ConfigError(f"lm-eval returned {len(by_doc)} items for {task.name}, expected {len(task.items)}")
    loglik = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in by_doc]
    acc = np.array([s["acc"] for s in by_doc], dtype=bool)
    acc_norm = np.array([s.get("acc_norm", s["acc"]) for s in by_doc], dtype=bool)
    return HarnessMC(task.name, loglik, acc, acc_norm)
