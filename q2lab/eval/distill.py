"""Self-generated distillation data: the float model answers seed prompts (UPQ, issue 17).

The seed prompts (:mod:`q2lab.data.tasks.distill_prompts`) are rendered as generation renders
requests — through the model's chat template when its tokenizer has one, else as the stated
``User: … / Assistant:`` frame (a base model is distilled on that frame, and the set's ``info``
says so) — and answered with the same batched engine the generation checks use (sampled at
``qat.temperature`` from per-prompt seeded streams, or greedy).  Each sequence is the prompt's
tokens followed by the answer (and EOS when the teacher stopped); training starts at the last
prompt token, so the student learns the answer, not the prompt.

The set is written once to the q2lab cache under a key of (model fingerprint, prompt draw,
generation settings) and reused by every cell that asks for it; its sha256 goes into records.
This lives in ``eval`` because the generation engine does; ``finetune`` receives the set
through ``finetuner(..., teacher_data=...)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch

from q2lab.data.tasks.distill_prompts import distill_prompts
from q2lab.eval.generation import encode_prompt, eos_ids, generate, render_conversation
from q2lab.finetune.qat import DistillSet
from q2lab.quant.finetune_option import QATConfig, qat_of
from q2lab.utils.io import cache_dir


def teacher_data(loaded, qat: QATConfig, batch_size: int = 16) -> Callable[[], DistillSet]:
    """A builder of ``loaded``'s answers to ``qat.sequences`` seed prompts (cached on disk); call
    it while the model is still float."""

    def build() -> DistillSet:
        prompts = distill_prompts(qat.sequences, qat.seed, qat.lang)
        texts, rendering = [], ""
        for p in prompts.prompts:
            text, rendering = render_conversation(loaded, [(m.role, m.content) for m in p.messages])
            texts.append(text)
        settings = {
            "kind": "self",
            "prompts_sha256": prompts.sha256,
            "rendering": rendering,
            "max_new_tokens": qat.max_new_tokens,
            "temperature": qat.temperature,
            "seed": qat.seed,
            "lang": qat.lang,
        }
        key = hashlib.sha256(
            json.dumps([loaded.info.fingerprint, settings], sort_keys=True).encode()
        ).hexdigest()
        path = cache_dir() / "distill" / f"{key[:24]}.pt"
        if path.exists():
            return DistillSet.load(path)
        samples = generate(
            loaded,
            texts,
            max_new_tokens=qat.max_new_tokens,
            seed=qat.seed,
            greedy=qat.temperature is None,
            temperature=qat.temperature or 1.0,
            batch_size=batch_size,
        )
        stop = eos_ids(loaded)
        seqs, starts = [], []
        for text, s in zip(texts, samples):
            prompt = encode_prompt(loaded, text)
            answer = list(s.token_ids) + ([stop[0]] if s.hit_eos and stop else [])
            if not answer:
                continue  # nothing to learn from an empty answer
            seqs.append(torch.tensor(prompt + answer, dtype=torch.long))
            starts.append(len(prompt) - 1)
        data = DistillSet(
            tuple(seqs),
            tuple(starts),
            {**settings, "answered": len(seqs), "hit_eos": sum(s.hit_eos for s in samples)},
        )
        data.save(path)
        return data

    return build


def distill_data(loaded, cfg) -> Callable[[], DistillSet] | None:
    """:func:`teacher_data` for a method config whose ``qat:`` section asks for self-generated
    data; None otherwise (what ``finetuner(..., teacher_data=)`` takes)."""
    qat = qat_of(cfg)
    return teacher_data(loaded, qat) if qat is not None and qat.data == "self" else None
