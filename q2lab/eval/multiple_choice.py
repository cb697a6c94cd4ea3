"""Multiple-choice accuracy by log-likelihood, following lm-eval-harness exactly.

Requests and tokens (lm-eval's ``ConfigurableTask`` multiple_choice + ``HFLM._encode_pair``):

* choice ``i`` of an item is the request ``(context_i, " " + choices[i])`` (target delimiter
  " "; ``context_i`` is the shared context, or the choice's own one for partial scoring);
* trailing whitespace of a context moves to the front of its continuation;
* ``context_enc = tok(context)``, ``whole_enc = tok(context + continuation)`` and
  ``continuation_enc = whole_enc[len(context_enc):]``, all without special tokens, so a token
  that merges across the boundary belongs to the continuation, as in lm-eval;
* BOS is put in front of the context when the model's tokenizer adds BOS (lm-eval's tokenizer
  does that itself); an empty context becomes lm-eval's prefix token (BOS, else EOS);
* the model reads ``(context_enc + continuation_enc)[:-1]``, cut from the left to the model's
  maximum context (such items are counted in ``MCResult.truncated``), and the score of the
  choice is the sum of the log-probabilities of ``continuation_enc``.

Metrics: ``acc`` = argmax score == label; ``acc_norm`` = argmax of score / ``len(choice)`` in
characters, without the delimiter (lm-eval's ``completion_len``).  ``np.argmax`` breaks ties
towards the first choice, as lm-eval does.  For partial-scoring items every choice scores the
same continuation, so ``acc_norm`` equals ``acc`` (lm-eval reports only ``acc`` there).

Speed: the choices of an item share their leading tokens (the context, and for WinoGrande the
sentence before the blank).  That shared prefix is run once, several items at a time, and only
the remaining tokens of each choice are run on top of its item's KV cache.  Batching items
matters as much as sharing the prefix on CPU: a forward pass of a few tokens costs about as much
as reading every weight once.  With ``shared_prefix=False`` every choice is run as its own full
sequence, as lm-eval does; the tests check that both give the same log-likelihoods.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from q2lab.data.tasks.mc import MCItem, MCTask
from q2lab.errors import ConfigError, DataError
from q2lab.eval.records import Record
from q2lab.eval.stats import UNITS_KEY, UnitScores, ids_sha256, mean_ci
from q2lab.models.loader import LoadedModel
from q2lab.utils.kvcache import cache_kwargs, output_cache
from q2lab.utils.progress import progress

TARGET_DELIMITER = " "
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when the config names no context length


@dataclass
class MCResult:
    """Per-item scores of one task; ``acc``/``acc_norm`` are per-item correctness (bool),
    kept for paired comparisons between models (McNemar, paired bootstrap)."""

    task: str
    loglik: list[np.ndarray]  # per item: Σ log p(continuation) of each choice
    lengths: list[np.ndarray]  # per item: len(choice) in characters, the acc_norm divisor
    labels: np.ndarray  # (n_items,) gold choice
    truncated: np.ndarray  # (n_items,) bool: some request was cut to the model's context
    seconds: float = 0.0
    pred: np.ndarray = field(init=False)
    pred_norm: np.ndarray = field(init=False)
    acc: np.ndarray = field(init=False)
    acc_norm: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        loglik = _pad(self.loglik, -np.inf)
        lengths = np.maximum(_pad(self.lengths, 1.0), 1.0)  # an empty choice would divide by zero
        self.pred = loglik.argmax(1)
        self.pred_norm = (loglik / lengths).argmax(1)
        self.acc = self.pred == self.labels
        self.acc_norm = self.pred_norm == self.labels


def _pad(rows: list[np.ndarray], fill: float) -> np.ndarray:
    """Ragged per-item arrays as one ``(n_items, max_choices)`` matrix."""
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# --------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedChoice:
    """Tokens of one request, ``context_enc + continuation_enc`` after left truncation."""

    tokens: list[int]
    n_context: int  # ≥ 1: the first continuation token is predicted from a real token
    truncated: bool


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def max_context(loaded: LoadedModel) -> int:
    """The model's context length, resolved as lm-eval's ``resolve_max_length`` does."""
    config = loaded.model.config
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    tokenizer_max = getattr(loaded.tokenizer, "model_max_length", None)
    return int(tokenizer_max) if tokenizer_max and tokenizer_max < 1e12 else DEFAULT_MAX_LENGTH


def encode_item(loaded: LoadedModel, item: MCItem, max_len: int) -> list[EncodedChoice]:
    """lm-eval's token encoding of every choice of ``item`` (see the module docstring)."""
    pairs = [_split_trailing_space(ctx, TARGET_DELIMITER + choice) for ctx, choice in item.pairs]
    texts = [c for c, _ in pairs] + [c + k for c, k in pairs]
    ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    start = [loaded.info.bos_token_id] if loaded.info.add_bos else []
    out = []
    for i, (ctx_ids, whole_ids) in enumerate(zip(ids[: len(pairs)], ids[len(pairs) :])):
        cont = whole_ids[len(ctx_ids) :]
        if not cont:
            raise DataError(f"item {item.id}: choice {i} ({item.choices[i]!r}) adds no tokens to its context")
        ctx = (start + ctx_ids) or _empty_context(loaded)
        out.append(_truncate(ctx, cont, max_len, item.id))
    return out


def _empty_context(loaded: LoadedModel) -> list[int]:
    """lm-eval's prefix token for an empty context: BOS, else EOS."""
    token = loaded.info.bos_token_id
    token = loaded.tokenizer.eos_token_id if token is None else token
    if token is None:
        raise ConfigError(f"{loaded.info.name}: an empty context needs a BOS or EOS token; none is defined")
    return [token]


def _truncate(ctx: list[int], cont: list[int], max_len: int, item_id: str | None) -> EncodedChoice:
    """Keep the last ``max_len + 1`` tokens (lm-eval's ``[-(max_length + 1):]``)."""
    tokens = ctx + cont
    cut = max(0, len(tokens) - (max_len + 1))
    if cut >= len(ctx):
        raise DataError(
            f"item {item_id}: a continuation of {len(cont)} tokens does not fit the model's "
            f"context of {max_len} tokens"
        )
    return EncodedChoice(tokens[cut:], len(ctx) - cut, cut > 0)


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class _Prepared:
    """An encoded item and how many leading input tokens all its choices share."""

    index: int  # position in the task
    choices: list[EncodedChoice]
    prefix: int  # shared input tokens run once (0: every choice runs as a full sequence)

    @property
    def keep(self) -> int:
        """Prefix positions whose logits are scored (the last context token, usually)."""
        return max(0, self.prefix - (min(c.n_context for c in self.choices) - 1))


def _prepare(index: int, choices: list[EncodedChoice], shared_prefix: bool) -> _Prepared:
    """Common token prefix of the choices' inputs, leaving each choice ≥ 1 token of its own
    (so every choice has a row in the second pass)."""
    inputs = [c.tokens[:-1] for c in choices]
    m = min(len(x) for x in inputs) - 1
    if not shared_prefix or m <= 0:
        return _Prepared(index, choices, 0)
    same = (np.array([x[:m] for x in inputs]) == inputs[0][:m]).all(0)
    return _Prepared(index, choices, int(m if same.all() else same.argmin()))


def _batches(items: list[_Prepared], batch_size: int) -> list[list[_Prepared]]:
    """Items packed into batches of at most ``batch_size`` choice rows (an item with more
    choices runs alone), longest first as lm-eval orders them, so padding stays small.  Items
    without a shared prefix go into batches of their own: those batches need no KV cache."""

    def key(it: _Prepared) -> tuple[bool, int]:
        return it.prefix > 0, max(len(c.tokens) for c in it.choices)

    batches: list[list[_Prepared]] = []
    rows = 0
    for it in sorted(items, key=key, reverse=True):
        if not batches or rows + len(it.choices) > batch_size or key(batches[-1][0])[0] != key(it)[0]:
            batches.append([])
            rows = 0
        batches[-1].append(it)
        rows += len(it.choices)
    return batches


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, without materialising a second vocabulary-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _padded(
    seqs: list[list[int]],
    device: torch.device,
    left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: sequences padded with token 0 to a common width, on the left or right."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _score_batch(model: torch.nn.Module, batch: list[_Prepared]) -> list[np.ndarray]:
    """Σ log p(continuation) of every choice of every item in ``batch``, in two passes: each
    item's shared prefix once (:func:`_prefix_pass`), then every choice's own tokens on its
    item's KV cache.  Rows of the second pass are right-padded: under causal attention, padding
    after a row's last real token cannot change that row.  Without a shared prefix the first
    pass is skipped and the second runs the full sequences."""
    device = next(model.parameters()).device
    choices = [c for it in batch for c in it.choices]
    owner = torch.tensor([i for i, it in enumerate(batch) for _ in it.choices], device=device)
    prefix = torch.tensor([it.prefix for it in batch], device=device)[owner]  # per row
    keep = max(it.keep for it in batch)
    rest, _ = _padded([c.tokens[it.prefix : -1] for it in batch for c in it.choices], device)
    kwargs, prefix_logits = {}, None
    if batch[0].prefix:
        kwargs, prefix_logits = _prefix_pass(model, batch, owner, prefix, keep, rest.shape[1])
    logits = model(input_ids=rest, **kwargs).logits
    if prefix_logits is not None:
        logits = torch.cat([prefix_logits.to(logits.dtype), logits], 1)
    sums = _continuation_sums(logits, choices, first_position=prefix - keep)
    return np.split(sums, np.cumsum([len(it.choices) for it in batch])[:-1])


def _prefix_pass(
    model: torch.nn.Module,
    batch: list[_Prepared],
    owner: torch.Tensor,
    prefix: torch.Tensor,
    keep: int,
    rest_len: int,
) -> tuple[dict, torch.Tensor | None]:
    """Run each item's shared prefix once, left-padded as batched generation does (positions
    and sliding windows stay right).  Returns the second pass's arguments (the KV cache, one
    copy per choice row, with its mask and positions) and each row's logits for the last
    ``keep`` prefix positions (they predict continuation tokens).  ``owner`` and ``prefix`` give
    each choice row's item and prefix length."""
    device = owner.device
    ids, mask = _padded([it.choices[0].tokens[: it.prefix] for it in batch], device, left=True)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp_min(0),
        use_cache=True,
        logits_to_keep=max(keep, 1),
    )
    cache = output_cache(out)
    cache.batch_select_indices(owner)
    kwargs = dict(
        **cache_kwargs(model, cache),
        use_cache=True,
        attention_mask=torch.cat([mask[owner], mask.new_ones(len(owner), rest_len)], 1),
        position_ids=prefix[:, None] + torch.arange(rest_len, device=device),
    )
    return kwargs, out.logits[owner, out.logits.shape[1] - keep :] if keep else None


def _continuation_sums(
    logits: torch.Tensor,
    choices: list[EncodedChoice],
    first_position: torch.Tensor,
) -> np.ndarray:
    """Σ log p over each row's continuation tokens; column ``t`` of row ``r`` of ``logits`` is the
    prediction made at sequence position ``first_position[r] + t``."""
    device = logits.device
    pos = first_position[:, None] + torch.arange(logits.shape[1], device=device)
    tokens, _ = _padded([c.tokens for c in choices], device)
    targets = tokens.gather(1, (pos + 1).clamp(0, tokens.shape[1] - 1))
    n_context = torch.tensor([c.n_context for c in choices], device=device)[:, None]
    length = torch.tensor([len(c.tokens) for c in choices], device=device)[:, None]
    scored = (pos >= n_context - 1) & (pos < length - 1)
    return torch.where(scored, _target_logprobs(logits, targets), 0.0).double().sum(1).cpu().numpy()


def score_mc(
    loaded: LoadedModel, task: MCTask, batch_size: int = 32, *, shared_prefix: bool = True
) -> MCResult:
    """Score every item of ``task``.  ``batch_size`` caps the choice rows per forward pass
    (the logits take about batch_size × continuation tokens × vocabulary × 4 bytes)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be ≥ 1, got {batch_size}")
    t0 = time.perf_counter()
    max_len = max_context(loaded)
    encoded = [encode_item(loaded, item, max_len) for item in task.items]
    prepared = [_prepare(i, enc, shared_prefix) for i, enc in enumerate(encoded)]
    logliks: list[np.ndarray] = [np.empty(0)] * len(prepared)

    def scored() -> Iterator[tuple[int, np.ndarray]]:
        for batch in _batches(prepared, batch_size):
            yield from zip((it.index for it in batch), _score_batch(loaded.model, batch))

    for index, loglik in progress(scored(), f"mc:{task.name}", total=len(prepared), unit="item"):
        logliks[index] = loglik
    return MCResult(
        task=task.name,
        loglik=logliks,
        lengths=[np.array([len(c) for c in item.choices], dtype=np.float64) for item in task.items],
        labels=np.array([item.label for item in task.items], dtype=np.int64),
        truncated=np.array([any(c.truncated for c in enc) for enc in encoded], dtype=bool),
        seconds=time.perf_counter() - t0,
    )


def mc_records(task_label: str, task: MCTask, result: MCResult) -> list[Record]:
    """``acc`` and ``acc_norm`` records (``task_label`` verbatim, e.g. ``"mc:hellaswag"``) with
    seeded bootstrap CIs over items."""
    n = len(task.items)
    if len(result.labels) != n:
        raise ConfigError(f"result has {len(result.labels)} items but task {task.name} has {n}")
    details = {
        "data_sha256": task.sha256,
        "files": list(task.files),
        "prompt": task.prompt,
        "items": n,
        "limit": task.limit,
        "items_available": task.n_available,
        "partial_scoring": any(item.is_partial for item in task.items),
        "chance": float(np.mean([1 / len(item.choices) for item in task.items])),
        "truncated_items": int(result.truncated.sum()),
    }
    records = []
    ids = ids_sha256([f"{task.sha256}:{item.id}" for item in task.items])
    for metric, correct in (("acc", result.acc), ("acc_norm", result.acc_norm)):
        value, lo, hi = mean_ci(correct.astype(np.float64))
        units = UnitScores(correct.astype(np.float64), ids_sha256=ids).to_json()
        records.append(Record(task_label, metric, value, lo, hi, n, True, {**details, UNITS_KEY: units}))
    return records
