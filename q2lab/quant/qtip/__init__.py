"""QTIP: incoherence processing + trellis-coded quantization with computed codes (Tseng et al., 2024).

* :mod:`.trellis` — the bitshift trellis (states, tail-biting, packing);
* :mod:`.codes` — 1MAD, 3INST, HYB computed codes and a random Gaussian codebook;
* :mod:`.viterbi` — vectorized, memory-bounded Viterbi search;
* :mod:`.method` — the registered ``qtip`` method (RHT + BlockLDLQ over trellis tiles).
"""
