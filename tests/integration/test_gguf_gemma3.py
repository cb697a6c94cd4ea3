"""Gemma-3-270M through the GGUF export (long: set ``Q2LAB_LONG_TESTS=1``).

The packaged model loads in ≈ 60 s and its 262k-token embedding dominates the file, so this is
not in the default CI run; the gemma3 mapping itself is tested in-process on a tiny
Gemma-3-shaped model (``tests/unit/test_ggml_export.py``).  Here: our Q8_0 file of the real
model equals llama.cpp's quantization of our F32 file, and llama.cpp's perplexity on it equals
q2lab's perplexity of the same weights within 1% (same windows, BOS as the model wants).
"""

from __future__ import annotations

import os

import pytest

from q2lab.quant.ggml import llamacpp
from tests.integration.ppl_pair import llamacpp_and_q2lab_ppl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not llamacpp.available(),
        reason="llama-cpp-python is not installed (pip install 'q2lab[llamacpp]'): no llama.cpp oracle",
    ),
    pytest.mark.skipif(not os.environ.get("Q2LAB_LONG_TESTS"), reason="minutes: set Q2LAB_LONG_TESTS=1"),
]


def test_gemma3_270m_q8_0_equals_llamacpp_and_matches_its_perplexity(tmp_path) -> None:
    from q2lab import api
    from q2lab.data.text import corpus_windows, load_corpus
    from q2lab.export.gguf import differing_tensors
    from q2lab.models import load_model

    lm = load_model("gemma3-270m")
    f32, ours, ref = tmp_path / "f32.gguf", tmp_path / "q8.gguf", tmp_path / "ref.gguf"
    api.export(lm, f32, type="F32")
    api.export(lm, ours, type="Q8_0")
    llamacpp.quantize_file(f32, ref, "Q8_0", nthread=2)
    assert differing_tensors(ref, ours) == []
    windows = corpus_windows(lm, load_corpus("wikitext2"), 2, 512)
    theirs, mine = llamacpp_and_q2lab_ppl(lm, ours, windows)
    print(f"gemma3-270m Q8_0: llama.cpp ppl {theirs:.4f}, q2lab ppl {mine:.4f}")
    assert mine == pytest.approx(theirs, rel=0.01), (mine, theirs)
