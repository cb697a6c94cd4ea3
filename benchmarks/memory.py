"""Peak memory of the spine, each case in a fresh subprocess.

On a real model (default):

* quantize: peak RSS while GPTQ-quantizing SmolLM2-135M from a stored Hessian set, as a multiple
  of the float32 model's size (the budget is 2.5×), next to the RSS of just loading the model.
* calibrate: peak RSS of block-streamed calibration at several window counts, to show that it
  does not grow with the number of windows (activations live in disk buffers).

    python benchmarks/memory.py [--model smollm2-135m] [--windows 8 32 128] [--ctx 512] [--json OUT]

Out of core (``--synthetic-7b``), on a Mistral-7B-shaped Llama with random float16 weights
written to ``--work`` (32 blocks, hidden 4096, MLP 14336, 32 heads / 8 KV heads; 13.5 GB):

* ``rtn``: lazy-load the 32-block model and stream it through 2-bit RTN (g128) into a checkpoint,
  one block read, quantized, written and dropped at a time: the whole model never is in memory
  (float32 it would be 27 GiB, above this machine's RAM);
* ``calibrate`` + ``gptq``: the same model cut to ``--calib-blocks`` blocks (a config over the
  same files), calibrated out of core and GPTQ-quantized from the store: the steps whose
  per-block state (a block's Hessians, 2 GiB in float64 here) is largest.  The store of all 32
  blocks would take 66 GB of disk, more than this machine has; per-block memory does not depend
  on the number of blocks (the 32-block RTN run shows that).

Each case prints its peak RSS next to the sizes that bound it (one block's float32 weights, one
block's Hessians, the resident embeddings) and its seconds per block.

    python benchmarks/memory.py --synthetic-7b --work DIR [--calib-blocks 2] [--windows 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CASE = r"""
import json, resource, sys, time, torch
from q2lab.models import load_model
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
t0 = time.time()
lm = load_model(args["model"])
out = {"load_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "float_mb": sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20}
if args["case"] == "calibrate":
    from q2lab.calib.store import CalibSpec, calibrate
    calibrate(lm, CalibSpec("wikitext2", args["windows"], args["ctx"], 0), root=args["root"])
else:
    from q2lab.calib.store import HessianStore
    from q2lab.quant import make_config
    from q2lab.quant.model import quantize_model
    cfg = make_config("gptq", {"bits": 2, "group_size": 128})
    quantize_model(lm.model, "gptq", cfg, HessianStore(args["store"]))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["seconds"] = time.time() - t0
print(json.dumps(out))
"""


def run_case(script: str = CASE, **args) -> dict:
    """``script`` in a fresh interpreter with ``args`` as JSON; its last stdout line, parsed."""
    env = {**os.environ, "Q2LAB_QUIET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        raise SystemExit(f"case {args.get('case')} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


HIDDEN, MLP, BLOCKS, HEADS, KV_HEADS = 4096, 14336, 32, 32, 8
BOUND_GIB = 3  # issue 19: peak RSS ≤ one block (+ its Hessians, for the steps that hold them) + 3 GiB

LAZY_CASE = r"""
import json, resource, sys, time, torch
from q2lab import api
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.time()
lm = api.load_model(args["model"], lazy=True)
out = {"load_rss_mb": rss(), "load_seconds": time.time() - t0}
t1 = time.time()
if args["case"] == "calibrate":
    store = api.calibrate(lm, windows=args["windows"], ctx=args["ctx"], out=args["root"])
    out["store"] = str(store.path)
else:
    opts = {"bits": 2, "group_size": 128}
    summary = api.quantize(lm, args["case"], opts, out=args["out"], calib=args.get("store"), lazy=True)
    out["bpw"] = summary["bpw"]
    files = __import__("pathlib").Path(args["out"]).iterdir()
    out["checkpoint_gib"] = sum(f.stat().st_size for f in files) / 2**30
out["seconds"] = time.time() - t1
out["peak_rss_mb"] = rss()
print(json.dumps(out))
"""


def block_sizes() -> dict[str, float]:
    """MiB of one block's float32 weights and float64 Hessians (q/k/v, o, gate/up, down inputs)."""
    kv = HIDDEN * KV_HEADS // HEADS
    weights = HIDDEN * (HIDDEN + 2 * kv) + HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
    hessians = 3 * HIDDEN * HIDDEN + MLP * MLP
    return {"block_weights_mb": weights * 4 / 2**20, "block_hessians_mb": hessians * 8 / 2**20}


def write_synthetic(folder: str, seed: int = 0) -> str:
    """The 32-block model as sharded float16 safetensors (one shard per block) plus SmolLM2's
    tokenizer (vocabulary 49,152), written one shard at a time; reused when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from q2lab.models import gguf_loader, zoo

    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_loader.converted_dir(zoo.fetch("smollm2-135m"))[0]))
    tok.save_pretrained(folder)
    vocab = len(tok)
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    kv = HIDDEN * KV_HEADS // HEADS

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.float16)

    weight_map: dict[str, str] = {}
    shards = BLOCKS + 1
    for b in range(BLOCKS):
        p = f"model.layers.{b}."
        t = {
            p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": rand(kv, HIDDEN),
            p + "self_attn.v_proj.weight": rand(kv, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.up_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, MLP),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
        }
        name = f"model-{b + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
        print(f"  wrote block {b + 1}/{BLOCKS}", end="\r", flush=True)
    t = {
        "model.embed_tokens.weight": rand(vocab, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
        "lm_head.weight": rand(vocab, HIDDEN),
    }
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(t, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(t, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    open(done, "w").close()
    return folder


def cut(folder: str, blocks: int) -> str:
    """A model folder over the same shards whose config keeps the first ``blocks`` blocks."""
    out = f"{folder}-{blocks}blocks"
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(folder):
        src, dst = os.path.join(folder, name), os.path.join(out, name)
        if name == "config.json":
            with open(src) as f:
                cfg = json.load(f)
            cfg["num_hidden_layers"] = blocks
            with open(dst, "w") as f:
                json.dump(cfg, f)
        elif not os.path.exists(dst):
            os.symlink(src, dst)
    return out


def synthetic(args: argparse.Namespace) -> dict:
    import shutil
    import time

    sizes = block_sizes()
    t0 = time.time()
    folder = write_synthetic(os.path.join(args.work, "synthetic-7b"))
    print(f"synthetic 7B-shaped model in {folder} ({time.time() - t0:.0f} s to write or find)", flush=True)
    small = cut(folder, args.calib_blocks)
    emb_mb = 49152 * HIDDEN * 4 / 2**20
    results: dict = {"sizes": {**sizes, "embeddings_mb": emb_mb}, "cases": {}}
    cases = [
        ("rtn", folder, BLOCKS, {"out": os.path.join(args.work, "ckpt-rtn")}),
        ("calibrate", small, args.calib_blocks, {"root": os.path.join(args.work, "store")}),
        ("gptq", small, args.calib_blocks, {"out": os.path.join(args.work, "ckpt-gptq")}),
    ]
    for case, model, blocks, extra in cases:
        if case not in args.cases:
            continue
        if case == "gptq":
            root = os.path.join(args.work, "store")
            extra["store"] = os.path.join(root, sorted(os.listdir(root))[-1])  # from this or a previous run
        for path in (extra.get("out"), extra.get("root")):  # a fresh checkpoint, a fresh store
            if path and os.path.exists(path):
                shutil.rmtree(path)
        r = run_case(
            LAZY_CASE,
            case=case,
            model=model,
            windows=args.windows,
            ctx=args.ctx,
            threads=args.threads,
            **extra,
        )
        r["blocks"] = blocks
        r["seconds_per_block"] = r["seconds"] / blocks
        over = (
            r["peak_rss_mb"]
            - sizes["block_weights_mb"]
            - (sizes["block_hessians_mb"] if case != "rtn" else 0)
        )
        r["rss_above_block_mb"] = over
        r["bound_mb"] = r["peak_rss_mb"] - over + BOUND_GIB * 1024
        r["within_bound"] = over <= BOUND_GIB * 1024
        results["cases"][case] = r
        print(
            f"{case:9s} {blocks:2d} blocks: peak RSS {r['peak_rss_mb'] / 1024:5.2f} GiB "
            f"(load {r['load_rss_mb'] / 1024:.2f} GiB), {r['seconds_per_block']:6.1f} s/block; "
            f"peak − one block{' − its Hessians' if case != 'rtn' else ''} = {over / 1024:.2f} GiB"
            + (f"; {r['bpw']:.3f} bpw, checkpoint {r['checkpoint_gib']:.2f} GiB" if "bpw" in r else "")
            + f"; bound (that + {BOUND_GIB} GiB) {r['bound_mb'] / 1024:.2f} GiB: "
            + ("within" if r["within_bound"] else "OVER"),
            flush=True,
        )
        if case == "rtn":
            shutil.rmtree(extra["out"])  # 3 GB of disk, and it has been read back nowhere
    print(
        f"one block: float32 weights {sizes['block_weights_mb'] / 1024:.2f} GiB, float64 Hessians "
        f"{sizes['block_hessians_mb'] / 1024:.2f} GiB; resident embeddings {emb_mb / 1024:.2f} GiB"
    )
    if not args.keep:
        shutil.rmtree(folder)
        shutil.rmtree(small)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic-7b", dest="synthetic", action="store_true", help="the out-of-core cases")
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the synthetic model goes (13.5 GB)")
    p.add_argument("--calib-blocks", dest="calib_blocks", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the synthetic model for a rerun")
    p.add_argument(
        "--cases",
        nargs="+",
        default=["rtn", "calibrate", "gptq"],
        help="out-of-core cases to run (gptq needs a store)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.synthetic:
        if args.windows == [8, 32, 128]:
            args.windows = [8]
        args.windows = args.windows[0]
        results = synthetic(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    results: dict = {"calibrate": [], "quantize": None}
    with tempfile.TemporaryDirectory(prefix="q2lab-membench-") as root:
        for n in args.windows:
            r = run_case(
                case="calibrate", model=args.model, windows=n, ctx=args.ctx, root=root, threads=args.threads
            )
            results["calibrate"].append({"windows": n, **r})
            print(
                f"calibrate {n:>4} windows × {args.ctx}: peak RSS {r['peak_rss_mb']:7.0f} MiB "
                f"(after load {r['load_rss_mb']:.0f}), {r['seconds']:.0f} s",
                flush=True,
            )
        store = next(os.path.join(root, d) for d in sorted(os.listdir(root)))
        r = run_case(case="quantize", model=args.model, store=store, threads=args.threads)
        results["quantize"] = r
    q = results["quantize"]
    print(
        f"quantize GPTQ 2-bit g128: peak RSS {q['peak_rss_mb']:.0f} MiB = "
        f"{q['peak_rss_mb'] / q['float_mb']:.2f}× "
        f"the float32 model ({q['float_mb']:.0f} MiB); loading alone peaks at {q['load_rss_mb']:.0f} MiB"
    )
    cal = results["calibrate"]
    growth = cal[-1]["peak_rss_mb"] - cal[0]["peak_rss_mb"]
    print(
        f"calibration RSS growth from {cal[0]['windows']} to {cal[-1]['windows']} windows: {growth:+.0f} MiB "
        f"(an in-memory activation cache would add "
        f"{(cal[-1]['windows'] - cal[0]['windows']) * args.ctx * 576 * 4 * 2 / 2**20:.0f} MiB for SmolLM2)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
