"""llama.cpp's own 2-bit file types on the packaged models, measured by llama.cpp and by q2lab.

For each (model, file type): q2lab exports the float model to an F32 GGUF, llama.cpp's
``llama_model_quantize`` writes the file type (IQ2 types and the ``+ imatrix`` rows with the
importance matrix = the diagonal of the shared Hessian store, 32 × 512 WikiText-2 valid windows,
seed 0), q2lab writes the same file type itself (``q2lab export``) and the two files are compared
tensor for tensor.  Then llama.cpp's perplexity on the file and q2lab's perplexity of the same
weights (loaded back into the transformers model) are measured on the same windows of WikiText-2
test (q2lab's convention: BOS first where the model adds it, positions 1 … ctx−1 scored).
llama.cpp is ≈ 1 % higher because its quantized matmuls round activations to 8 bits.

Writes one JSON record per line to ``results.jsonl`` next to this file (README tables cite it):

    python docs/results/llamacpp-files/measure.py            # SmolLM2 (64 × 512) and Gemma 3 (16 × 512)

``--shipped`` measures the zoo's GGUF files as shipped instead (the Qwen2.5-Coder Q4_K_M files):
llama.cpp's perplexity on the file next to q2lab's float reference, which is that file
dequantized (``load_model(alias)``), on the same windows; records go to ``shipped.jsonl``:

    python docs/results/llamacpp-files/measure.py --shipped qwen2.5-coder-0.5b qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from q2lab import api
from q2lab.data.text import corpus_windows, load_corpus
from q2lab.export.gguf import differing_tensors, export_gguf, gguf_tensors, imatrix_names, load_into
from q2lab.models import load_model
from q2lab.quant.ggml import llamacpp
from q2lab.quant.ggml.imatrix import from_store
from q2lab.utils.provenance import machine, versions

OUT = Path(__file__).with_name("results.jsonl")
PLAN = [  # (model, file type, with imatrix, eval windows)
    ("smollm2-135m", "Q2_K", False, 64),
    ("smollm2-135m", "Q2_K", True, 64),
    ("smollm2-135m", "IQ2_XXS", True, 64),
    ("smollm2-135m", "IQ2_XS", True, 64),
    ("gemma3-270m", "Q8_0", False, 16),
    ("gemma3-270m", "IQ2_XXS", True, 16),
]
CTX = 512


def _ppl(model, windows) -> float:
    from q2lab.eval.likelihood import score_windows

    stats = score_windows(model, windows)
    return float(np.exp(sum(stats.nll) / sum(stats.tokens)))


def _q2lab_ppl(lm, path: Path, windows) -> float:
    load_into(lm, path)
    return _ppl(lm.model, windows)


def measure(alias: str, file_type: str, with_imatrix: bool, n_windows: int, work: Path) -> dict:
    t0 = time.time()
    lm = load_model(alias)
    f32 = work / f"{alias}-f32.gguf"
    if not f32.exists():
        export_gguf(lm, f32, "F32")
    im = None
    store = None
    if with_imatrix:
        store = api.calibrate(lm, "wikitext2", windows=32, ctx=CTX, seed=0)
        im = from_store(store, imatrix_names(gguf_tensors(lm.model)))
    theirs = work / f"{alias}-{file_type}-{with_imatrix}-llamacpp.gguf"
    llamacpp.quantize_file(f32, theirs, file_type, imatrix=im.values if im else None, nthread=2)
    ours = work / f"{alias}-{file_type}-{with_imatrix}-q2lab.gguf"
    report = export_gguf(lm, ours, file_type, imatrix=im)
    windows = corpus_windows(lm, load_corpus("wikitext2"), n_windows, CTX)
    t1 = time.time()
    ppl_llamacpp = llamacpp.perplexity(theirs, windows)
    t2 = time.time()
    ppl_q2lab = _q2lab_ppl(lm, theirs, windows)
    return {
        "model": alias,
        "file_type": file_type,
        "imatrix": "hessian diagonal, wikitext2 valid 32 x 512, seed 0" if with_imatrix else None,
        "hessian_key": store.key if store is not None else None,
        "windows": n_windows,
        "ctx": CTX,
        "bos": bool(lm.info.add_bos),
        "bpw_linear": report["bpw_linear"],
        "bpw_file": report["bpw"],
        "linear_types": report["linear_types"],
        "q2lab_file_equals_llamacpp": differing_tensors(theirs, ours) == [],
        "ppl_llamacpp": ppl_llamacpp,
        "ppl_q2lab_same_weights": ppl_q2lab,
        "ratio": ppl_llamacpp / ppl_q2lab,
        "timings": {"prepare_s": t1 - t0, "llamacpp_ppl_s": t2 - t1, "q2lab_ppl_s": time.time() - t2},
        "versions": versions(),
        "machine": machine(),
    }


def measure_shipped(alias: str, n_windows: int) -> dict:
    """llama.cpp on the zoo's own GGUF file vs q2lab's float model made from it, same windows."""
    from q2lab.models import zoo

    t0 = time.time()
    lm = load_model(alias)
    path = zoo.fetch(alias, quiet=True)
    windows = corpus_windows(lm, load_corpus("wikitext2"), n_windows, CTX)
    ppl_q2lab = _ppl(lm.model, windows)
    t1 = time.time()
    del lm
    ppl_llamacpp = llamacpp.perplexity(path, windows)
    return {
        "model": alias,
        "file": path.name,
        "file_type": "as shipped",
        "windows": n_windows,
        "ctx": CTX,
        "ppl_llamacpp": ppl_llamacpp,
        "ppl_q2lab_same_weights": ppl_q2lab,
        "ratio": ppl_llamacpp / ppl_q2lab,
        "timings": {"q2lab_ppl_s": t1 - t0, "llamacpp_ppl_s": time.time() - t1},
        "versions": versions(),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shipped", nargs="+", help="zoo aliases whose own GGUF files to measure")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    if args.shipped:
        rows = []
        for alias in args.shipped:
            rows.append(measure_shipped(alias, args.windows))
            print(json.dumps({k: rows[-1][k] for k in ("model", "ppl_llamacpp", "ppl_q2lab_same_weights")}))
        OUT.with_name("shipped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alias, file_type, with_imatrix, n in PLAN:
            row = measure(alias, file_type, with_imatrix, n, Path(tmp))
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "model",
                            "file_type",
                            "imatrix",
                            "bpw_linear",
                            "ppl_llamacpp",
                            "ppl_q2lab_same_weights",
                            "q2lab_file_equals_llamacpp",
                        )
                    }
                ),
                flush=True,
            )
            rows.append(row)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
