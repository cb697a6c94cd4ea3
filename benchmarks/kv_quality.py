"""What a quantized KV cache costs in likelihood: q2lab's KIVI cache next to transformers' own
``QuantizedCache`` (quanto and HQQ backends), on the same windows, fed the same way.

Every case scores the same WikiText-2 test windows of a float model: each window is fed in
chunks of ``group`` tokens through a fresh cache, so every chunk attends to the quantized past as
decoding does (q2lab's ``kv`` tasks do exactly this), and is compared with the float model's
own log-probs on the window (one full pass, cached once).  Per case: perplexity, its change from
the float cache, mean KLD to the float model with a bootstrap CI over windows, top-1 agreement,
and the scoring speed.  Same bits, residual length and group size for every backend; what
differs is each one's layout:

* q2lab (``q2lab/quant/kv.py``, KIVI): keys per channel over ``group`` tokens, values per token
  over ``group`` channels, the last ``residual`` … ``residual + group − 1`` tokens in float;
* transformers ``QuantizedCache`` (quanto / HQQ): keys and values quantized per token along the
  head dimension in groups of ``q_group_size`` (quanto ``axis 0`` / HQQ ``axis 1`` defaults),
  and whenever the float part exceeds ``residual_length`` *everything* is re-quantized, so its
  float window is 0 … ``residual_length`` tokens.

Usage::

    python benchmarks/kv_quality.py --ctx 512 --windows 16 --threads 2 > benchmarks/results/kv_quality.txt
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from q2lab.eval.stats import bootstrap_ci

RESIDUAL, GROUP = 128, 32


def _bootstrap(per_window: np.ndarray) -> tuple[float, float]:
    """95 % percentile CI of the mean over windows (2000 resamples, seed 0: the published runs')."""
    return bootstrap_ci(per_window, n_resamples=2000, seed=0)


def run_case(model, windows, reference, kv) -> dict:
    """Score ``windows`` through one cache (``kv`` None: the plain float cache, one pass; its
    ``backend`` picks q2lab's cache or a transformers peer)."""
    from q2lab.eval.likelihood import score_windows

    t0 = time.perf_counter()
    stats = score_windows(model, windows, reference, desc=kv.backend if kv else "float", kv=kv)
    seconds = time.perf_counter() - t0
    tokens = np.array(stats.tokens, dtype=np.float64)
    kld_window = np.array([k.mean() for k in stats.kld])
    return {
        "ppl": float(np.exp(sum(stats.nll) / tokens.sum())),
        "nll_window": np.array(stats.nll) / tokens,
        "kld": float(np.concatenate(stats.kld).mean()),
        "kld_ci": _bootstrap(kld_window),
        "top1": sum(stats.top1) / tokens.sum(),
        "tok_s": windows.numel() / seconds,
        # q2lab counts its packed format; a peer's cache is not introspected (printed as –)
        "kv_bytes_per_token": stats.kv_bytes_per_token,
        "float_bytes_per_token": stats.kv_float_bytes_per_token,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--bits", default="4,2", help="comma-separated KV bit widths")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--backends", default="q2lab,quanto,hqq")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from q2lab.data.text import corpus_windows, load_corpus
    from q2lab.eval.likelihood import ReferenceCache
    from q2lab.models import load_model
    from q2lab.quant.kv import KVConfig

    loaded = load_model(a.model)
    corpus = load_corpus("wikitext2", role="eval")
    windows = corpus_windows(loaded, corpus, a.windows, a.ctx)
    print(
        f"# {a.model}, {windows.shape[0]} × {a.ctx}-token WikiText-2 test windows, {a.threads} threads, "
        f"residual {RESIDUAL}, group {GROUP}; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="q2lab-kvq-") as tmp:
        reference = ReferenceCache.build(loaded.model, windows, os.path.join(tmp, "ref.f16"), "kvq")
        base = run_case(loaded.model, windows, reference, None)
        rows = [("float cache", base)]
        for bits in (int(b) for b in a.bits.split(",")):
            for backend in a.backends.split(","):
                name = f"{backend} {bits}-bit"
                try:
                    kv = KVConfig(bits=bits, residual=RESIDUAL, group=GROUP, backend=backend)
                    r = run_case(loaded.model, windows, reference, kv)
                except Exception as e:  # a peer that does not install or refuses the setting
                    print(f"{name:<16} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                rows.append((name, r))
    print(
        f"{'cache':<16} {'ppl':>8} {'Δppl':>7} {'Δnll/token [95% CI]':>24} {'KLD [95% CI]':>26} "
        f"{'top-1':>6} {'tok/s':>7} {'bytes/token':>12}"
    )
    for name, r in rows:
        d = r["nll_window"] - base["nll_window"]
        lo, hi = _bootstrap(d)
        bpt = "–" if r["kv_bytes_per_token"] is None else f"{r['kv_bytes_per_token']:.0f}"
        if name == "float cache":
            bpt = f"{base.get('float_bytes_per_token') or _float_bpt(loaded.model):.0f}"
        print(
            f"{name:<16} {r['ppl']:8.3f} {r['ppl'] - base['ppl']:+7.3f} "
            f"{d.mean():+8.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"{r['kld']:8.4f} [{r['kld_ci'][0]:.4f}, {r['kld_ci'][1]:.4f}] "
            f"{r['top1']:6.3f} {r['tok_s']:7.0f} {bpt:>12}",
            flush=True,
        )


def _float_bpt(model) -> float:
    from q2lab.quant.kv import float_bytes_per_token

    return float_bytes_per_token(model)


if __name__ == "__main__":
    main()
