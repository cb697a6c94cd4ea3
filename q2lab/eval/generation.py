"""Generation-collapse check: does a quantized model still write, or does it loop and babble?

Some 2-bit models keep their perplexity and multiple-choice scores yet fall apart when they
generate: they loop, repeat one phrase, emit word salad or stop at once.  Likelihood metrics
cannot see this, because they only score text the model is handed; the model has to write.
This module greedily generates short continuations of a fixed prompt set, measures each
continuation with cheap, pure functions of its tokens and text, and calls a sample collapsed
when any metric is clearly worse than what the float reference does on the same prompts.

Pipeline::

    prompts = load_prompts("default")
    ref = generate(reference, prompts)                 # float model, once per study
    thresholds = CollapseThresholds.from_reference(ref, ref_nll=reference_nll(reference, ref))
    cand = generate(candidate, prompts)
    records = collapse_records("gen:collapse", cand, thresholds, prompt_set=prompts,
                               ref_nll=reference_nll(reference, cand))   # optional, see below

The repetition metrics are pure functions of one continuation.  They cannot see varied word
salad (a model whose weights are moderately noised writes "South where but mustc anymore…"),
so the optional :func:`reference_nll` scores each continuation with the float model: junk
costs it 8–14 nats per token, prose about 3.5.

Why calibrate against the reference: small models repeat themselves somewhat under greedy
decoding even in float, so fixed thresholds would either flag the float model or be too lax
for larger ones.  Thresholds are the reference's worst value plus a margin, clipped to
absolute bounds (:data:`THRESHOLD_BOUNDS`): the lower bound keeps a very clean reference from
making the detector trip on ordinary variation, the upper bound keeps a reference that itself
loops from making the detector blind.  A reference sample that breaks an upper bound is
collapsed itself; :meth:`CollapseThresholds.from_reference` warns about it, because that
prompt cannot tell the candidate's collapse from the reference's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from q2lab.data.language import (  # noqa: F401  (re-exported: the drift check's vocabulary)
    MARK_LETTERS,
    MIN_LANGUAGE_HITS,
    STOPWORDS,
    detect_language,
    language_counts,
)
from q2lab.errors import ConfigError, DataError, ShapeError
from q2lab.eval.records import Record
from q2lab.eval.stats import UNITS_KEY, UnitScores, ids_sha256, mean_ci
from q2lab.quant.kv import KVConfig, cache_nbytes, kivi_cache
from q2lab.utils.kvcache import cache_kwargs, output_cache, reserve
from q2lab.utils.progress import progress

if TYPE_CHECKING:
    from q2lab.data.tasks.chat_suite import SuitePrompt

# --------------------------------------------------------------------------- prompts
#: Short English prompts for plain text continuation (no chat template): two dialogues, two
#: summaries, and four pieces of long-form writing (a letter, an explanation, two stories).
#: Each ends mid-thought so that any model, base or instruct, has an obvious way to go on.
#: They were checked on SmolLM2-135M-Instruct: in float, greedy, 64 tokens, it neither loops
#: nor stops early on any of them.  Prompts on which the float model itself loops (it does on
#: some story openings) were left out on purpose: they cannot tell a quantized model's
#: collapse from the float model's own greedy degeneration.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Alice: Did you finish the report for tomorrow's meeting?\nBob:",
    "Interviewer: What got you interested in astronomy?\nScientist:",
    "Article: The city council voted on Tuesday to build a new public library downtown. The project will "
    "cost twelve million dollars and is expected to open in two years. Supporters say it will serve "
    "thousands of families.\n\nSummary:",
    "Article: A new study found that people who walk for thirty minutes a day sleep better and report "
    "less stress. Researchers followed two thousand adults for a year.\n\nIn short,",
    "Write a letter to a friend describing your summer vacation.\n\nDear Sam,",
    "Photosynthesis is the process by which plants",
    "The train was already moving when Clara jumped aboard, clutching a small wooden box.",
    "My grandmother's kitchen always smelled of bread and cinnamon. Every Sunday,",
)


#: Polish continuation prompts, the same kinds as :data:`DEFAULT_PROMPTS` (dialogue, summary,
#: letter, explanation, stories), for plain continuation.  Small English-centred models may
#: loop or drift into English on them even in float; the calibration then warns that those
#: prompts cannot discriminate (SmolLM2-135M does: see docs/DESIGN.md).
PL_PROMPTS: tuple[str, ...] = (
    "Anna: Czy skończyłeś już raport na jutrzejsze spotkanie?\nPiotr:",
    "Dziennikarz: Co sprawiło, że zainteresowała się pani astronomią?\nNaukowczyni:",
    "Artykuł: Rada miasta zagłosowała we wtorek za budową nowej biblioteki publicznej w centrum. "
    "Inwestycja będzie kosztować dwanaście milionów złotych i ma zostać otwarta za dwa lata."
    "\n\nPodsumowanie:",
    "Napisz list do przyjaciela o swoich wakacjach.\n\nDrogi Tomku,",
    "Fotosynteza to proces, w którym rośliny",
    "Pociąg już ruszał, kiedy Klara wskoczyła do wagonu, ściskając małe drewniane pudełko.",
    "W kuchni mojej babci zawsze pachniało chlebem i cynamonem. W każdą niedzielę",
    "Wisła jest najdłuższą rzeką w Polsce. Płynie",
)

#: Instructions for chat models (use with ``chat: true``): dialogue, summarization and
#: long-form writing, each in English and in Polish.
CHAT_PROMPTS: tuple[str, ...] = (
    "Write a short dialogue between a customer and a baker.",
    "Napisz krótki dialog między klientem a piekarzem.",
    "Summarize in two sentences: The city council voted on Tuesday to build a new public library "
    "downtown. The project will cost twelve million dollars and is expected to open in two years.",
    "Streść w dwóch zdaniach: Rada miasta zagłosowała we wtorek za budową nowej biblioteki publicznej "
    "w centrum. Inwestycja będzie kosztować dwanaście milionów złotych i ma zostać otwarta za dwa lata.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Napisz krótkie opowiadanie o latarniku, który znajduje list w butelce.",
    "Explain to a child how rain forms.",
    "Wyjaśnij dziecku, jak powstaje deszcz.",
)

#: Built-in prompt sets by name (``gen:NAME``).
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_PROMPTS,
    "pl": PL_PROMPTS,
    "en_pl": DEFAULT_PROMPTS + PL_PROMPTS,
    "chat": CHAT_PROMPTS,
}


#: Prompt sets built from the staged data by :mod:`q2lab.data.tasks.chat_suite` (``gen:NAME``):
#: the whole suite, or its English or Polish half.
SUITES: dict[str, str | None] = {"chat_suite": None, "chat_suite_en": "en", "chat_suite_pl": "pl"}

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class PromptSet:
    """Prompts with the name and content hash that go into result records.

    A suite (:data:`SUITES`) also carries each prompt's conversation (``turns``: earlier turns
    make it multi-turn; ``prompts`` holds the last user turn until rendered), its own
    ``max_new_tokens`` and its ``meta`` (id, language, use, source)."""

    name: str  # "default" or the path given
    prompts: tuple[str, ...]
    sha256: str  # of the prompts joined by "\n" (so a file and the same prompts inline agree)
    suite: tuple[SuitePrompt, ...] | None = None  # a suite's prompts, in the order of ``prompts``
    rendering: str = "plain"  # "plain", "chat template" or "user/assistant frame"

    @classmethod
    def from_prompts(cls, name: str, prompts: Sequence[str]) -> PromptSet:
        return cls(name, tuple(prompts), prompts_sha256(prompts))

    @classmethod
    def from_suite(cls, name: str, suite: Sequence[SuitePrompt]) -> PromptSet:
        """A suite's prompts (each its last user turn, until rendered), hashed as the suite hashes
        itself (:func:`~q2lab.data.tasks.chat_suite.suite_sha256`)."""
        from q2lab.data.tasks.chat_suite import suite_sha256

        return cls(name, tuple(p.text for p in suite), suite_sha256(suite), tuple(suite))

    @property
    def turns(self) -> tuple[tuple[Turn, ...], ...] | None:
        return (
            None
            if self.suite is None
            else tuple(tuple((m.role, m.content) for m in p.messages) for p in self.suite)
        )

    @property
    def lengths(self) -> tuple[int, ...] | None:
        return None if self.suite is None else tuple(p.max_new_tokens for p in self.suite)

    @property
    def meta(self) -> tuple[dict[str, str], ...] | None:
        if self.suite is None:
            return None
        return tuple({"id": p.id, "lang": p.lang, "use": p.use, "source": p.source} for p in self.suite)

    def describe(self) -> str:
        return f"{self.name} ({len(self.prompts)} prompts, sha256 {self.sha256[:12]})"

    def head(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts (all when ``n`` is None); a cut set hashes its own prompts."""
        if n is None or n >= len(self.prompts):
            return self
        return self._take(range(n))

    def sample(self, n: int | None, seed: int = 0) -> PromptSet:
        """A seeded random ``n`` of the prompts, in their order (all when ``n`` is None or not
        smaller): a suite is ordered by source, so a head cut is one use in one language while a
        sample spreads over all of them — what a large model's cells can afford."""
        if n is None or n >= len(self.prompts):
            return self
        picks = np.random.default_rng(seed).choice(len(self.prompts), size=n, replace=False)
        return self._take(sorted(int(i) for i in picks))

    def _take(self, indices: Sequence[int]) -> PromptSet:
        prompts = tuple(self.prompts[i] for i in indices)
        if self.suite is None:
            return PromptSet.from_prompts(self.name, prompts)
        suite = [self.suite[i] for i in indices]
        return dataclasses.replace(PromptSet.from_suite(self.name, suite), prompts=prompts)


def load_suite(name: str, seed: int = 0) -> PromptSet:
    """``chat_suite`` (or its ``_en`` / ``_pl`` half) built from ``$Q2LAB_DATA``; its sha256 is
    the suite's own (every prompt's turns, length and metadata)."""
    from q2lab.data.tasks.chat_suite import build_chat_suite

    return PromptSet.from_suite(name, build_chat_suite(seed).subset(SUITES[name]).prompts)


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def load_prompts(name_or_path: str = "default") -> PromptSet:
    """A built-in set (:data:`PROMPT_SETS`) or a local file: ``.txt`` (one prompt per line;
    ``\\n`` escapes a newline inside a prompt) or ``.jsonl`` (one ``{"prompt": ...}`` object
    per line).  Blank lines are skipped; a file without any prompt is an error rather than an
    empty, silently passing check.
    """
    if name_or_path in PROMPT_SETS:
        return PromptSet.from_prompts(name_or_path, PROMPT_SETS[name_or_path])
    if name_or_path in SUITES:
        return load_suite(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise DataError(
            f"prompt set {name_or_path!r} is neither one of {', '.join([*PROMPT_SETS, *SUITES])} "
            "nor an existing .txt/.jsonl file"
        )
    suffix = path.suffix.lower()
    if suffix not in {".txt", ".jsonl"}:
        raise DataError(
            f"prompt file {path} must be .txt (one prompt per line) "
            'or .jsonl (one {"prompt": ...} object per line)'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not UTF-8 text ({e})") from e
    prompts = _jsonl_prompts(path, text) if suffix == ".jsonl" else _txt_prompts(text)
    if not prompts:
        raise DataError(f"prompt file {path} contains no prompts")
    return PromptSet.from_prompts(str(path), prompts)


def _txt_prompts(text: str) -> list[str]:
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def _jsonl_prompts(path: Path, text: str) -> list[str]:
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{i}: expected a JSON object with a 'prompt' field ({e})") from e
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{i}: 'prompt' must be a non-empty string")
        prompts.append(prompt)
    return prompts


# --------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenSample:
    """One continuation.  ``token_ids`` are the new tokens before EOS (EOS itself excluded),
    so ``n_new == len(token_ids)``; ``hit_eos`` tells a model that stopped from one cut off at
    ``max_new_tokens``."""

    prompt: str
    text: str  # decoded continuation (special tokens kept visible, except EOS)
    token_ids: tuple[int, ...]
    hit_eos: bool
    n_new: int
    max_new_tokens: int


LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eos_ids(loaded) -> list[int]:
    """Token ids that end a continuation: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    gen_cfg = getattr(loaded.model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in ([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos))
    return sorted(ids)


def encode_prompt(loaded, prompt: str) -> list[int]:
    """Prompt token ids, BOS first when the model's tokenizer adds it (as in training)."""
    ids = list(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = loaded.info.bos_token_id
    if loaded.info.add_bos and (not ids or ids[0] != bos):  # a chat template may already start with BOS
        ids.insert(0, int(bos))
    if not ids:
        raise DataError("cannot generate from an empty prompt for a model that adds no BOS token")
    return ids


def chat_prompt(loaded, prompt: str, chat: bool | None = None) -> str:
    """The text the model continues: the chat template's rendering of one user turn when the
    tokenizer has a template (``chat=None``: automatic) or ``chat=True``, else the bare prompt."""
    if chat is None:
        chat = bool(getattr(loaded.tokenizer, "chat_template", None))
    return render_conversation(loaded, [("user", prompt)], True)[0] if chat else prompt


def render_conversation(loaded, turns: Sequence[Turn], chat: bool | None = None) -> tuple[str, str]:
    """``(text, rendering)``: the conversation through the model's chat template (``chat=None``:
    when the tokenizer has one; ``chat=True`` requires it), else the stated plain frame for base
    models — each turn as ``User: …`` / ``Assistant: …`` separated by blank lines, ending with
    ``Assistant:`` for the model to continue."""
    template = getattr(loaded.tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat:
        if not template:
            raise ConfigError(f"{loaded.info.name} has no chat template; set chat: false for plain text")
        messages = [{"role": r, "content": c} for r, c in turns]
        text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, "chat template"
    frame = "\n\n".join(f"{'User' if r == 'user' else 'Assistant'}: {c}" for r, c in turns)
    return f"{frame}\n\nAssistant:", "user/assistant frame"


@torch.no_grad()
def generate(
    loaded,
    prompts: Sequence[str] | PromptSet,
    max_new_tokens: int | Sequence[int] = 64,
    seed: int = 0,
    greedy: bool = True,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    logits_processor: LogitsProcessor | None = None,
    done: Mapping[int, GenSample] | None = None,
    on_batch: Callable[[dict[int, GenSample]], None] | None = None,
    kv: KVConfig | None = None,
    kv_bytes: list[int] | None = None,
) -> list[GenSample]:
    """Continue each prompt by up to ``max_new_tokens`` tokens, stopping at EOS.

    Greedy by default: the check must be deterministic, and greedy is what exposes loops.
    With ``greedy=False`` tokens are sampled at ``temperature`` from a per-prompt generator
    seeded by ``(seed, prompt index)``, so samples do not depend on ``batch_size``.
    Prompts are batched with left padding and a KV cache.  ``logits_processor(ids, logits)``
    (the Hugging Face signature) may rewrite the last-position logits before each choice —
    tests use it to force a loop.  ``done`` holds samples already generated (by prompt index,
    from a resume file): only the other prompts are decoded, each batch's new samples go to
    ``on_batch`` as soon as it finishes.  ``kv`` decodes through a quantized KV cache
    (:func:`q2lab.quant.kv.kivi_cache`, prompt included); with it a row's left padding shares
    the first key group of that row, so batched and unbatched samples may differ slightly;
    ``kv_bytes`` gets what q2lab's cache holds at the end of each batch.
    """
    texts = list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)
    lengths = [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(lengths) != len(texts):
        raise ShapeError(f"{len(lengths)} max_new_tokens values for {len(texts)} prompts")
    if any(n < 1 for n in lengths):
        raise ConfigError(f"max_new_tokens must be ≥ 1, got {min(lengths)}")
    if not greedy and temperature <= 0:
        raise ConfigError(f"sampling temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    encoded = [encode_prompt(loaded, p) for p in texts]
    _check_context(loaded, encoded, lengths)
    stop = torch.tensor(eos_ids(loaded), dtype=torch.long)
    # prompts of one length decode together; a prompt keeps its index (its sampling stream)
    samples: dict[int, GenSample] = dict(done or {})
    batches = [
        idx[s : s + batch_size]
        for n in sorted(set(lengths))
        for idx in [[i for i, m in enumerate(lengths) if m == n and i not in samples]]
        for s in range(0, len(idx), batch_size)
    ]
    for batch in progress(batches, "generate", total=len(batches), unit="batch"):
        n = lengths[batch[0]]
        gens = None if greedy else [_prompt_generator(seed, i) for i in batch]
        rows = _generate_batch(
            loaded.model,
            [encoded[i] for i in batch],
            n,
            stop,
            gens,
            temperature,
            logits_processor,
            kv,
            kv_bytes,
        )
        fresh = {
            i: GenSample(
                texts[i],
                loaded.tokenizer.decode(ids, skip_special_tokens=False),
                tuple(ids),
                hit,
                len(ids),
                n,
            )
            for i, (ids, hit) in zip(batch, rows)
        }
        samples.update(fresh)
        if on_batch is not None:
            on_batch(fresh)
    return [samples[i] for i in range(len(texts))]


def _check_context(loaded, encoded: list[list[int]], lengths: list[int]) -> None:
    """A prompt plus its new tokens must fit the model's context: past it positions are
    extrapolated (or index out of range deep inside the model), so say which prompt is too long."""
    from q2lab.eval.multiple_choice import max_context

    limit = max_context(loaded)
    for i, (e, n) in enumerate(zip(encoded, lengths)):
        if len(e) + n > limit:
            raise DataError(
                f"prompt {i} is {len(e)} tokens; with max_new_tokens {n} it exceeds "
                f"{loaded.info.name}'s context of {limit} tokens"
            )


def _prompt_generator(seed: int, index: int) -> torch.Generator:
    """One sampling stream per prompt, so a prompt's sample does not depend on its batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _left_pad(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e) :] = 1
    return ids, mask


def _generate_batch(
    model: torch.nn.Module,
    encoded: list[list[int]],
    max_new_tokens: int,
    stop: torch.Tensor,
    gens: list[torch.Generator] | None,
    temperature: float,
    logits_processor: LogitsProcessor | None,
    kv: KVConfig | None = None,
    kv_bytes: list[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """Decode one left-padded batch; returns (new ids before EOS, hit EOS) per row.

    A row that reaches EOS leaves the batch (its KV-cache rows are dropped), so a batch costs what
    its live rows cost: short answers do not wait for the longest one.  With a
    ``logits_processor`` (which addresses rows by position) finished rows stay, emitting padding."""
    device = next(model.parameters()).device
    pad_id = int(stop[0]) if stop.numel() else 0
    ids, mask = _left_pad(encoded, pad_id)
    ids, mask, stop = ids.to(device), mask.to(device), stop.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    quantized = {} if kv is None else cache_kwargs(model, kivi_cache(model, kv))
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **quantized
    )
    cache, seq = reserve(output_cache(out), max_new_tokens), ids
    live = torch.arange(len(encoded))  # batch row → prompt index
    done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
    new = torch.full((len(encoded), max_new_tokens), pad_id, dtype=torch.long)
    # per-token bar: a batch of long answers takes minutes, and the ETA should say so
    for step in progress(range(max_new_tokens), f"decode {len(encoded)} rows", max_new_tokens, unit="tok"):
        logits = out.logits[:, -1].float()
        if logits_processor is not None:
            logits = logits_processor(seq, logits)
        nxt = torch.where(done, pad_id, _choose(logits, gens, temperature))
        new[live, step] = nxt.cpu()
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if logits_processor is None and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            seq, mask, pos, nxt, done, live = (
                seq[keep],
                mask[keep],
                pos[keep],
                nxt[keep],
                done[keep],
                live[keep.cpu()],
            )
            gens = None if gens is None else [gens[int(i)] for i in keep]
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        cache = output_cache(out)
    if kv is not None and kv.native and kv_bytes is not None:
        kv_bytes.append(cache_nbytes(cache))
    return [_cut_at_eos(row, stop) for row in new]


def _choose(logits: torch.Tensor, gens: list[torch.Generator] | None, temperature: float) -> torch.Tensor:
    if gens is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)]
    return torch.cat(picks).to(logits.device)


def _cut_at_eos(row: torch.Tensor, stop: torch.Tensor) -> tuple[list[int], bool]:
    hits = torch.isin(row, stop.cpu()).nonzero()
    if hits.numel():
        return row[: int(hits[0])].tolist(), True
    return row.tolist(), False


# --------------------------------------------------------------------------- metrics
def _ids(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(token_ids, dtype=np.int64).reshape(-1)


def _ngram_counts(token_ids: Sequence[int] | np.ndarray, n: int) -> tuple[int, int]:
    """(number of n-grams, number of distinct n-grams) of a sequence."""
    if n < 1:
        raise ConfigError(f"n-gram order must be ≥ 1, got {n}")
    a = _ids(token_ids)
    total = a.size - n + 1
    if total <= 0:
        return 0, 0
    grams = np.lib.stride_tricks.sliding_window_view(a, n)
    return total, int(np.unique(grams, axis=0).shape[0])


def rep_n(token_ids: Sequence[int] | np.ndarray, n: int = 4) -> float:
    """Fraction of the sample's n-grams that repeat an n-gram seen earlier in the same sample.

    ``rep_n = (T − U) / T`` with ``T = len − n + 1`` n-grams of which ``U`` are distinct
    (Welleck et al. 2019, "seq-rep-n"; equal to ``1 − distinct_n``).  0 for text that never
    repeats a phrase, → 1 for a loop.  A sample shorter than ``n`` tokens has no n-grams and
    scores 0 (early stops are judged by :func:`early_eos`, not here).
    """
    total, distinct = _ngram_counts(token_ids, n)
    return (total - distinct) / total if total else 0.0


def distinct_n(token_ids: Sequence[int] | np.ndarray, n: int = 2) -> float:
    """Distinct n-grams over all n-grams, ``U / T`` (Li et al. 2016).

    Word salad that cycles through a few tokens has low distinct-2 even when it never forms
    an exact loop.  A sample shorter than ``n`` tokens scores 1 (nothing is repeated).
    """
    total, distinct = _ngram_counts(token_ids, n)
    return distinct / total if total else 1.0


def longest_loop(token_ids: Sequence[int] | np.ndarray) -> tuple[int, int]:
    """``(length, period)`` of the longest periodic span that repeats its period at least twice.

    A span ``x[i : i + L]`` is periodic with period ``p`` when ``x[j] == x[j + p]`` for all
    ``i ≤ j < i + L − p``; it counts as a loop when ``L ≥ 2p`` (a block immediately followed by
    itself, plus any partial repeat after it).  Row ``p`` of a ``(len/2, len)`` array holds the
    matches ``x[j] == x[j + p]``; its longest run ``r`` gives ``L = r + p``.  Ties go to the
    shortest period.  "a b c a b c a b c" gives ``(9, 3)``, "a b c a b c a b" ``(8, 3)``, and
    text that never repeats itself immediately ``(0, 0)``.  Greedy decoding that degenerates
    ends in such a span, so ``length`` is roughly the number of tokens lost to the loop.
    """
    a = _ids(token_ids)
    if a.size < 2:
        return 0, 0
    periods = np.arange(1, a.size // 2 + 1)
    later = np.arange(a.size)[None, :] + periods[:, None]  # (P, len): index j + p
    same = (later < a.size) & (a[None, :] == a[np.minimum(later, a.size - 1)])
    run = _run_lengths(same).max(axis=1)  # longest run of matches per period
    length = np.where(run >= periods, run + periods, 0)
    best = int(np.argmax(length))  # first maximum: the shortest period
    return (int(length[best]), int(periods[best])) if length[best] else (0, 0)


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True ending at each position of each row (0 where False)."""
    count = np.cumsum(mask, axis=1)
    return count - np.maximum.accumulate(np.where(mask, 0, count), axis=1)


def zlib_ratio(text: str) -> float:
    """``len(utf8(text)) / len(zlib.compress(utf8(text), 9))``: how compressible the text is.

    Repetitive text compresses well (ratio 3–10 for loops); ordinary prose of a few hundred
    bytes stays near 1.2–1.6 because zlib's fixed overhead dominates at that size.  It sees
    repetition at the character level, which catches loops whose tokenisation drifts.
    Empty text scores 0.
    """
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0


def ngram_entropy(token_ids: Sequence[int] | np.ndarray) -> float:
    """Unigram Shannon entropy of the tokens in bits, ``H = −Σ_t p_t log2 p_t``.

    ``p_t`` is token ``t``'s share of the sample.  A sample that cycles through a handful of
    tokens has a low entropy; at most ``log2(n)`` for ``n`` tokens.  Empty samples score 0.
    """
    a = _ids(token_ids)
    if a.size == 0:
        return 0.0
    _, counts = np.unique(a, return_counts=True)
    p = counts / a.size
    return float(-(p * np.log2(p)).sum())


def language_drift(prompt: str, text: str, target: str | None = None) -> float:
    """Share of the continuation's language evidence that is *not* the target language.

    ``target`` defaults to the prompt's language (:func:`detect_language`).  The evidence is the
    function-word hits of every known language plus the words in a non-Latin script; drift is
    ``1 − hits(target) / all evidence``: 0 for a continuation in the prompt's language, near 1
    for one that switched (a Polish prompt answered in English).  0 when the target is unknown
    or the continuation has fewer than :data:`MIN_LANGUAGE_HITS` pieces of evidence.
    """
    lang = target or detect_language(prompt)
    if lang is None:
        return 0.0
    counts = language_counts(text)
    total = sum(counts.values())
    return 1.0 - counts.get(lang, 0) / total if total >= MIN_LANGUAGE_HITS else 0.0


#: Word n-gram length of :func:`echo_share`: long enough that ordinary phrasing and a summary's
#: quoted names rarely match the prompt, short enough that a copied sentence does.
ECHO_NGRAM = 6
_TOKEN_WORD = re.compile(r"\w+", re.UNICODE)


def echo_share(prompt: str, text: str, n: int = ECHO_NGRAM) -> float:
    """Share of the continuation's word ``n``-grams that also occur in the prompt: near 1 for a
    model that echoes the question (or the passage it was asked to summarize), near 0 for an
    answer in its own words; 0 below ``n`` words."""
    words = [w.lower() for w in _TOKEN_WORD.findall(text)]
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    source = [w.lower() for w in _TOKEN_WORD.findall(prompt)]
    seen = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    return sum(g in seen for g in grams) / len(grams)


def is_empty(text: str) -> bool:
    """An answer with nothing but whitespace: the model stopped (or emitted only blanks) before
    saying anything — the failure of 2-bit chat models that put their end-of-turn token first."""
    return not text.strip()


def early_eos(n_new: int, hit_eos: bool, min_new_tokens: int) -> bool:
    """True when the model ended (EOS) before writing ``min_new_tokens`` tokens.

    Being cut off at ``max_new_tokens`` is never early, however short ``max_new_tokens`` is.
    """
    return bool(hit_eos) and n_new < min_new_tokens


@dataclass(frozen=True)
class GenMetrics:
    """All per-sample metrics of one continuation (see the functions of the same names)."""

    rep4: float
    distinct2: float
    longest_loop: int
    loop_period: int
    zlib_ratio: float
    entropy: float
    n_new: int
    hit_eos: bool
    ref_nll: float | None = None  # nats/token under the reference, if it was scored
    drift: float = 0.0  # language drift away from the prompt's language (see language_drift)
    echo: float = 0.0  # share of word n-grams copied from the prompt (see echo_share)
    empty: bool = False  # nothing but whitespace (see is_empty)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"entropy_ratio": self.entropy_ratio}

    @property
    def entropy_ratio(self) -> float:
        """Entropy as a fraction of its maximum ``log2(n_new)`` (every token different); 1 below 2 tokens.

        Dividing by the maximum makes samples of different lengths comparable: 64 tokens of
        prose sit near 0.85–0.9, a loop through a few tokens near 0.5, random tokens at 1.
        """
        return self.entropy / math.log2(self.n_new) if self.n_new >= 2 else 1.0


def sample_metrics(sample: GenSample, ref_nll: float | None = None, lang: str | None = None) -> GenMetrics:
    """Every metric of one continuation; ``ref_nll`` from :func:`reference_nll` if available,
    ``lang`` the language the answer should be in (a suite prompt's; default: detected from the
    prompt, which a chat template's English system prompt can sway)."""
    loop, period = longest_loop(sample.token_ids)
    return GenMetrics(
        rep4=rep_n(sample.token_ids, 4),
        distinct2=distinct_n(sample.token_ids, 2),
        longest_loop=loop,
        loop_period=period,
        zlib_ratio=zlib_ratio(sample.text),
        entropy=ngram_entropy(sample.token_ids),
        n_new=sample.n_new,
        hit_eos=sample.hit_eos,
        ref_nll=None if ref_nll is None or math.isnan(ref_nll) else float(ref_nll),
        drift=language_drift(sample.prompt, sample.text, lang),
        echo=echo_share(sample.prompt, sample.text),
        empty=is_empty(sample.text),
    )


@torch.no_grad()
def reference_nll(reference, samples: Sequence[GenSample], batch_size: int = 8) -> list[float]:
    """Mean negative log-likelihood (nats per token) of each continuation under ``reference``,
    conditioned on its prompt; NaN for an empty continuation.

    This is the one metric that sees fluent-looking word salad: a model that emits varied but
    meaningless tokens passes every repetition metric, yet its text costs the reference
    8–14 nats per token where prose costs about 3.5 and the reference's own greedy text about 1.
    The candidate must share the reference's tokenizer (a quantized copy does).
    """
    return continuation_scores(reference, None, samples, batch_size)[0]


@torch.no_grad()
def continuation_kld(reference, candidate, samples: Sequence[GenSample], batch_size: int = 8) -> list[float]:
    """Mean KL(reference ‖ candidate) per token along each continuation, both models reading
    the same prompt + continuation (teacher forcing); NaN for an empty continuation.

    Along the *reference's* own generations this is the log-likelihood view of generation
    quality (how far the candidate's next-token distributions move on text the float model
    writes); along the *candidate's* generations it measures the two models on the text
    free-running decoding produced.  The second is not simply larger for a broken model: once
    a candidate is inside a loop, the float model also expects the loop to go on, so they agree
    more there (SmolLM2-135M, GPTQ 2-bit g128, default prompts: tf_kld 4.3, fr_kld 1.5 nats,
    every sample collapsed).  Read them with ``agree_tokens`` and the collapse verdict.
    """
    return continuation_scores(reference, candidate, samples, batch_size)[1]


@torch.no_grad()
def continuation_scores(
    reference, candidate, samples: Sequence[GenSample], batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """``(reference NLL, KL(reference ‖ candidate))`` per continuation from one reference pass
    (the KLs are NaN without a ``candidate``): scoring the candidate's text and comparing the
    two models along it share the reference's forward, which costs as much as generating.
    Continuations are scored in chunks of similar length (less padding), results in order."""
    vocab = getattr(reference.model.config, "vocab_size", None)
    if vocab is not None and any(t >= vocab for smp in samples for t in smp.token_ids):
        raise ShapeError(
            f"continuation token ids exceed the reference vocabulary ({vocab}); "
            "candidate and reference must share a tokenizer"
        )
    from q2lab.eval.likelihood import kl_per_token

    nll = [math.nan] * len(samples)
    kld = [math.nan] * len(samples)
    # prompt + continuation ids, encoded once for both models (they share a tokenizer)
    full = [encode_prompt(reference, s.prompt) + list(s.token_ids) for s in samples]
    chunks = _length_chunks(full, batch_size)
    what = "score (reference)" if candidate is None else "score (reference + candidate)"
    for idx in progress(chunks, what, total=len(chunks), unit="batch"):
        chunk = [samples[i] for i in idx]
        k = max(smp.n_new for smp in chunk)
        if k == 0:
            continue
        seqs = [full[i] for i in idx]
        ref_lp, ids = _continuation_logprobs(reference, seqs, k)
        tok_nll = -ref_lp.gather(-1, ids[:, -k:, None]).squeeze(-1)
        kl = (
            kl_per_token(ref_lp, _continuation_logprobs(candidate, seqs, k)[0])
            if candidate is not None
            else None
        )
        for row, (i, smp) in enumerate(zip(idx, chunk)):
            if smp.n_new:
                nll[i] = float(tok_nll[row, k - smp.n_new :].mean())
                if kl is not None:
                    kld[i] = float(kl[row, k - smp.n_new :].mean())
    return nll, kld


def _length_chunks(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Sequence indices in chunks of ``batch_size``, ordered by length, so a chunk pads little
    (a suite mixes 20-token requests with 400-token passages)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _continuation_logprobs(loaded, seqs: Sequence[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs (B, k, V), ids)`` of the predictions of the last ``k`` tokens of each
    prompt + continuation id sequence.  Left-padded, so every continuation ends in the last
    column and the last ``k + 1`` logits cover the longest continuation's ``k`` predictions."""
    device = next(loaded.model.parameters()).device
    ids, mask = _left_pad(list(seqs), 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = loaded.model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=False,
        logits_to_keep=k + 1,
    ).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu(), ids


def agreeing_prefix(ref: GenSample, cand: GenSample) -> int:
    """How many leading tokens the candidate's continuation shares with the reference's: where
    free-running decoding first departs from the float model (greedy decoding only)."""
    a, b = _ids(ref.token_ids), _ids(cand.token_ids)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def divergence_records(
    task_label: str,
    ref_samples: Sequence[GenSample],
    cand_samples: Sequence[GenSample],
    tf_kld: Sequence[float],
    fr_kld: Sequence[float],
    greedy: bool = True,
) -> list[Record]:
    """``tf_kld`` (teacher-forced KLD along the reference's generations), ``fr_kld`` (along the
    candidate's free-running generations) and, for greedy decoding, ``agree_tokens`` (tokens
    before the candidate's first departure from the reference), each with a CI over prompts."""
    ids = ids_sha256([s.prompt for s in cand_samples])
    details = {
        "max_new_tokens": max(s.max_new_tokens for s in cand_samples),
        "decoding": "greedy" if greedy else "sampled",
    }
    out = []
    for name, values in (("tf_kld", tf_kld), ("fr_kld", fr_kld)):
        vals = [v for v in values if not math.isnan(v)]
        if vals:
            rec = _mean_record(task_label, name, vals, False, details)
            if len(vals) == len(values):
                rec.details[UNITS_KEY] = UnitScores(vals, ids_sha256=ids).to_json()
            out.append(rec)
    if greedy:
        agree = [float(agreeing_prefix(r, c)) for r, c in zip(ref_samples, cand_samples)]
        rec = _mean_record(task_label, "agree_tokens", agree, True, details)
        rec.details[UNITS_KEY] = UnitScores(agree, ids_sha256=ids).to_json()
        out.append(rec)
    return out


# --------------------------------------------------------------------------- verdict
#: Samples shorter than this are not judged on low entropy (a short reply has few repeats).
MIN_TOKENS_LOW_ENTROPY = 8
#: Samples shorter than this are not judged on high entropy: below ~32 tokens ordinary text
#: often has no repeated token at all, so "every token different" means nothing.
MIN_TOKENS_HIGH_ENTROPY = 32


@dataclass(frozen=True)
class _Bound:
    """How one threshold is calibrated: ``worst reference value ± margin``, clipped between
    ``sensitive`` (the strictest it may get) and ``blind`` (the laxest)."""

    kind: str  # "max": the metric must stay ≤ threshold; "min": ≥ threshold
    margin: float
    sensitive: float
    blind: float

    def calibrate(self, worst: float, scale: float) -> float:
        if self.kind == "max":
            return min(max(worst + scale * self.margin, self.sensitive), self.blind)
        return max(min(worst - scale * self.margin, self.sensitive), self.blind)


#: Calibration of every threshold (``margin`` is multiplied by ``from_reference(margin=...)``).
#: The bounds were set on 64-token greedy continuations of :data:`DEFAULT_PROMPTS`: SmolLM2-135M
#: in float stays far inside all of them, while its loops on story prompts, 2–4-bit RTN copies
#: and noised copies fall outside.  zlib and entropy depend on the continuation length, so for
#: other lengths calibrate from a reference rather than trusting the defaults.
THRESHOLD_BOUNDS: dict[str, _Bound] = {
    "max_loop": _Bound("max", 8, sensitive=10, blind=24),  # tokens
    "max_rep4": _Bound("max", 0.15, sensitive=0.15, blind=0.40),
    "min_distinct2": _Bound("min", 0.15, sensitive=0.75, blind=0.45),
    "max_zlib": _Bound("max", 0.5, sensitive=2.0, blind=3.0),
    "min_entropy_ratio": _Bound("min", 0.15, sensitive=0.70, blind=0.50),
    "max_entropy_ratio": _Bound("max", 0.06, sensitive=0.95, blind=0.99),
    "min_new_tokens": _Bound("min", 8, sensitive=8, blind=1),  # tokens before EOS
    "max_ref_nll": _Bound("max", 3.0, sensitive=5.0, blind=8.0),  # nats per token
    "max_drift": _Bound("max", 0.25, sensitive=0.4, blind=0.7),  # share of other-language evidence
    # share of word 6-grams from the prompt; MT-Bench's "rewrite this paragraph" requests make an
    # honest answer copy much of its prompt, so only a near-verbatim echo is blind-bound collapse
    "max_echo": _Bound("max", 0.2, sensitive=0.5, blind=0.9),
}

#: Share of the reference's least healthy samples left out when calibrating each threshold.
#: "Worst value + margin" lets one degenerate reference sample (small models loop in float on a
#: few of 200 prompts) set the threshold for all, up to the blind bound; leaving out the worst
#: 5 % keeps the threshold at what the reference does on nearly every prompt.  Below 20 prompts
#: nothing is left out (the worst value is used, as before).
IGNORE_WORST = 0.05

#: Prompts listed by name in the "reference itself collapses" warning; the rest are counted.
WARN_SHOWN = 5


@dataclass(frozen=True)
class CollapseThresholds:
    """Acceptable range of every metric; a sample outside any of them is collapsed.

    ``max_*`` fields are the largest acceptable value, ``min_*`` the smallest.  The defaults
    (no reference available) sit between the bounds of :data:`THRESHOLD_BOUNDS`, for about 64
    new tokens of English prose: a 16-token loop, a quarter of 4-grams repeated, or zlib
    compressing the text 2.5× is beyond what a healthy model writes in that space.
    """

    max_loop: int = 16
    max_rep4: float = 0.25
    min_distinct2: float = 0.60
    max_zlib: float = 2.5
    min_entropy_ratio: float = 0.60
    max_entropy_ratio: float = 0.97
    min_new_tokens: int = 4
    max_ref_nll: float = 6.0
    max_drift: float = 0.5
    max_echo: float = 0.6
    source: str = "defaults"
    max_new_tokens: int | None = None  # generation length the thresholds were calibrated for

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollapseThresholds:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown collapse threshold(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_reference(
        cls,
        ref_samples: Sequence[GenSample],
        margin: float = 1.0,
        *,
        ref_nll: Sequence[float] | None = None,
        ignore: float = IGNORE_WORST,
        langs: Sequence[str | None] | None = None,
    ) -> CollapseThresholds:
        """Thresholds from the float model's own generations on the same prompts (one length).

        Each threshold is the reference's value after leaving out its ``ignore`` share of least
        healthy samples (:data:`IGNORE_WORST`; the worst value below 20 samples) plus ``margin``
        times the metric's margin in :data:`THRESHOLD_BOUNDS`, clipped to its bounds (early EOS
        keeps the shortest answer: a short reply is an answer, not an outlier).  ``ref_nll`` is
        :func:`reference_nll` of the reference's own samples; without it ``max_ref_nll`` keeps
        its default; ``langs`` are the prompts' languages (drift).  Warns
        when the reference itself breaks the thresholds on more samples than ``ignore`` left
        out, since those prompts cannot discriminate.
        """
        if not ref_samples:
            raise ConfigError("cannot calibrate collapse thresholds from zero reference samples")
        if margin < 0:
            raise ConfigError(f"collapse margin must be ≥ 0, got {margin}")
        if not 0 <= ignore < 0.5:
            raise ConfigError(f"the ignored share of reference samples must be in [0, 0.5), got {ignore}")
        nll, lg = _per_sample(ref_samples, ref_nll, langs)
        metrics = _metrics(ref_samples, nll, lg)
        values = {k: v for k, v in _calibration_values(metrics, ignore).items() if v is not None}
        fields: dict[str, Any] = {k: THRESHOLD_BOUNDS[k].calibrate(v, margin) for k, v in values.items()}
        for k in ("max_loop", "min_new_tokens"):
            fields[k] = round(fields[k])
        lengths = {s.max_new_tokens for s in ref_samples}
        left_out = _left_out(len(metrics), ignore)
        out = cls(
            **fields,
            source=f"reference ({len(ref_samples)} samples, worst {left_out} left out, margin x{margin:g})",
            max_new_tokens=lengths.pop() if len(lengths) == 1 else None,
        )
        _warn_if_reference_collapses(metrics, out, allowed=left_out)
        return out


def _per_sample(
    samples: Sequence[GenSample],
    nll: Sequence[float | None] | None,
    langs: Sequence[str | None] | None,
    what: str = "reference samples",
) -> tuple[list[float | None], list[str | None]]:
    """The reference NLLs and prompt languages as one list each, aligned with ``samples`` (None
    where not given): the calibration helpers and the judge all take them optional and index
    them together."""
    n = len(samples)
    nll_list = list(nll) if nll is not None else [None] * n
    lang_list = list(langs) if langs is not None else [None] * n
    if len(nll_list) != n or len(lang_list) != n:
        raise ShapeError(
            f"{len(nll_list)} reference NLLs and {len(lang_list)} prompt languages for {n} {what}"
        )
    return nll_list, lang_list


def _metrics(
    samples: Sequence[GenSample], nll: Sequence[float | None], langs: Sequence[str | None]
) -> list[GenMetrics]:
    return [sample_metrics(s, v, g) for s, v, g in zip(samples, nll, langs, strict=True)]


def _left_out(n: int, ignore: float) -> int:
    """How many least-healthy reference samples calibration leaves out: none below 20."""
    return int(n * ignore) if n >= 20 else 0


def _healthy_end(values: Sequence[float], worst_is_high: bool, left_out: int) -> float:
    """The least healthy value once the ``left_out`` worst are dropped."""
    ranked = sorted(values, reverse=worst_is_high)
    return ranked[min(left_out, len(ranked) - 1)]


def _calibration_values(metrics: list[GenMetrics], ignore: float) -> dict[str, float | None]:
    """Per metric, the reference's least healthy value over the samples it applies to, once the
    worst ``ignore`` share of all samples is left out (each metric on its own)."""
    k = _left_out(len(metrics), ignore)
    low_h = [m.entropy_ratio for m in metrics if m.n_new >= MIN_TOKENS_LOW_ENTROPY]
    high_h = [m.entropy_ratio for m in metrics if m.n_new >= MIN_TOKENS_HIGH_ENTROPY]
    nll = [m.ref_nll for m in metrics if m.ref_nll is not None]
    stopped = [m.n_new for m in metrics if m.hit_eos]

    def high(vals: Sequence[float]) -> float | None:
        return _healthy_end(vals, True, k) if vals else None

    def low(vals: Sequence[float]) -> float | None:
        return _healthy_end(vals, False, k) if vals else None

    return {
        "max_loop": high([m.longest_loop for m in metrics]),
        "max_rep4": high([m.rep4 for m in metrics]),
        "min_distinct2": low([m.distinct2 for m in metrics]),
        "max_zlib": high([m.zlib_ratio for m in metrics]),
        "min_entropy_ratio": low(low_h),
        "max_entropy_ratio": high(high_h),
        # the reference's shortest answer is an answer, not a degenerate outlier: nothing left
        # out; a reference that never stops early counts as stopping at its full length
        "min_new_tokens": min(stopped) if stopped else min(m.n_new for m in metrics),
        "max_ref_nll": high([v for v in nll if v is not None]),
        "max_drift": high([m.drift for m in metrics]),
        "max_echo": high([m.echo for m in metrics]),
    }


def calibrate_thresholds(
    ref_samples: Sequence[GenSample],
    margin: float = 1.0,
    *,
    ref_nll: Sequence[float] | None = None,
    ignore: float = IGNORE_WORST,
    langs: Sequence[str | None] | None = None,
) -> dict[int, CollapseThresholds]:
    """One :class:`CollapseThresholds` per generation length (``max_new_tokens``): zlib ratio,
    entropy and loop length all grow with the length of the text, so a 256-token essay and a
    128-token reply are judged against the reference's samples of their own length."""
    nll, lg = _per_sample(ref_samples, ref_nll, langs)
    out = {}
    for n in sorted({s.max_new_tokens for s in ref_samples}):
        idx = [i for i, s in enumerate(ref_samples) if s.max_new_tokens == n]
        out[n] = CollapseThresholds.from_reference(
            [ref_samples[i] for i in idx],
            margin,
            ref_nll=None if ref_nll is None else [nll[i] for i in idx],
            ignore=ignore,
            langs=[lg[i] for i in idx],
        )
    return out


def heldout_flags(
    ref_samples: Sequence[GenSample],
    margin: float = 1.0,
    *,
    ref_nll: Sequence[float] | None = None,
    ignore: float = IGNORE_WORST,
    langs: Sequence[str | None] | None = None,
    folds: int = 2,
) -> list[tuple[bool, list[str]]]:
    """The detector's verdict on each of the reference's own samples, each judged by thresholds
    calibrated on the *other* folds (prompts dealt round-robin within each length).

    In-sample, "the reference's worst + margin" cannot flag the reference; held out, the share
    flagged estimates how often the detector calls a new healthy answer collapsed — an upper
    bound on its false-positive rate, since a float model's own greedy loops are real positives.
    """
    if folds < 2:
        raise ConfigError(f"held-out calibration needs ≥ 2 folds, got {folds}")
    nll, lg = _per_sample(ref_samples, ref_nll, langs)
    metrics = _metrics(ref_samples, nll, lg)
    fold = [0] * len(ref_samples)
    for n in {s.max_new_tokens for s in ref_samples}:
        for j, i in enumerate(i for i, s in enumerate(ref_samples) if s.max_new_tokens == n):
            fold[i] = j % folds
    out: list[tuple[bool, list[str]]] = [(False, [])] * len(ref_samples)
    for f in range(folds):
        train = [i for i in range(len(ref_samples)) if fold[i] != f]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the calibration folds' own collapses are expected
            by_len = calibrate_thresholds(
                [ref_samples[i] for i in train],
                margin,
                ref_nll=None if ref_nll is None else [nll[i] for i in train],
                ignore=ignore,
                langs=[lg[i] for i in train],
            )
        for i in (i for i in range(len(ref_samples)) if fold[i] == f):
            t = by_len.get(ref_samples[i].max_new_tokens)
            if t is not None:
                out[i] = is_collapsed(metrics[i], t)
    return out


def _warn_if_reference_collapses(
    metrics: list[GenMetrics], thresholds: CollapseThresholds, allowed: int = 0
) -> None:
    verdicts = [is_collapsed(m, thresholds) for m in metrics]
    bad = [(i, reasons) for i, (hit, reasons) in enumerate(verdicts) if hit]
    if len(bad) > allowed:
        warnings.warn(
            f"the reference itself collapses on {len(bad)} of {len(metrics)} prompts "
            f"({_summarize_collapses(bad)}); those prompts cannot show a candidate's collapse",
            stacklevel=3,
        )


def _summarize_collapses(bad: list[tuple[int, list[str]]], shown: int = WARN_SHOWN) -> str:
    """Prompts per reason family, then the first ``shown`` prompts with their reasons: a
    saturated reference (a base model looping on 190 of 225 requests) must give one readable
    line, not every prompt's reasons."""
    families = sorted(reason_counts(bad).items(), key=lambda kv: -kv[1])
    counts = ", ".join(f"{fam} {n}" for fam, n in families)
    listed = "; ".join(f"prompt {i}: {', '.join(r)}" for i, r in bad[:shown])
    more = f"; {len(bad) - shown} more" if len(bad) > shown else ""
    return f"{counts}; {listed}{more}"


def is_collapsed(metrics: GenMetrics, thresholds: CollapseThresholds) -> tuple[bool, list[str]]:
    """``(collapsed, reasons)``: collapsed when any criterion fires; each reason starts with
    its family — ``loop``, ``repetition``, ``gibberish``, ``language drift``, ``echo``, ``empty
    answer`` or ``early EOS`` — then the value and the threshold it broke."""
    m, t = metrics, thresholds
    reasons: list[str] = []
    if m.longest_loop > t.max_loop:
        reasons.append(f"loop: {m.longest_loop}-token span repeating every {m.loop_period} (> {t.max_loop})")
    if m.rep4 > t.max_rep4:
        reasons.append(f"repetition: {m.rep4:.0%} of 4-grams repeated (> {t.max_rep4:.0%})")
    if m.distinct2 < t.min_distinct2:
        reasons.append(f"repetition: distinct-2 {m.distinct2:.2f} (< {t.min_distinct2:.2f})")
    if m.zlib_ratio > t.max_zlib:
        reasons.append(f"repetition: zlib ratio {m.zlib_ratio:.2f} (> {t.max_zlib:.2f})")
    if m.n_new >= MIN_TOKENS_LOW_ENTROPY and m.entropy_ratio < t.min_entropy_ratio:
        reasons.append(
            f"gibberish: token entropy {m.entropy_ratio:.2f} of maximum, few distinct tokens "
            f"(< {t.min_entropy_ratio:.2f})"
        )
    if m.n_new >= MIN_TOKENS_HIGH_ENTROPY and m.entropy_ratio > t.max_entropy_ratio:
        reasons.append(
            f"gibberish: token entropy {m.entropy_ratio:.2f} of maximum, near-random "
            f"(> {t.max_entropy_ratio:.2f})"
        )
    if m.ref_nll is not None and m.ref_nll > t.max_ref_nll:
        reasons.append(f"gibberish: reference NLL {m.ref_nll:.1f} nats/token (> {t.max_ref_nll:.1f})")
    if m.drift > t.max_drift:
        reasons.append(
            f"language drift: {m.drift:.0%} of the language evidence is not the prompt's "
            f"(> {t.max_drift:.0%})"
        )
    if m.echo > t.max_echo:
        reasons.append(
            f"echo: {m.echo:.0%} of word {ECHO_NGRAM}-grams copied from the prompt (> {t.max_echo:.0%})"
        )
    if m.empty:
        reasons.append(f"empty answer: {m.n_new} tokens, nothing but whitespace")
    elif early_eos(m.n_new, m.hit_eos, t.min_new_tokens):
        reasons.append(f"early EOS: stopped after {m.n_new} tokens (< {t.min_new_tokens})")
    return bool(reasons), reasons


# --------------------------------------------------------------------------- records
_EXAMPLES = 3
_EXAMPLE_CHARS = 300
#: (record metric, GenMetrics attribute, higher_is_better)
_MEAN_METRICS = (
    ("rep4", "rep4", False),
    ("distinct2", "distinct2", True),
    ("zlib_ratio", "zlib_ratio", False),
    ("longest_loop", "longest_loop", False),
    ("drift", "drift", False),
    ("echo", "echo", False),
)


Thresholds = CollapseThresholds | Mapping[int, CollapseThresholds]


def thresholds_for(thresholds: Thresholds, sample: GenSample) -> CollapseThresholds:
    """The thresholds that judge ``sample``: the one set, or the set of its generation length.
    Thresholds calibrated for another length are refused: zlib, entropy and loops shift with it."""
    if isinstance(thresholds, CollapseThresholds):
        t = thresholds
        if t.max_new_tokens is not None and sample.max_new_tokens != t.max_new_tokens:
            t = None
    else:
        t = thresholds.get(sample.max_new_tokens)
    if t is None:
        have = (
            [thresholds.max_new_tokens] if isinstance(thresholds, CollapseThresholds) else sorted(thresholds)
        )
        raise ConfigError(
            f"collapse thresholds were calibrated on {have}-token continuations but a candidate "
            f"sample has max_new_tokens {sample.max_new_tokens}; generate reference and candidate "
            "with the same max_new_tokens"
        )
    return t


def collapse_records(
    task_label: str,
    cand_samples: Sequence[GenSample],
    thresholds: Thresholds,
    *,
    ref_nll: Sequence[float] | None = None,
    prompt_set: PromptSet | None = None,
) -> list[Record]:
    """Collapse rate and the continuous measures over prompts, each with a bootstrap CI over
    prompts and its per-prompt scores (so a study pairs them with the reference's: cells that
    all "collapse" are still ranked by how far their text degenerated).

    ``thresholds``: one set, or one per generation length (:func:`calibrate_thresholds`).
    ``ref_nll`` (the candidate's continuations scored by :func:`reference_nll`) adds the
    ``ref_nll`` record and the fluency criterion.  A suite's prompt set gives each prompt's
    language for the drift measure.
    """
    if not cand_samples:
        raise ConfigError("no generated samples to judge")
    judges = [thresholds_for(thresholds, s) for s in cand_samples]
    if prompt_set is not None and prompt_set.prompts != tuple(s.prompt for s in cand_samples):
        raise ConfigError(f"the samples were not generated from prompt set {prompt_set.describe()}")
    nll, langs = _per_sample(cand_samples, ref_nll, prompt_langs(prompt_set), "candidate samples")
    metrics = _metrics(cand_samples, nll, langs)
    verdicts = [is_collapsed(m, t) for m, t in zip(metrics, judges)]
    details = _details(cand_samples, thresholds, verdicts, prompt_set)
    ids = ids_sha256([s.prompt for s in cand_samples])
    collapsed = [float(c) for c, _ in verdicts]
    records = [_unit_record(task_label, "collapse_rate", collapsed, False, details, ids)]
    for name, attr, better in _MEAN_METRICS:
        values = [float(getattr(m, attr)) for m in metrics]
        records.append(_unit_record(task_label, name, values, better, details, ids))
    scored = [m.ref_nll for m in metrics if m.ref_nll is not None]
    if scored:
        rec = _mean_record(task_label, "ref_nll", scored, False, details)
        if len(scored) == len(metrics):  # an empty answer has no NLL: then no per-prompt pairing
            rec.details[UNITS_KEY] = UnitScores(scored, ids_sha256=ids).to_json()
        records.append(rec)
    return records


def prompt_langs(prompt_set: PromptSet | None) -> list[str | None] | None:
    """Each prompt's language when the set says it (a suite), else None (detected per prompt)."""
    if prompt_set is None or prompt_set.meta is None:
        return None
    return [m["lang"] for m in prompt_set.meta]


def heldout_record(
    task_label: str,
    ref_samples: Sequence[GenSample],
    *,
    ref_nll: Sequence[float] | None = None,
    prompt_set: PromptSet | None = None,
) -> Record:
    """``heldout_flag_rate``: the share of the reference's own samples the detector flags when
    each is judged by thresholds calibrated on the other prompts (:func:`heldout_flags`), with
    its CI and the reasons — what the detector's false-positive rate is at most."""
    flags = heldout_flags(ref_samples, ref_nll=ref_nll, langs=prompt_langs(prompt_set))
    details: dict[str, Any] = {
        "folds": 2,
        "ignore_worst": IGNORE_WORST,
        "flagged_prompts": [i for i, (hit, _) in enumerate(flags) if hit],
        "reason_counts": reason_counts(flags),
    }
    if prompt_set is not None and prompt_set.meta is not None:
        details["flagged_by_group"] = _by_group(prompt_set, [hit for hit, _ in flags])
    values = [float(hit) for hit, _ in flags]
    return _unit_record(
        task_label, "heldout_flag_rate", values, False, details, ids_sha256([s.prompt for s in ref_samples])
    )


def reason_counts(verdicts: Sequence[tuple[bool, list[str]]]) -> dict[str, int]:
    """How many samples each failure family (the reason's text before ``:``) fired on."""
    families: dict[str, int] = {}
    for _, reasons in verdicts:
        for family in {r.split(":", 1)[0] for r in reasons}:
            families[family] = families.get(family, 0) + 1
    return dict(sorted(families.items()))


def _unit_record(
    task: str, metric: str, values: list[float], higher_is_better: bool, details: dict[str, Any], ids: str
) -> Record:
    rec = _mean_record(task, metric, values, higher_is_better, details)
    rec.details[UNITS_KEY] = UnitScores(values, ids_sha256=ids).to_json()
    return rec


def _by_group(prompt_set: PromptSet, hits: Sequence[bool]) -> dict[str, list[int]]:
    """``"lang/use": [hits, prompts]`` over a suite's prompts."""
    assert prompt_set.meta is not None
    groups: dict[str, list[int]] = {}
    for m, hit in zip(prompt_set.meta, hits):
        g = groups.setdefault(f"{m['lang']}/{m['use']}", [0, 0])
        g[0] += int(hit)
        g[1] += 1
    return dict(sorted(groups.items()))


def _mean_record(
    task: str, metric: str, values: list[float], higher_is_better: bool, details: dict[str, Any]
) -> Record:
    mean, lo, hi = mean_ci(np.asarray(values, dtype=np.float64))
    return Record(task, metric, mean, lo, hi, len(values), higher_is_better, dict(details))


def _details(
    samples: Sequence[GenSample],
    thresholds: Thresholds,
    verdicts: list[tuple[bool, list[str]]],
    prompt_set: PromptSet | None,
) -> dict[str, Any]:
    prompts = [s.prompt for s in samples]
    sha = prompts_sha256(prompts)
    if prompt_set is not None:
        name = prompt_set.name
    else:
        name = "default" if sha == prompts_sha256(DEFAULT_PROMPTS) else "custom"
    info: dict[str, Any] = {"name": name, "n": len(prompts), "sha256": sha}
    if prompt_set is not None and prompt_set.meta is not None:
        info["suite_sha256"] = prompt_set.sha256
        info["rendering"] = prompt_set.rendering
        info["collapsed_by_group"] = _by_group(prompt_set, [hit for hit, _ in verdicts])
    return {
        "thresholds": thresholds.to_dict()
        if isinstance(thresholds, CollapseThresholds)
        else {str(n): t.to_dict() for n, t in thresholds.items()},
        "max_new_tokens": max(s.max_new_tokens for s in samples),
        "prompts": info,
        "collapsed_prompts": [i for i, (c, _) in enumerate(verdicts) if c],
        "reason_counts": reason_counts(verdicts),
        "examples": [
            {
                "prompt": s.prompt[-80:],
                "text": s.text[:_EXAMPLE_CHARS],
                "n_new": s.n_new,
                "hit_eos": s.hit_eos,
                "reasons": reasons,
            }
            for s, (_, reasons) in zip(samples[:_EXAMPLES], verdicts)
        ],
    }
