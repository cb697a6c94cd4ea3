"""UPQ's stage-2 training cost on SmolLM2-135M-Instruct: tokens/s and peak memory of QAT steps,
against the peer "plain float fine-tuning of the same linears" measured in the same run.

Both phases run in their own subprocess (so each ``ru_maxrss`` is its own), on the same
calibration windows, the same micro-batches, the same generalized-JSD loss against the same
teacher top-k, Adam on every decoder linear, activation checkpointing on.  The QAT phase trains
latent weights through the SEQ INT2 grid with learnable group steps (q2lab/finetune/qat.py);
the peer trains the float weights directly.  The ratio says what the fake quantization costs
per step.  Usage::

    python benchmarks/upq_qat.py --steps 20 --threads 2 > benchmarks/results/upq_qat.txt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _phase(kind: str, steps: int, micro_batch: int, windows: int, ctx: int) -> dict:
    import torch

    from q2lab.calib.store import CalibSpec, calibrate, calibration_windows
    from q2lab.finetune.qat import DistillSet, QATRun
    from q2lab.models import load_model
    from q2lab.quant import make_config
    from q2lab.quant.model import quantize_model

    loaded = load_model("smollm2-135m")
    store = calibrate(loaded, CalibSpec("wikitext2", windows=32, ctx=512, seed=0))
    data = DistillSet.from_windows(calibration_windows(loaded, store, windows, ctx), {"kind": "text"})
    qat = {"data": "text", "sequences": windows, "ctx": ctx, "steps": steps, "micro_batch": micro_batch}
    cfg = make_config("upq", {"qat": qat})
    from q2lab.quant.finetune_option import qat_of

    q = qat_of(cfg)
    box: dict = {}

    def tuner(model):
        run = QATRun(model, cfg, q, data)
        if kind == "float":  # the peer: train the float weights, no fake quantization
            run._student = lambda: _float_student(model)  # type: ignore[method-assign]
            run._harden = lambda layers: None  # type: ignore[method-assign]
        box["run"] = run
        return run

    if kind == "float":
        stats = tuner(loaded.model).finish()
    else:
        report = quantize_model(loaded.model, "upq", cfg, store, tuner=tuner)
        stats = report.finetune or {}
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "kind": kind,
        "tokens_per_s": stats.get("tokens_per_s"),
        "train_s": stats.get("train_s"),
        "valid_jsd_before": stats.get("valid_jsd_before"),
        "valid_jsd_after": stats.get("valid_jsd_after"),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def _float_student(model):
    """Every decoder linear's weight trainable as is (the peer's parameters)."""
    from torch import nn

    from q2lab.models.arch import find_decoder

    layout = find_decoder(model)

    class FloatLayer:  # the interface QATRun._train reads: .latent and .scales
        def __init__(self, lin: nn.Linear) -> None:
            self.latent = lin.weight
            self.scales = nn.Parameter(lin.weight.new_zeros(1))  # untouched by the loss

    return {
        layout.full_name(b, n): FloatLayer(m)
        for b in range(len(layout))
        for n, m in layout.block_linears(b).items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", choices=["upq", "float"])
    args = ap.parse_args()
    if args.phase:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_phase(args.phase, args.steps, args.micro_batch, args.windows, args.ctx)))
        return
    rows = []
    for phase in ("upq", "float"):
        t0 = time.time()
        out = subprocess.run(
            [sys.executable, __file__, "--phase", phase, *sys.argv[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, "Q2LAB_QUIET": "1"},
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
    upq, peer = rows
    print(
        f"# {time.strftime('%Y-%m-%d')}, SmolLM2-135M-Instruct, {args.threads} threads, "
        f"{args.steps} steps × {args.micro_batch} windows of {args.ctx} tokens"
    )
    for r in rows:
        print(json.dumps(r))
    print(f"ratio tokens/s (upq qat / float fine-tuning): {upq['tokens_per_s'] / peer['tokens_per_s']:.2f}")
    print(f"ratio peak RSS (upq qat / float fine-tuning): {upq['max_rss_mib'] / peer['max_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
