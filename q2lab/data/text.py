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

Windows
-------
A window is ``ctx`` tokens.  When the model's tokenizer adds BOS, a window is BOS followed by
``ctx − 1`` text tokens; otherwise it is ``ctx`` text tokens.  Evaluation windows are
consecutive and non-overlapping from the start of the text (the first ``n``); calibration
windows start at seeded random offsets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

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


@dataclass(frozen=True)
class Corpus:
    name: str  # resolved split name or the path given
    text: str
    sha256: str  # of the bytes read
    files: tuple[str, ...]


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
