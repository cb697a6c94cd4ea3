"""Peak memory of the spine on a real model, each case in a fresh subprocess.

* quantize: peak RSS while GPTQ-quantizing SmolLM2-135M from a stored Hessian set, as a multiple
  of the float32 model's size (the budget is 2.5×), next to the RSS of just loading the model.
* calibrate: peak RSS of block-streamed calibration at several window counts, to show that it
  does not grow with the number of windows (activations live in disk buffers).

    python benchmarks/memory.py [--model smollm2-135m] [--windows 8 32 128] [--ctx 512] [--json OUT]
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


def run_case(**args) -> dict:
    env = {**os.environ, "Q2LAB_QUIET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", CASE, json.dumps(args)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        raise SystemExit(f"case {args} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
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
