"""SmolLM2-135M through the GGUF export, with llama.cpp as the oracle.

* our "Q2_K" file equals llama.cpp's quantization of our F32 file tensor for tensor (types,
  bytes, bpw) — rows of 576 make most linears fall back to Q4_0, as llama.cpp's recipe says;
* llama.cpp's perplexity on our exported file equals q2lab's perplexity of the same weights
  (same windows) within 1%.

The IQ2_XXS variant (imatrix from the shared Hessians) quantizes 24 M weights with the IQ2
search and takes minutes on 2 cores: it runs when ``Q2LAB_LONG_TESTS=1``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from q2lab.quant.ggml import llamacpp
from tests.integration.ppl_pair import llamacpp_and_q2lab_ppl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not llamacpp.available(),
        reason="llama-cpp-python is not installed (pip install 'q2lab[llamacpp]'): no llama.cpp oracle",
    ),
]
# llama.cpp rounds activations to 8 bits: its ppl sits ≈ 0.7–0.8% above ours (8 × 256: 0.68%;
# 4 × 512 windows: 1.2%, too few); 256-token windows halve the evaluation cost of 8 × 512
WINDOWS, CTX = 8, 256


def _fresh():
    from q2lab.models import load_model

    return load_model("smollm2-135m")  # a private copy: load_into rewrites its weights


def _file_bpw(path) -> float:
    from q2lab.export.gguf import tensor_index

    idx = tensor_index(path).values()
    return sum(e.nbytes for e in idx) * 8 / sum(int(np.prod(e.shape)) for e in idx)


def _check(tmp_path, file_type: str, imatrix: str | None) -> dict:
    from q2lab import api
    from q2lab.data.text import corpus_windows, load_corpus
    from q2lab.export.gguf import differing_tensors
    from q2lab.quant.ggml.imatrix import read_imatrix

    lm = _fresh()
    f32 = tmp_path / "f32.gguf"
    api.export(lm, f32, type="F32")
    im_file = tmp_path / "im.gguf"
    ours = tmp_path / f"{file_type}.gguf"
    report = api.export(lm, ours, type=file_type, imatrix=imatrix, windows=32, save_imatrix=im_file)
    ref = tmp_path / f"ref-{file_type}.gguf"
    values = read_imatrix(im_file).values if imatrix else None
    llamacpp.quantize_file(f32, ref, file_type, imatrix=values, nthread=2)
    assert differing_tensors(ref, ours) == []
    assert report["bpw"] == pytest.approx(_file_bpw(ref), abs=0.01)

    windows = corpus_windows(lm, load_corpus("wikitext2"), WINDOWS, CTX)
    theirs, mine = llamacpp_and_q2lab_ppl(lm, ours, windows)
    print(f"{file_type}: llama.cpp ppl {theirs:.4f}, q2lab ppl {mine:.4f} over {WINDOWS} windows of {CTX}")
    assert mine == pytest.approx(theirs, rel=0.01), (mine, theirs)
    return report


def test_q2k_export_equals_llamacpp_and_matches_its_perplexity(tmp_path) -> None:
    report = _check(tmp_path, "Q2_K", None)
    shares = report["linear_types"]
    assert shares["Q4_0"] == pytest.approx(0.75, abs=0.01)  # the 576-wide fallback (FACTS.md)
    assert report["bpw_linear"] == pytest.approx(4.23, abs=0.01)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("Q2LAB_LONG_TESTS"), reason="several minutes: set Q2LAB_LONG_TESTS=1")
def test_iq2xxs_export_with_hessian_imatrix_equals_llamacpp(tmp_path) -> None:
    report = _check(tmp_path, "IQ2_XXS", "auto")
    assert report["linear_types"]["IQ4_NL"] == pytest.approx(0.72, abs=0.01)
