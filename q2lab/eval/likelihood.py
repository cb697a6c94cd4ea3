"""Perplexity and KL divergence to the reference on identical token windows.

Convention (documented in the README): a window is ``ctx`` tokens (BOS + ``ctx − 1`` text
tokens when the model adds BOS).  Every next-token prediction inside the window is scored:
positions 1 … ctx−1, i.e. ``ctx − 1`` predictions per window, each with all earlier tokens of
the window as context.  llama.cpp's ``perplexity`` tool scores only the second half of each
window (every prediction has ≥ ctx/2 context), so its numbers are lower than ours on the same
windows; q2lab's convention matches a plain transformers loop and lm-eval's rolling windows
without overlap.

Both metrics come from one candidate forward pass.  The reference's log-probabilities come
either from running the reference model in lockstep or from a :class:`ReferenceCache` (fp16
log-probs on disk, computed once per study; fp16 keeps log-probs of every token that carries
probability mass to ≈1e-3, far below the KLD differences that separate methods).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from q2lab.errors import CorruptFileError, ShapeError
from q2lab.eval.records import Record
from q2lab.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, UNITS_KEY, UnitScores, bootstrap_ci, ids_sha256
from q2lab.quant.kv import KVConfig, cache_nbytes, float_bytes_per_token, kivi_cache
from q2lab.utils.divergence import kl_per_token
from q2lab.utils.io import atomic_path, write_json_atomic
from q2lab.utils.kvcache import cache_kwargs
from q2lab.utils.progress import progress


@torch.no_grad()
def window_logprobs(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 2,
    kv: KVConfig | None = None,
    kv_bytes: list[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Log-softmax over the vocabulary for positions 0 … ctx−2 of each window (float32).  With
    ``kv``, each window is fed in chunks of ``kv.group`` tokens through a fresh quantized KV cache
    (:mod:`q2lab.quant.kv`), so every chunk attends to the quantized past as decoding would; the
    cache's bytes after each batch go to ``kv_bytes``."""
    device = next(model.parameters()).device
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        if kv is None:
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        else:
            logits = _chunked_logits(model, x, kv, kv_bytes)[:, :-1]
        yield from torch.log_softmax(logits.float(), dim=-1).cpu()


def _chunked_logits(model: torch.nn.Module, x: torch.Tensor, kv: KVConfig, kv_bytes: list[int] | None):
    cache = kivi_cache(model, kv)
    parts = [
        model(input_ids=x[:, s : s + kv.group], use_cache=True, **cache_kwargs(model, cache)).logits
        for s in range(0, x.shape[1], kv.group)
    ]
    if kv_bytes is not None and kv.native:  # a peer's cache is not introspected
        kv_bytes.append(cache_nbytes(cache))
    return torch.cat(parts, dim=1)


class ReferenceCache:
    """Reference log-probs of a fixed set of windows, stored once as fp16 on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.exists() or not meta_path.exists():
            raise CorruptFileError(f"reference cache {self.path} is incomplete")
        self.meta = json.loads(meta_path.read_text())
        self.n, self.positions, self.vocab = self.meta["n"], self.meta["positions"], self.meta["vocab"]
        expected = self.n * self.positions * self.vocab * 2
        if self.path.stat().st_size != expected:
            raise CorruptFileError(
                f"reference cache {self.path} has the wrong size (expected {expected} bytes)"
            )

    @classmethod
    def build(cls, reference: torch.nn.Module, windows: torch.Tensor, path: Path, key: str) -> ReferenceCache:
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if meta_path.exists() and path.exists():
            cache = cls(path)
            if cache.meta.get("key") == key:
                return cache
        vocab = None
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for lp in progress(window_logprobs(reference, windows), "reference log-probs", windows.shape[0]):
                vocab = lp.shape[-1]
                f.write(lp.to(torch.float16).numpy().tobytes())
        write_json_atomic(
            meta_path, {"key": key, "n": windows.shape[0], "positions": windows.shape[1] - 1, "vocab": vocab}
        )
        return cls(path)

    def __iter__(self) -> Iterator[torch.Tensor]:
        per = self.positions * self.vocab
        with open(self.path, "rb") as f:
            for _ in range(self.n):
                buf = np.frombuffer(f.read(per * 2), dtype=np.float16).reshape(self.positions, self.vocab)
                yield torch.from_numpy(buf.astype(np.float32))


@dataclass
class WindowStats:
    """Per-window sums, the resampling units for the CIs."""

    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)  # per-token KLD(ref ‖ cand)
    top1: list[int] = field(default_factory=list)
    ref_nll: list[float] = field(default_factory=list)
    kv_bytes_per_token: float | None = None  # with a quantized KV cache: what it held per token
    kv_float_bytes_per_token: float | None = None  # … and what a float cache would


@torch.no_grad()
def score_windows(
    candidate: torch.nn.Module,
    windows: torch.Tensor,
    reference: torch.nn.Module | ReferenceCache | None = None,
    desc: str = "ppl/kld",
    kv: KVConfig | None = None,
) -> WindowStats:
    """One pass over ``windows``: candidate NLL, and KLD/top-1 agreement if a reference is given.
    ``kv`` quantizes the candidate's KV cache (the reference keeps a float one)."""
    stats = WindowStats()
    targets = windows[:, 1:]
    if isinstance(reference, torch.nn.Module):
        ref_iter: Iterator[torch.Tensor] | None = window_logprobs(reference, windows)
    elif isinstance(reference, ReferenceCache):
        if reference.n != windows.shape[0] or reference.positions != windows.shape[1] - 1:
            raise ShapeError("reference cache was built for other windows")
        ref_iter = iter(reference)
    else:
        ref_iter = None
    kv_bytes: list[int] = []
    cand_iter = window_logprobs(candidate, windows, kv=kv, kv_bytes=kv_bytes)
    for i, lp in enumerate(progress(cand_iter, desc, windows.shape[0], unit="win")):
        tgt = targets[i].unsqueeze(-1)
        stats.nll.append(float(-lp.gather(-1, tgt).double().sum()))
        stats.tokens.append(int(tgt.numel()))
        if ref_iter is not None:
            ref_lp = next(ref_iter)
            if ref_lp.shape != lp.shape:
                raise ShapeError(f"reference log-probs {tuple(ref_lp.shape)} vs candidate {tuple(lp.shape)}")
            stats.kld.append(kl_per_token(ref_lp, lp).double().numpy())
            stats.top1.append(int((ref_lp.argmax(-1) == lp.argmax(-1)).sum()))
            stats.ref_nll.append(float(-ref_lp.gather(-1, tgt).double().sum()))
    if kv is not None and kv_bytes:
        stats.kv_bytes_per_token = sum(kv_bytes) / windows.numel()
        stats.kv_float_bytes_per_token = float_bytes_per_token(candidate)
    return stats


def ppl_records(task: str, stats: WindowStats, details: dict) -> list[Record]:
    nll, tok = np.array(stats.nll), np.array(stats.tokens, dtype=np.float64)
    lo, hi = bootstrap_ci(nll, weights=tok)
    value = math.exp(nll.sum() / tok.sum())
    units = UnitScores(nll, tok, "exp", _window_ids(details, len(nll)))
    return [
        Record(task, "ppl", value, math.exp(lo), math.exp(hi), len(nll), False, _with_units(details, units))
    ]


def _window_ids(details: dict, n: int) -> str:
    """Windows are identified by the corpus, the context length and their index."""
    return ids_sha256([f"{details.get('data_sha256')}:{details.get('ctx')}:{i}" for i in range(n)])


def _with_units(details: dict, units: UnitScores) -> dict:
    return {**details, UNITS_KEY: units.to_json()}


def kld_records(task: str, stats: WindowStats, details: dict) -> list[Record]:
    if not stats.kld:
        return []
    per_window = [k for k in stats.kld]
    tok = np.array([k.size for k in per_window], dtype=np.float64)
    sums = np.array([k.sum() for k in per_window])
    pooled = np.concatenate(per_window)
    n = len(per_window)
    out = []
    lo, hi = bootstrap_ci(sums, weights=tok)
    ids = _window_ids(details, n)
    kld_units = _with_units(details, UnitScores(sums, tok, ids_sha256=ids))
    out.append(Record(task, "kld_mean", float(pooled.mean()), lo, hi, n, False, kld_units))
    for metric, q in (("kld_median", 0.5), ("kld_p99", 0.99)):
        lo, hi = _quantile_ci(per_window, q)
        out.append(Record(task, metric, float(np.quantile(pooled, q)), lo, hi, n, False, dict(details)))
    agree = np.array(stats.top1, dtype=np.float64)
    lo, hi = bootstrap_ci(agree, weights=tok)
    top1_units = _with_units(details, UnitScores(agree, tok, ids_sha256=ids))
    out.append(Record(task, "top1_agree", float(agree.sum() / tok.sum()), lo, hi, n, True, top1_units))
    return out


def _quantile_ci(
    per_window: list[np.ndarray],
    q: float,
    n_resamples: int = DEFAULT_RESAMPLES // 5,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Bootstrap over windows of a pooled-token quantile (fewer resamples: each is a sort)."""
    rng = np.random.default_rng(seed)
    n = len(per_window)
    if n < 2:
        v = float(np.quantile(per_window[0], q)) if n else float("nan")
        return v, v
    stats = [
        np.quantile(np.concatenate([per_window[j] for j in rng.integers(0, n, n)]), q)
        for _ in range(n_resamples)
    ]
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(lo), float(hi)
