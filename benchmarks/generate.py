"""What a q2lab model costs to run: decode tokens/s, prefill time and peak memory of greedy
generation (batch 1 or ``--batch`` B), per weight format × KV cache, next to llama.cpp measured in
the same run; ``--context`` N puts N tokens of WikiText-2 before the request, where the KV cache
is what grows.

Cases (each in its own subprocess, so every ``ru_maxrss`` is its own):

* q2lab weights: ``fp`` (float32), ``q4_k`` (llama.cpp's Q4_K blocks decoded by q2lab's layer),
  ``quip#`` 2-bit and ``qtip`` 2-bit, each *cached* (the dequantized weight kept in float: the
  speed of a float model, the memory of one) and *on the fly* (codes decoded at every forward:
  the memory of the codes, paying the decode per token);
* each with a float KV cache and with a 2-bit KIVI cache (``q2lab/quant/kv.py``; residual 32,
  group 32);
* the peers: llama.cpp (``llama-cpp-python``) decoding a Q4_K_M GGUF that q2lab exports from
  the same float model, and the float (F32) GGUF — on the same threads, same prompt, same
  count; for the KV cache, transformers' own ``QuantizedCache`` with its quanto and HQQ
  backends (2-bit, the same residual and group), where those packages install.

Every case decodes exactly ``--new`` tokens per sequence (EOS is masked), after the same prompt;
decode tokens/s counts every sequence of the batch.  llama.cpp runs at batch 1 only (the
high-level API of llama-cpp-python decodes one sequence).  Peak RSS is
the process high-water mark after decoding, minus nothing (it includes torch and the model).
Usage::

    python benchmarks/generate.py --new 128 --threads 2 > benchmarks/results/generate.txt
    python benchmarks/generate.py --new 64 --context 4096 --threads 2 > benchmarks/results/generate-4k.txt
    python benchmarks/generate.py --new 64 --batch 8 --threads 2 > benchmarks/results/generate-batch8.txt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
KV_2BIT = {"bits": 2, "residual": 32, "group": 32}


def long_prompt(model: str, context: int) -> str:
    """The first ``context`` tokens of WikiText-2 test (the model's own tokenizer) followed by the
    request: a long context where the KV cache, not the weights, holds most of the memory.  Built
    once in the parent, so no case loads a tokenizer it would not load anyway."""
    from q2lab.data.text import load_corpus
    from q2lab.models import load_model

    tok = load_model(model).tokenizer
    ids = tok(load_corpus("wikitext2", role="eval").text[: 12 * context])["input_ids"]
    return tok.decode(ids[:context]) + "\n\n" + PROMPT


def _q2lab_case(args: dict) -> dict:
    import torch

    from q2lab.eval.generation import generate
    from q2lab.models import load_model
    from q2lab.quant.kv import KVConfig
    from q2lab.quant.linear import QuantLinear

    torch.set_num_threads(args["threads"])
    loaded = load_model(args["checkpoint"] or args["model"])  # a q2lab checkpoint of the method
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight, m._cached = args["cached"], None
    # the peer: transformers' QuantizedCache in place of q2lab's (KVConfig.backend)
    kv = KVConfig(**args["kv"], backend=args.get("kv_backend") or "q2lab") if args["kv"] else None
    eos = set(loaded.tokenizer.all_special_ids)

    def no_eos(ids, logits):
        logits[:, sorted(eos)] = -float("inf")
        return logits

    prompts = [args["prompt"]] * args["batch"]
    gen = {"kv": kv, "logits_processor": no_eos, "batch_size": args["batch"]}
    generate(loaded, prompts[:1], 4, **gen)  # warm-up
    if kv is not None:
        generate(loaded, prompts[:1], 4, **gen)  # a second warm-up (quanto compiles)
    t0 = time.perf_counter()
    generate(loaded, prompts, 1, **gen)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    kv_bytes: list[int] = []  # what q2lab's cache holds at the end (a peer's is not counted)
    samples = generate(loaded, prompts, args["new"], **gen, kv_bytes=kv_bytes)
    total = time.perf_counter() - t0
    assert all(len(s.token_ids) == args["new"] for s in samples), [len(s.token_ids) for s in samples]
    return {
        "prefill_s": prefill,
        "decode_tok_s": args["batch"] * (args["new"] - 1) / max(total - prefill, 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_bytes": kv_bytes[-1] if kv_bytes else None,
    }


def _llamacpp_case(args: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args["gguf"],
        n_ctx=(n_ctx := max(1024, args.get("context", 0) + args["new"] + 256)),
        n_threads=args["threads"],
        n_batch=n_ctx,  # llama-cpp-python keeps n_batch rows of logits: the prompt's last must fit
        verbose=False,
    )
    tokens = llm.tokenize(args["prompt"].encode(), add_bos=True)
    eos = llm.token_eos()

    def decode(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill = time.perf_counter() - t0
        for _ in range(n):
            logits = llm.scores[llm.n_tokens - 1].copy()
            logits[eos] = -float("inf")
            llm.eval([int(logits.argmax())])
        return prefill, time.perf_counter() - t0

    decode(4)  # warm-up
    prefill, total = decode(args["new"])
    return {
        "prefill_s": prefill,
        "decode_tok_s": args["new"] / max(total - prefill, 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_bytes": None,
    }


def _prepare(args: dict) -> None:
    """A GGUF export of the float model, or a q2lab checkpoint of a method (32 × 512 WikiText-2
    calibration windows, the cached store when there is one)."""
    if args["kind"] == "export":
        from q2lab.export.gguf import export_gguf
        from q2lab.models import load_model

        export_gguf(load_model(args["model"]), args["path"], args["type"])
    else:
        from q2lab import api

        api.quantize(args["model"], args["method"], args["options"], out=args["path"], windows=32)


def run_case(args: dict) -> dict:
    env = {**os.environ, "Q2LAB_QUIET": "1", "OMP_NUM_THREADS": str(args["threads"])}
    res = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        raise SystemExit(f"case {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


#: (case name, method, options, cached): the weight formats measured.
WEIGHTS = [
    ("fp32", "fp", {}, True),
    ("q4_k on the fly", "q4_k", {"fallback": True}, False),
    ("quip# 2-bit cached", "quip#", {"bits": 2}, True),
    ("quip# 2-bit on the fly", "quip#", {"bits": 2}, False),
    ("qtip 2-bit cached", "qtip", {"bits": 2}, True),
    ("qtip 2-bit on the fly", "qtip", {"bits": 2}, False),
]


def cases(base: dict, ggufs: dict[str, str], checkpoints: dict[str, str]) -> list[tuple[str, dict]]:
    """Every case's arguments; ``base`` holds model, new, threads, batch, context and prompt."""
    out = []
    for name, method, _, cached in WEIGHTS:
        for kv_name, kv in (("float KV", None), ("2-bit KV", KV_2BIT)):
            args = {
                **base,
                "kind": "q2lab",
                "checkpoint": checkpoints.get(method),
                "cached": cached,
                "kv": kv,
            }
            out.append((f"q2lab {name}, {kv_name}", args))
    for backend in ("quanto", "hqq"):
        args = {
            **base,
            "kind": "q2lab",
            "checkpoint": None,
            "cached": True,
            "kv": KV_2BIT,
            "kv_backend": backend,
        }
        out.append((f"q2lab fp32, transformers {backend} 2-bit KV", args))
    if base["batch"] == 1:  # llama-cpp-python's high-level API decodes one sequence
        for name, path in ggufs.items():
            out.append((f"llama.cpp {name}", {**base, "kind": "llamacpp", "gguf": path}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--new", type=int, default=128, help="tokens to decode per case")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (q2lab cases)")
    p.add_argument(
        "--context", type=int, default=0, help="prefix the prompt with this many WikiText-2 tokens"
    )
    p.add_argument(
        "--only", default="", help="run only cases whose name contains one of these (comma-separated)"
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        args = json.loads(a.case)
        if args["kind"] in ("export", "checkpoint"):
            _prepare(args)
            print("{}")
        else:
            print(json.dumps(_llamacpp_case(args) if args["kind"] == "llamacpp" else _q2lab_case(args)))
        return
    common = {"threads": a.threads}
    results = []
    with tempfile.TemporaryDirectory(prefix="q2lab-genbench-") as tmp:
        ggufs = {f"{t} GGUF": os.path.join(tmp, f"model-{t}.gguf") for t in ("F32", "Q4_K_M")}
        checkpoints = {m: os.path.join(tmp, f"ck-{m}") for _, m, _, _ in WEIGHTS if m != "fp"}
        prompt = long_prompt(a.model, a.context) if a.context else PROMPT
        base = {"model": a.model, "new": a.new, "threads": a.threads, "batch": a.batch, "prompt": prompt}
        base["context"] = a.context
        todo = [(n, c) for n, c in cases(base, ggufs, checkpoints) if any(o in n for o in a.only.split(","))]
        for name, path in ggufs.items():
            if any(c.get("gguf") == path for _, c in todo):
                file_type = name.split()[0]
                run_case({"kind": "export", "model": a.model, "path": path, "type": file_type, **common})
        for _, method, options, _ in WEIGHTS:
            path = checkpoints.get(method)
            if path and not os.path.exists(path) and any(c.get("checkpoint") == path for _, c in todo):
                args = {"kind": "checkpoint", "model": a.model, "method": method, "options": options}
                run_case({**args, "path": path, **common})
        for name, args in todo:
            r = run_case(args)
            results.append({"case": name, **r})
            kv = "" if r["kv_bytes"] is None else f", KV {r['kv_bytes'] / 2**10:.0f} KiB"
            print(
                f"{name:<42} decode {r['decode_tok_s']:7.1f} tok/s  prefill {r['prefill_s']:.3f} s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MiB{kv}",
                flush=True,
            )
    peer = next((r for r in results if r["case"] == "llama.cpp Q4_K_M GGUF"), None)
    if peer:
        speed, rss = peer["decode_tok_s"], peer["peak_rss_mb"]
        print(f"\nratios to llama.cpp Q4_K_M ({speed:.1f} tok/s, {rss:.0f} MiB):")
        for r in results:
            print(
                f"  {r['case']:<42} speed {r['decode_tok_s'] / peer['decode_tok_s']:5.2f}×  "
                f"memory {r['peak_rss_mb'] / peer['peak_rss_mb']:5.2f}×"
            )
    what = f"a {a.context}-token WikiText-2 prefix and " if a.context else ""
    print(
        f"\n{a.model}, batch {a.batch}, {a.new} new tokens per sequence after {what}a "
        f"{len(PROMPT)}-character request, {a.threads} threads"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
