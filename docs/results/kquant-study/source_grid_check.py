"""How much of a K-quant cell's quality comes from the reference being a dequantized GGUF?

Both packaged models are GGUF files (SmolLM2: Q4_1; Gemma-3-270M: Q4_K_M), so their "float"
weights already lie on a quantization grid.  Requantizing a tensor into the type it came from
can re-find that grid and lose almost nothing, an advantage real float weights never give.
For every block linear this script requantizes the reference weights (first ``ROWS`` rows)
into (a) the source file's own type and (b) that type again, but on Gaussian weights of the
same shape and RMS, and prints the mean relative squared error per source type.  A ratio far
above 1 means cells that reuse the source's type per tensor (Q4_K_M on Gemma, Q4_1 on SmolLM2)
are optimistic and must be read with that caveat.  A second table does the same for every
type of the study (plain, no importance matrix): a type whose error on the reference is much
lower than on Gaussian weights, relative to the others, has an unfair edge in the study, and one
whose error is higher (a grid that aliases against the source's) an unfair handicap.

Run: ``PYTHONPATH=. python docs/results/kquant-study/source_grid_check.py [smollm2-135m|gemma3-270m]``
(≈ 10–30 s per model; reads the GGUF directly, no transformers model is built).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import gguf
import numpy as np

from q2lab.models.zoo import fetch
from q2lab.quant.ggml.types import ggml_type

ROWS = 128
STUDY_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")


def rel_mse(type_name: str, x: np.ndarray) -> float:
    t = ggml_type(type_name)
    back = t.dequantize_rows(t.quantize_rows(x, None), x.shape[1])
    return float(((back - x) ** 2).mean() / (x**2).mean())


def linears(reader) -> list[tuple[str, np.ndarray]]:
    """(source type, first ROWS rows as float32) of every block linear."""
    out = []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if not t.name.startswith("blk.") or len(t.shape) != 2 or kind in ("F32", "F16"):
            continue
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))[:ROWS]
        out.append((kind, np.ascontiguousarray(x, dtype=np.float32)))
    return out


def main(alias: str) -> None:
    reader = gguf.GGUFReader(str(fetch(alias, quiet=True)))
    rng = np.random.default_rng(0)
    own: dict[str, list[float]] = defaultdict(list)
    gauss: dict[str, list[float]] = defaultdict(list)
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i, (kind, x) in enumerate(linears(reader)):
        g = (rng.standard_normal(x.shape) * np.sqrt((x**2).mean())).astype(np.float32)
        own[kind].append(rel_mse(kind, x))
        gauss[kind].append(rel_mse(kind, g))
        if i % 3:  # every third tensor is enough for the per-type table
            continue
        for name in STUDY_TYPES:
            if ggml_type(name).can_hold(x.shape[1]):
                by_type[name].append((rel_mse(name, x), rel_mse(name, g)))
    print(f"{alias}: requantizing the reference's linears into their own source type")
    print("| source type | tensors | rel. MSE, reference weights | rel. MSE, Gaussian | ratio |")
    print("|---|---:|---:|---:|---:|")
    for kind in sorted(own):
        a, b = float(np.mean(own[kind])), float(np.mean(gauss[kind]))
        ratio = f"{b / a:.0f}×" if a > 0 else "∞ (exact)"
        print(f"| {kind} | {len(own[kind])} | {a:.2e} | {b:.2e} | {ratio} |")
    print(f"\n{alias}: every study type on the reference's linears (plain) vs on Gaussian weights")
    print("| type | tensors | rel. MSE, reference | rel. MSE, Gaussian | reference / Gaussian |")
    print("|---|---:|---:|---:|---:|")
    for name in STUDY_TYPES:
        if by_type[name]:
            ref, gau = (float(np.mean(v)) for v in zip(*by_type[name]))
            print(f"| {name} | {len(by_type[name])} | {ref:.2e} | {gau:.2e} | {ref / gau:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m")
