"""Constructed multiple choice from any corpus: which sentence comes next?

Standard multiple-choice sets are scarce offline and none exists in Polish here, but any
held-out text can be turned into one.  Each item's context is a passage of consecutive
sentences; its choices are the sentence that truly follows plus distractor sentences drawn
from elsewhere in the corpus.  A model that follows the passage prefers the true sentence; the
quantity measured is the same as HellaSwag's (is the right continuation the most likely one),
in any language.

Construction, all seeded (``seed``) and deterministic:

* sentences: split on ``.!?…`` followed by whitespace and an upper-case letter, a quote or a
  dash, within paragraphs (blank-line separated); sentences outside ``[min_chars, max_chars]``
  cannot be a true answer or a distractor;
* anchors: ``n_items`` positions spread evenly over the corpus, each one a sentence with
  ``context_sentences`` sentences before it in the same paragraph;
* distractors: sentences at least ``min_distance`` sentences away from the anchor, whose length
  is within ``length_tolerance`` of the true sentence's when enough exist (else the nearest in
  length), so choice length gives nothing away; no choice repeats another (case- and
  whitespace-insensitive), and no true sentence or context is used twice;
* the true sentence's position among the choices is drawn at random.

Items are :class:`~q2lab.data.tasks.mc.MCItem` s in the generic schema (``write_jsonl`` makes
a file that ``mc:PATH`` reads).  The named task ``continuation_polish`` is built from the
Polish evaluation split (books that are not in the calibration corpus).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from q2lab.data.tasks.mc import MCItem
from q2lab.errors import ConfigError, DataError
from q2lab.utils.io import atomic_path

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+(?=[\"„“«(—–-]?[A-ZĄĆĘŁŃÓŚŹŻÀ-ÖØ-Þ0-9])")


@dataclass(frozen=True)
class ContinuationConfig:
    n_items: int = 500
    n_choices: int = 4
    context_sentences: int = 3
    min_chars: int = 30
    max_chars: int = 250
    min_distance: int = 50  # sentences between an anchor and any of its distractors
    length_tolerance: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.n_choices < 2 or self.context_sentences < 1:
            raise ConfigError("continuation tasks need n_items ≥ 1, n_choices ≥ 2 and context_sentences ≥ 1")


def split_sentences(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated) as lists of sentences, whitespace collapsed."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        if flat:
            out.append([s.strip() for s in _SENTENCE_END.split(flat) if s.strip()])
    return out


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def build_continuation_items(
    text: str, cfg: ContinuationConfig | None = None, name: str = "cont"
) -> list[MCItem]:
    """MC items from ``text`` (see the module docstring); fewer than ``n_items`` if the text is short."""
    cfg = cfg or ContinuationConfig()
    rng = np.random.default_rng(cfg.seed)
    paras = split_sentences(text)
    sentences = [s for p in paras for s in p]
    para_of = np.repeat(np.arange(len(paras)), [len(p) for p in paras])
    starts = np.cumsum([0] + [len(p) for p in paras])[:-1]
    lengths = np.array([len(s) for s in sentences])
    usable = (lengths >= cfg.min_chars) & (lengths <= cfg.max_chars)
    in_para = np.arange(len(sentences)) - starts[para_of] if sentences else np.array([], dtype=int)
    anchors = np.flatnonzero(usable & (in_para >= cfg.context_sentences))
    if anchors.size == 0:
        raise DataError("the text has no sentence with enough context before it to build continuation items")
    picks = anchors[
        np.unique(np.linspace(0, anchors.size - 1, min(cfg.n_items, anchors.size)).round().astype(int))
    ]
    pool = np.flatnonzero(usable)
    used: set[str] = set()
    items = []
    for a in picks:
        true = sentences[a]
        context = " ".join(sentences[a - cfg.context_sentences : a])
        if _norm(true) in used or _norm(context) in used:
            continue
        distractors = _distractors(int(a), pool, lengths, sentences, cfg, rng, exclude={_norm(true)})
        if len(distractors) < cfg.n_choices - 1:
            continue
        used.update({_norm(true), _norm(context)})
        choices = [true, *distractors]
        order = rng.permutation(len(choices))
        items.append(
            MCItem(context, [choices[i] for i in order], int(np.flatnonzero(order == 0)[0]), id=f"{name}/{a}")
        )
    if not items:
        raise DataError("could not build any continuation item (text too short for distinct distractors)")
    return items


def _distractors(
    anchor: int,
    pool: np.ndarray,
    lengths: np.ndarray,
    sentences: list[str],
    cfg: ContinuationConfig,
    rng: np.random.Generator,
    exclude: set[str],
) -> list[str]:
    """Sentences far from ``anchor``, length-matched where possible, distinct from each other."""
    far = pool[np.abs(pool - anchor) >= cfg.min_distance]
    if far.size == 0:
        return []
    rel = np.abs(lengths[far] / lengths[anchor] - 1.0)
    matched = rel <= cfg.length_tolerance
    need = cfg.n_choices - 1
    # length-matched candidates in random order; if too few, the rest nearest in length first
    rest = far[~matched][np.argsort(rel[~matched], kind="stable")]
    ordered = np.concatenate([rng.permutation(far[matched]), rest[: 4 * need]])
    out: list[str] = []
    seen = set(exclude)
    for i in ordered:
        s = sentences[int(i)]
        if _norm(s) not in seen:
            out.append(s)
            seen.add(_norm(s))
            if len(out) == need:
                break
    return out


def write_jsonl(items: list[MCItem], path: str | Path) -> Path:
    """The items in the generic MC schema (``mc:PATH`` reads the file back)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for it in items:
            rec = {"id": it.id, "context": it.context, "choices": it.choices, "label": it.label}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def parse_continuation_polish(paths: list[Path]):
    """Named task: items from the Polish evaluation split (two books not used for calibration)."""
    (path,) = paths
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                texts.append(json.loads(line)["text"])
    return iter(build_continuation_items("\n\n".join(texts), name="continuation_polish"))


def main(argv: list[str] | None = None) -> None:
    """``python -m q2lab.data.tasks.continuation IN.txt OUT.jsonl [N_ITEMS] [SEED]``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit("usage: python -m q2lab.data.tasks.continuation IN.txt OUT.jsonl [N_ITEMS] [SEED]")
    cfg = ContinuationConfig(
        n_items=int(args[2]) if len(args) > 2 else 500, seed=int(args[3]) if len(args) > 3 else 0
    )
    items = build_continuation_items(Path(args[0]).read_text(encoding="utf-8"), cfg, Path(args[0]).stem)
    write_jsonl(items, args[1])
    print(f"{len(items)} items written to {args[1]}")


if __name__ == "__main__":
    main()
