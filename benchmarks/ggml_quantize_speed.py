"""How fast are q2lab's GGML quantizers compared with llama.cpp's C code, on the same weights?

For every type, quantizes the same float matrices (SmolLM2-135M's linears when the packaged
model is available, else random matrices of the same shapes; rows of 576 are cut to 512 so
256-block types apply) with q2lab (vectorised NumPy, bit-exact) and with llama.cpp's
``ggml_quantize_chunk`` through llama-cpp-python, one thread each, in the same run.  Prints
seconds per million weights and the ratio ``q2lab / llama.cpp`` (lower is better; the K-quant
target is ≤ 3), and checks that the bytes are identical while at it.

    python benchmarks/ggml_quantize_speed.py [--quick] [--imatrix] [--types Q3_K,IQ3_S] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from q2lab.utils.timing import best_of

os.environ.setdefault("OMP_NUM_THREADS", "1")

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ3_S"]
IQ2 = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]  # importance-only: timed with --imatrix


def matrices(quick: bool) -> list[np.ndarray]:
    """SmolLM2 weights (first layers) cut to multiples of 256 columns, or random stand-ins."""
    layers = 1 if quick else 4
    try:
        from q2lab.models import load_model

        model = load_model("smollm2-135m").model
        out = []
        for i in range(layers):
            blk = model.model.layers[i]
            for lin in (blk.self_attn.q_proj, blk.self_attn.v_proj, blk.mlp.up_proj, blk.mlp.down_proj):
                w = lin.weight.detach().float().numpy()
                out.append(np.ascontiguousarray(w[:, : w.shape[1] // 256 * 256]))
        return out
    except Exception as e:  # the benchmark still runs without the packaged model
        print(f"(SmolLM2 not available: {e}; using random matrices)")
        rng = np.random.default_rng(0)
        shapes = [(576, 512), (192, 512), (1536, 512), (576, 1536)] * layers
        return [(rng.standard_t(5, s) * 0.02).astype(np.float32) for s in shapes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one layer, one repeat")
    ap.add_argument("--imatrix", action="store_true", help="also time the importance-weighted paths and IQ2")
    ap.add_argument("--types", help="comma-separated subset of the types to time (default: all)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    from q2lab.quant.ggml import llamacpp
    from q2lab.quant.ggml.types import ggml_type

    if not llamacpp.available():
        raise SystemExit("llama-cpp-python is not installed (pip install 'q2lab[llamacpp]'): no peer")
    mats = matrices(args.quick)
    n_weights = sum(m.size for m in mats)
    repeat = 1 if args.quick else 3
    rng = np.random.default_rng(1)
    cases = [(t, False) for t in TYPES]
    if args.imatrix:
        cases += [(t, True) for t in TYPES + IQ2]
    if args.types:
        keep = {t.strip().upper() for t in args.types.split(",")}
        cases = [c for c in cases if c[0] in keep]
    rows = []
    print(f"{n_weights / 1e6:.2f} M weights in {len(mats)} matrices, 1 thread each")
    print(f"{'type':<9}{'imatrix':<9}{'q2lab s/Mw':>12}{'llama s/Mw':>12}{'ratio':>8}  bytes")
    for name, with_im in cases:
        t = ggml_type(name)
        qws = [(rng.random(m.shape[1]) + 0.1).astype(np.float32) if with_im else None for m in mats]
        for m, qw in zip(mats, qws):  # warm-up: codebooks, llama.cpp's IQ2 tables
            t.quantize_rows(m[:8], qw)
            llamacpp.quantize_chunk(int(t.qtype), m[:8], qw)
        ours = best_of(lambda t=t, qws=qws: [t.quantize_rows(m, q) for m, q in zip(mats, qws)], repeat)
        tid = int(t.qtype)
        peer = best_of(
            lambda tid=tid, qws=qws: [llamacpp.quantize_chunk(tid, m, q) for m, q in zip(mats, qws)], repeat
        )
        same = all(
            np.array_equal(t.quantize_rows(m, qw), llamacpp.quantize_chunk(int(t.qtype), m, qw))
            for m, qw in zip(mats, qws)
        )
        row = {
            "type": name,
            "imatrix": with_im,
            "q2lab_s_per_mw": ours / n_weights * 1e6,
            "llamacpp_s_per_mw": peer / n_weights * 1e6,
            "ratio": ours / peer,
            "identical": same,
        }
        rows.append(row)
        print(
            f"{name:<9}{with_im!s:<9}{row['q2lab_s_per_mw']:>12.3f}{row['llamacpp_s_per_mw']:>12.3f}"
            f"{row['ratio']:>8.2f}  {'identical' if same else 'DIFFER'}"
        )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"machine": platform.platform(), "cpu": platform.processor()}
            json.dump(meta | {"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
