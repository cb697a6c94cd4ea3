"""Greedy generation over the chat suite: q2lab's batched decoder against transformers'
``model.generate`` on the same rendered prompts, lengths and batches (issue 14, part 3).

Both decode the same prompts greedily in left-padded batches grouped by max_new_tokens (128, or
256 for long-form writing), stopping rows at EOS.  Printed: seconds, new tokens, tokens/s, the
ratio ``transformers s / q2lab s``, and how many prompts got identical tokens from both (greedy
decoding of the same model; padding can flip a near-tie).  ``--limit N`` times the first N
prompts of the suite for both; ``--full`` also times q2lab alone on the whole suite.

    Q2LAB_DATA=../shared/data python benchmarks/chat_suite_speed.py --limit 64 --full
"""

from __future__ import annotations

import argparse
import time

import torch

from q2lab.eval import generation as gen
from q2lab.eval.kinds.gen import _prompts
from q2lab.eval.tasks import parse_task
from q2lab.models import load_model


def _rendered(lm, limit: int | None):
    return _prompts(lm, parse_task({"task": "gen:chat_suite", "limit": limit}))


def _q2lab(lm, prompts, batch_size: int) -> tuple[float, list[tuple[int, ...]]]:
    t = time.perf_counter()
    samples = gen.generate(lm, prompts, max_new_tokens=prompts.lengths, batch_size=batch_size)
    return time.perf_counter() - t, [s.token_ids for s in samples]


@torch.no_grad()
def _transformers(lm, prompts, batch_size: int) -> tuple[float, list[tuple[int, ...]]]:
    stop = gen.eos_ids(lm)
    out: dict[int, tuple[int, ...]] = {}
    t = time.perf_counter()
    for n in sorted(set(prompts.lengths)):
        idx = [i for i, m in enumerate(prompts.lengths) if m == n]
        for s in range(0, len(idx), batch_size):
            batch = idx[s : s + batch_size]
            enc = [gen.encode_prompt(lm, prompts.prompts[i]) for i in batch]
            ids, mask = gen._left_pad(enc, stop[0])
            res = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop[0],
            )
            for i, row in zip(batch, res[:, ids.shape[1] :].tolist()):
                cut = next((k for k, tok in enumerate(row) if tok in stop), len(row))
                out[i] = tuple(row[:cut])
    return time.perf_counter() - t, [out[i] for i in range(len(prompts.prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="also time q2lab on the whole suite")
    args = ap.parse_args()
    lm = load_model(args.model)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    prompts = _rendered(lm, args.limit)
    print(f"{len(prompts.prompts)} prompts, rendering: {prompts.rendering}")
    s_q, toks_q = _q2lab(lm, prompts, args.batch_size)
    s_t, toks_t = _transformers(lm, prompts, args.batch_size)
    n_q, n_t = sum(map(len, toks_q)), sum(map(len, toks_t))
    same = sum(a == b for a, b in zip(toks_q, toks_t))
    print(f"q2lab         {s_q:8.1f} s  {n_q:6d} tokens  {n_q / s_q:6.1f} tok/s")
    print(f"transformers  {s_t:8.1f} s  {n_t:6d} tokens  {n_t / s_t:6.1f} tok/s")
    print(f"ratio transformers s / q2lab s: {s_t / s_q:.2f}", end="; ")
    print(f"identical tokens on {same} of {len(toks_q)} prompts")
    if args.full:
        full = _rendered(lm, None)
        s_f, toks_f = _q2lab(lm, full, args.batch_size)
        n_f = sum(map(len, toks_f))
        print(f"q2lab, whole suite: {len(full.prompts)} prompts, {s_f:.1f} s, {n_f} tokens", end=", ")
        print(f"{n_f / s_f:.1f} tok/s")


if __name__ == "__main__":
    main()
