"""QuIP# vs GPTQ on SmolLM2-135M with shared Hessians: quantization time, bpw, WikiText-2 test
perplexity and KLD to the float model (first 64 × 512-token windows, positions 1–511 scored,
the windows of llama.cpp's IQ2_XXS figure 49.56 in /work/shared/FACTS.md).

The same numbers come from ``q2lab study examples/quip-vs-llamacpp.yaml``; this script exists to
run cells as separate processes that share the reference log-prob cache (``--workdir``), so
two cells can run side by side on a busy machine.  One JSON line per method on stdout.

``python benchmarks/quip_smollm2.py --method quip# --opts bits=2 --workdir /tmp/ref``
(``--finetune '{"block_epochs": 2, "e2e_epochs": 1}'`` adds the fine-tuning stages).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from q2lab.calib.store import CalibSpec, calibrate
from q2lab.eval.tasks import Evaluator, parse_task
from q2lab.finetune import finetuner
from q2lab.models import load_model
from q2lab.quant import make_config
from q2lab.quant.model import quantize_model


def parse_opts(items: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--opts", nargs="*", default=[], help="method options key=value")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--finetune", help="JSON of the finetune option section (default: off)")
    ap.add_argument("--workdir", required=True, help="reference log-prob cache (shared between runs)")
    ap.add_argument("--wait-ref", type=float, default=0, help="minutes to wait for another run's cache")
    args = ap.parse_args()
    reference = load_model("smollm2-135m")
    store = calibrate(reference, CalibSpec("wikitext2", windows=args.calib_windows, ctx=512, seed=0))
    cand = load_model("smollm2-135m")
    opts: dict = parse_opts(args.opts)
    if args.finetune:
        opts["finetune"] = json.loads(args.finetune)
    cfg = make_config(args.method, opts)
    t0 = time.time()
    report = quantize_model(cand.model, args.method, cfg, store, tuner=finetuner(cand, store, cfg))
    seconds = time.time() - t0
    deadline = time.time() + 60 * args.wait_ref
    while time.time() < deadline and not list(Path(args.workdir).glob("reference-*.json")):
        time.sleep(10)
    tasks = [parse_task(t, windows=args.windows, ctx=512) for t in ("ppl:wikitext2", "kld:wikitext2")]
    records = Evaluator(reference, workdir=Path(args.workdir)).run(cand, tasks)
    out = {
        "method": report.method,
        "config": cfg.to_dict(),
        "bpw": round(report.bpw, 4),
        "quantize_s": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "proxy_rel_mean": report.to_dict()["proxy_rel_mean"],
    }
    if report.finetune is not None:
        out["finetune"] = report.finetune
    for r in records:
        out[r.metric] = [round(r.value, 4), round(r.ci_low, 4), round(r.ci_high, 4)]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
