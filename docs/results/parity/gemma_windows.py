"""Why Gemma-3-270M's float perplexity is 23.63 in q2lab's studies but 23.49 in FACTS.md.

Same model (tests/integration/test_parity.py: q2lab's weights equal transformers' load of the
GGUF bit for bit), same forward pass, different *windows* over WikiText-2 test:

* q2lab: contiguous windows, each BOS + the next 511 tokens (window i = tokens 511·i … 511·i+510);
* FACTS.md: 512-token chunks (chunk i = tokens 512·i … 512·i+511), BOS + the chunk's first 511.

Both score positions 1 … 511 of 64 windows.  Writes ``gemma_windows.json`` next to this file:

    python docs/results/parity/gemma_windows.py
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from q2lab.data.text import corpus_windows, load_corpus, tokenize
from q2lab.eval.tasks import Evaluator, parse_task
from q2lab.models import load_model
from q2lab.utils.provenance import machine, versions

N, CTX = 64, 512


def _ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    t0 = time.time()
    lm = load_model("gemma3-270m")
    corpus = load_corpus("wikitext2")
    ours = corpus_windows(lm, corpus, N, CTX)
    ids = torch.as_tensor(tokenize(lm.tokenizer, corpus))
    bos = torch.tensor([lm.info.bos_token_id])
    chunks = torch.stack([torch.cat([bos, ids[i * CTX : i * CTX + CTX - 1]]) for i in range(N)])
    evaluated = Evaluator(None).run(lm, [parse_task("ppl:wikitext2", windows=N, ctx=CTX)])[0]
    out = {
        "model": "gemma3-270m",
        "corpus_sha256": corpus.sha256,
        "windows": N,
        "ctx": CTX,
        "q2lab_windows_ppl_evaluator": evaluated.value,
        "q2lab_windows_ppl_transformers_loss": _ppl(lm.model, ours),
        "facts_chunk_windows_ppl": _ppl(lm.model, chunks),
        "facts_md_value": 23.4861,
        "seconds": round(time.time() - t0, 1),
        "versions": versions(),
        "machine": machine(),
    }
    path = Path(__file__).with_name("gemma_windows.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
