"""The llama.cpp-vs-q2lab perplexity pair both GGUF integration tests check (same windows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from q2lab.quant.ggml import llamacpp


def llamacpp_and_q2lab_ppl(lm, gguf: Path, windows) -> tuple[float, float]:
    """llama.cpp's perplexity on ``gguf`` and q2lab's on the same weights loaded into ``lm``."""
    from q2lab.eval.likelihood import score_windows
    from q2lab.export.gguf import load_into

    theirs = llamacpp.perplexity(gguf, windows)
    load_into(lm, gguf)
    stats = score_windows(lm.model, windows)
    return theirs, float(np.exp(sum(stats.nll) / sum(stats.tokens)))
