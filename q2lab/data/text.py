"""Text corpora and deterministic token windows.

Named corpora (under ``$Q2LAB_DATA``) have a calibration split and an evaluation split, so that
``--corpus wikitext2`` never calibrates on the text it is evaluated on:

============  ===========================================  ====================================
name          calibration (role "calib")                    evaluation (role "eval")
============  ===========================================  ====================================
wikitext2     wikitext2/valid.tokens.txt                    wikitext2/wiki.test.raw
polish        polish_prose/calib/*.txt (4 novels)           polish_prose/eval/eval.jsonl (text)
============  ===========================================  ====================================

A split can be named explicitly (``wikitext2-test``, ``wikitext2-valid``, ``polish-calib``,
``polish-eval``), and any local ``.txt`` (or ``.jsonl`` with a ``text`` field) path works too.

Every corpus has a language (:data:`CORPUS_LANGUAGES` for named data, detected by
:func:`q2lab.data.language.text_language` for a local file), so a model calibrated on one
language and scored on another can be flagged.

Mixes
-----
A calibration may draw its windows from several corpora in stated proportions
(:class:`CorpusMix`: ``wikitext2+polish``, weights 0.5/0.5 by default): each part gets its
share of the windows (largest remainder), drawn at random offsets of its own text with seed
``seed + i``, and the windows are shuffled together with ``seed``.  A one-part mix is exactly
the single corpus.

Windows
-------
A window is ``ctx`` tokens.  When the model's tokenizer adds BOS, a window is BOS followed by
``ctx − 1`` text tokens; otherwise it is ``ctx`` text tokens.  Evaluation windows are
consecutive and non-overlapping from the start of the text (the first ``n``); calibration
windows start at seeded random offsets.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from q2lab.data.language import join_languages, text_language
from q2lab.data.registry import data_file, data_root, hash_files, local_file, looks_like_path
from q2lab.errors import ConfigError, DataError

Role = Literal["calib", "eval"]

# name → (calibration split, evaluation split)
CORPORA: dict[str, tuple[str, str]] = {
    "wikitext2": ("wikitext2-valid", "wikitext2-test"),
    "polish": ("polish-calib", "polish-eval"),
}
SPLITS: dict[str, tuple[str, ...]] = {
    "wikitext2-test": ("wikitext2/wiki.test.raw",),
    "wikitext2-valid": ("wikitext2/valid.tokens.txt",),
    "polish-calib": ("polish_prose/calib/*.txt",),
    "polish-eval": ("polish_prose/eval/eval.jsonl",),
}
#: The language of each named corpus (its splits share it).
CORPUS_LANGUAGES: dict[str, str] = {"wikitext2": "en", "polish": "pl"}


@dataclass(frozen=True)
class Corpus:
    name: str  # resolved split name or the path given
    text: str
    sha256: str  # of the bytes read
    files: tuple[str, ...]

    @functools.cached_property
    def language(self) -> str | None:
        """ISO 639-1: the registry's for a named split, else detected on the text (None when
        unclear); computed on first use, so loading a corpus to score it pays nothing for it."""
        return named_language(self.name) if self.name in SPLITS else text_language(self.text)


def corpus_names() -> list[str]:
    return sorted(CORPORA) + sorted(SPLITS)


def load_corpus(name: str, role: Role = "eval") -> Corpus:
    """Resolve a corpus name (or local path) for a role and read its text."""
    split = CORPORA[name][0 if role == "calib" else 1] if name in CORPORA else name
    if split in SPLITS:
        files = _expand(SPLITS[split])
    elif looks_like_path(name):
        files = [local_file(name, "corpus")]
    else:
        raise DataError(
            f"unknown corpus {name!r}; known: {', '.join(corpus_names())}, or a path to a .txt/.jsonl file"
        )
    text = _read_texts(files, strip_books=split == "polish-calib")
    if not text.strip():
        raise DataError(f"corpus {name} ({', '.join(map(str, files))}) is empty")
    return Corpus(split, text, hash_files(files), tuple(str(f) for f in files))


def named_language(name: str) -> str | None:
    """The language of a named corpus or split (``polish-eval`` → ``pl``); None for others."""
    return CORPUS_LANGUAGES.get(name) or CORPUS_LANGUAGES.get(name.rsplit("-", 1)[0])


def corpus_language(name: str, read_files: bool = True) -> str | None:
    """A corpus's (or a ``+`` mix's) language without tokenizing: the registry for named data,
    the detector for local files (only with ``read_files``); None when unknown or unreadable."""
    langs = []
    for part in name.split(MIX_SEP):
        if named_language(part):
            langs.append(named_language(part))
        elif read_files and looks_like_path(part) and Path(part).expanduser().is_file():
            langs.append(load_corpus(part).language)
        else:
            return None
    return join_languages(langs)


def _expand(patterns: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        if "*" in pat:
            found = sorted(data_root().glob(pat))
            if not found:
                raise DataError(f"no files match {data_root() / pat} (Q2LAB_DATA selects the data folder)")
            files += found
        else:
            files.append(data_file(pat))
    return files


def _read_texts(files: list[Path], strip_books: bool) -> str:
    parts = []
    for f in files:
        if f.suffix == ".jsonl":
            parts.append(_jsonl_text(f))
        else:
            raw = f.read_text(encoding="utf-8")
            parts.append(_strip_wolne_lektury(raw) if strip_books else raw)
    return "\n\n".join(parts)


def _jsonl_text(path: Path) -> str:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{i}: expected a JSON object with a 'text' field ({e})") from e
    return "\n\n".join(texts)


def _strip_wolne_lektury(raw: str) -> str:
    """Drop the Wolne Lektury header (up to the ISBN paragraph) and footer (from the last -----)."""
    cut = raw.rfind("\n-----")
    body = raw[:cut] if cut > 0 else raw
    m = re.search(r"ISBN[^\n]*\n", body[:2000])
    return body[m.end() :].strip() if m else body.strip()


# --------------------------------------------------------------------------- windows
_TOKEN_CACHE: dict[tuple[str, int, str], torch.Tensor] = {}
_TOKEN_CACHE_SIZE = 8


def tokenize(tokenizer, corpus: Corpus) -> torch.Tensor:
    """All token ids of the corpus, no special tokens (cached per tokenizer and content)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), corpus.sha256)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(corpus.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def make_windows(
    tokens: torch.Tensor,
    n: int | None,
    ctx: int,
    *,
    bos_id: int | None = None,
    mode: Literal["sequential", "random"] = "sequential",
    seed: int = 0,
    what: str = "corpus",
) -> torch.Tensor:
    """``(n, ctx)`` windows; BOS-prefixed when ``bos_id`` is given.  ``n=None``: all that fit."""
    if ctx < 2:
        raise ConfigError(f"context length must be at least 2 tokens, got {ctx}")
    span = ctx - (1 if bos_id is not None else 0)
    total = int(tokens.numel())
    available = total // span
    if n is None:
        n = available
    if n < 1:
        raise ConfigError(f"number of windows must be ≥ 1, got {n}")
    if available < (n if mode == "sequential" else 1):
        raise DataError(
            f"{what} has {total} tokens: not enough for {n} windows of {span} text tokens"
            + (f" (at most {available})" if available else "")
        )
    if mode == "sequential":
        body = tokens[: n * span].view(n, span)
    elif mode == "random":
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, total - span + 1, (n,), generator=g)
        body = torch.stack([tokens[s : s + span] for s in starts.tolist()])
    else:
        raise ConfigError(f"window mode must be 'sequential' or 'random', got {mode!r}")
    if bos_id is not None:
        body = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)
    return body.contiguous()


def corpus_windows(
    loaded, corpus: Corpus, n: int | None, ctx: int, *, mode="sequential", seed=0
) -> torch.Tensor:
    """Windows of ``corpus`` for a :class:`~q2lab.models.LoadedModel`, honouring its BOS setting."""
    bos = loaded.info.bos_token_id if loaded.info.add_bos else None
    return make_windows(
        tokenize(loaded.tokenizer, corpus),
        n,
        ctx,
        bos_id=bos,
        mode=mode,
        seed=seed,
        what=f"corpus {corpus.name}",
    )


# --------------------------------------------------------------------------- mixes
MIX_SEP = "+"
#: How far a mix's weights may be from summing to 1.
WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class CorpusMix:
    """Corpora to draw calibration windows from, with their shares of the windows."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        return MIX_SEP.join(self.names)

    @property
    def is_single(self) -> bool:
        return len(self.names) == 1


def parse_mix(corpus: str | list[str] | tuple[str, ...], weights=None) -> CorpusMix:
    """``"wikitext2+polish"`` (or a list of names/paths) and optional weights → a checked mix;
    weights default to equal shares and must be positive, one per corpus, summing to 1."""
    names = tuple(
        n.strip() for n in (corpus.split(MIX_SEP) if isinstance(corpus, str) else corpus) if str(n).strip()
    )
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"calibration corpus must be a name, a path or a list of them, got {corpus!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"calibration mix {MIX_SEP.join(names)} names a corpus twice")
    for n in names:
        if n not in CORPORA and n not in SPLITS and not looks_like_path(n):
            raise ConfigError(
                f"unknown corpus {n!r} in calibration mix {MIX_SEP.join(names)}; "
                f"known: {', '.join(corpus_names())}, or a path to a .txt/.jsonl file"
            )
    if weights is None:
        return CorpusMix(names, tuple(1.0 / len(names) for _ in names))
    w = list(weights) if isinstance(weights, list | tuple) else [weights]
    if len(w) != len(names):
        raise ConfigError(
            f"calibration mix {MIX_SEP.join(names)} has {len(names)} corpora but {len(w)} weights"
        )
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in w):
        raise ConfigError(f"calibration weights must be positive numbers, got {w}")
    if abs(sum(w) - 1.0) > WEIGHT_TOLERANCE:
        raise ConfigError(f"calibration weights {w} sum to {sum(w):g}, not 1")
    return CorpusMix(names, tuple(float(x) for x in w))


def mix_counts(n: int, weights: tuple[float, ...]) -> list[int]:
    """Windows per part: ``n`` shared by largest remainder (ties to the earlier part)."""
    raw = [n * w for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix_windows(
    loaded, mix: CorpusMix, n: int, ctx: int, *, seed: int = 0, corpora: list[Corpus] | None = None
) -> torch.Tensor:
    """``n`` calibration windows drawn from the mix's corpora in its proportions (random
    offsets, seed ``seed + i`` for part ``i``), shuffled together with ``seed``.  ``corpora``:
    the mix's corpora already loaded (else read here)."""
    parts = corpora or [load_corpus(name, role="calib") for name in mix.names]
    if mix.is_single:
        return corpus_windows(loaded, parts[0], n, ctx, mode="random", seed=seed)
    span = ctx - (1 if loaded.info.add_bos else 0)
    chunks = []
    for i, (corpus, k, w) in enumerate(zip(parts, mix_counts(n, mix.weights), mix.weights)):
        if k == 0:
            raise ConfigError(
                f"calibration mix {mix.name}: {corpus.name} gets 0 of {n} windows at weight {w:g}; "
                "use more windows or a larger weight"
            )
        total = int(tokenize(loaded.tokenizer, corpus).numel())
        if total < k * span:
            raise DataError(
                f"calibration mix {mix.name}: corpus {corpus.name} has {total} tokens, too short for its "
                f"share of {k} windows of {span} tokens (weight {w:g})"
            )
        chunks.append(corpus_windows(loaded, corpus, k, ctx, mode="random", seed=seed + i))
    windows = torch.cat(chunks)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order].contiguous()
