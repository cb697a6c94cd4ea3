"""QTIP vs GPTQ on SmolLM2-135M at 2 bits: quantization time, exact bpw, wikitext-2 ppl and KLD.

Every method reads the same shared Hessian store (one calibration), and is evaluated on the
same wikitext-2 test windows (default 64 × 512, positions 1–511 scored, as in FACTS.md)
against the float reference.  Each ``--run`` is ``method`` plus ``key=value`` options:

    python benchmarks/qtip_smollm2.py --run qtip --run "gptq bits=2 group_size=128"
    python benchmarks/qtip_smollm2.py --run "qtip L=10" --windows 16 --json out/qtip.json

References printed with the results (FACTS.md, same windows): float 29.45; llama.cpp IQ2_XXS
with imatrix 49.56 at 3.91 bpw on the block linears (its 576-wide rows fall back to IQ4_NL).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from q2lab.calib.store import CalibSpec, calibrate
from q2lab.eval.tasks import Evaluator, parse_task
from q2lab.models.loader import load_model
from q2lab.quant.base import make_config
from q2lab.quant.model import quantize_model


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    method, *pairs = text.split()
    return method, dict(p.split("=", 1) for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--run", action="append", required=True, help='"method key=value ..."')
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-cache", default="/tmp/q2lab-qtip-refcache", help="reference log-prob cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = CalibSpec("wikitext2", args.calib_windows, args.ctx, 0)
    tasks = [parse_task(t, windows=args.windows, ctx=args.ctx) for t in ("ppl:wikitext2", "kld:wikitext2")]
    evaluator = Evaluator(load_model(args.model), workdir=Path(args.ref_cache))
    rows = []
    for text in args.run:
        method, opts = parse_run(text)
        cfg = make_config(method, opts)
        loaded = load_model(args.model)
        store = calibrate(loaded, spec)
        t0 = time.time()
        report = quantize_model(loaded.model, method, cfg, store)
        seconds = time.time() - t0
        records = evaluator.run(loaded, tasks)
        row = {"run": text, "bpw": report.bpw, "quant_seconds": round(seconds, 1)}
        row["proxy_rel_mean"] = report.to_dict()["proxy_rel_mean"]
        for r in records:
            row[r.metric] = r.value
            row[r.metric + "_ci"] = (r.ci_low, r.ci_high)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        from q2lab.utils.io import atomic_path

        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
