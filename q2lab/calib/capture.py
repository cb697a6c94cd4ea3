"""Block-by-block streaming of calibration windows through a decoder.

Why streaming: a model's Hessians for every layer at once do not fit in memory for large
models (an 11B Mistral has ≈ 80 GB of float64 Hessians), and holding every window's
activations for every layer is worse.  So we run the model one decoder block at a time:

1. one forward pass on one window, with every block replaced by a recorder that passes its
   input on, records the keyword arguments the model passes each block (attention masks,
   rotary embeddings, ...), since these differ per block in some architectures (Gemma 3
   alternates local and global attention);
2. the inputs of block 0 for all windows are captured and written to a disk buffer;
3. for each block: attach Hessian hooks to its linears, run every window through it, write
   its outputs to a second disk buffer (the next block's inputs), store its Hessians, swap.

Memory is one block's activations for one window plus that block's Hessians, independent of
the number of windows (buffers are on disk, read back one window at a time); for a model loaded
out of core (:mod:`q2lab.models.lazy`) the block's weights are read from disk when its turn
comes and dropped after it.  Linears fed the same tensor (q/k/v, gate/up) share one accumulator.

Mixture-of-experts blocks (:class:`~q2lab.models.arch.UnfusedExperts`) give each expert the
Hessian of the tokens routed to it.  An expert that received fewer than ``min_expert_tokens``
tokens would get a low-rank, noisy Hessian fitted to a handful of tokens, so the block is run
once more with that expert *dense* (on every token, weighted by a routing weight of 0 where it
was not chosen: the block's output does not change) and its Hessian comes from all tokens; the
routed counts are returned so the store can list them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from q2lab.calib.hessian import Hessian, HessianAccumulator
from q2lab.models.arch import EXPERT_LINEARS, DecoderLayout, UnfusedExperts, find_decoder
from q2lab.models.lazy import resident
from q2lab.utils.progress import progress


class ActivationBuffer:
    """(n_windows, ctx, width) float32 activations in a file, read/written one window at a time."""

    def __init__(self, directory: Path, name: str, n: int, ctx: int, width: int) -> None:
        self.path = Path(directory) / f"{name}.f32"
        self.shape = (ctx, width)
        self.window_bytes = ctx * width * 4
        self.n = n
        with open(self.path, "wb") as f:
            f.truncate(n * self.window_bytes)

    def write(self, i: int, x: torch.Tensor) -> None:
        data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        assert len(data) == self.window_bytes, (x.shape, self.shape)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, i * self.window_bytes)
        finally:
            os.close(fd)

    def read(self, i: int, device: torch.device | str = "cpu") -> torch.Tensor:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.window_bytes, i * self.window_bytes)
        finally:
            os.close(fd)
        arr = np.frombuffer(data, dtype=np.float32).reshape(self.shape)
        return torch.from_numpy(arr.copy()).unsqueeze(0).to(device)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted input is captured."""


@dataclass
class BlockCall:
    """The extra positional and keyword arguments the model passes one decoder block."""

    args: tuple
    kwargs: dict[str, Any]


def capture_block_calls(model: nn.Module, layout: DecoderLayout, window: torch.Tensor) -> list[BlockCall]:
    """Record each block's call arguments during one forward pass of ``window`` (1 × ctx).

    The blocks themselves do not run: each is replaced for the pass by a recorder that hands its
    input on unchanged (the arguments — masks, rotary tables, cache positions — are computed
    before the first block and do not depend on block outputs), and the pass stops after the
    last block.  So recording costs an embedding lookup, and works on an out-of-core model whose
    blocks are not in memory (:mod:`q2lab.models.lazy`)."""
    calls: list[BlockCall | None] = [None] * len(layout)
    last = len(layout) - 1

    def make_recorder(i: int) -> Callable:
        def record(*args, **kwargs):
            calls[i] = BlockCall(tuple(args[1:]), dict(kwargs))
            if i == last:
                raise _Stop
            return _hidden_of(args, kwargs)

        return record

    try:
        for i, blk in enumerate(layout.layers):
            blk.forward = make_recorder(i)  # instance attribute: nn.Module.__call__ calls it
        with torch.no_grad(), contextlib.suppress(_Stop):
            model(input_ids=window, use_cache=False)
    finally:
        for blk in layout.layers:
            blk.__dict__.pop("forward", None)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} were not called during a forward pass")
    return calls  # type: ignore[return-value]


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, layout: DecoderLayout, windows: torch.Tensor, buf: ActivationBuffer
) -> None:
    """Write block 0's input hidden states for every window into ``buf`` (no full forward)."""
    device = next(model.parameters()).device
    store: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        store["h"] = _hidden_of(args, kwargs)
        raise _Stop

    handle = layout.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(windows.shape[0]):
            with contextlib.suppress(_Stop):
                model(input_ids=windows[i : i + 1].to(device), use_cache=False)
            buf.write(i, store.pop("h")[0])
    finally:
        handle.remove()


class _BlockHessians:
    """Forward pre-hooks on a block's linears; inputs shared by several linears are counted once."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.groups: dict[str, str] = {}  # linear → group leader (first linear fed that tensor)
        self.acc: dict[str, HessianAccumulator] = {}
        # Tensors seen in the current window, kept alive so identity checks cannot be fooled
        # by the allocator reusing a freed tensor's memory.
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Linear, args):
            x = args[0]
            if name not in self.groups:  # first window: discover which linears share an input
                leader = next((ldr for t, ldr in self._seen if t is x), name)
                if leader == name:
                    self._seen.append((x, name))
                self.groups[name] = leader
                if leader == name:
                    self.acc[name] = HessianAccumulator(mod.in_features, device=x.device)
            if self.groups[name] == name:
                self.acc[name].add(x)

        return hook

    def start_window(self) -> None:
        self._seen.clear()

    def close(self) -> dict[str, Hessian]:
        for h in self._handles:
            h.remove()
        return {name: acc.result() for name, acc in self.acc.items()}


MIN_EXPERT_TOKENS = 128


def _starved_experts(
    block: nn.Module, groups: dict[str, str], hessians: dict[str, Hessian], min_tokens: int
) -> dict[str, dict[int, int]]:
    """Expert lists in ``block`` → {expert index: tokens routed to it} for experts below ``min_tokens``."""
    starved: dict[str, dict[int, int]] = {}
    for path, mod in block.named_modules():
        if not isinstance(mod, UnfusedExperts):
            continue
        for e in range(len(mod)):
            leader = groups.get(f"{path}.{e}.{EXPERT_LINEARS[0]}")
            n = hessians[leader].n if leader else 0
            if n < min_tokens:
                starved.setdefault(path, {})[e] = n
    return starved


def _dense_pass(
    block: nn.Module, starved: dict[str, dict[int, int]], run: Callable[[_BlockHessians], None]
) -> tuple[dict[str, Hessian], dict[str, str]]:
    """Hessians of the ``starved`` experts' linears with those experts run on every token."""
    linears = {
        f"{path}.{e}.{name}": block.get_submodule(f"{path}.{e}.{name}")
        for path, experts in starved.items()
        for e in experts
        for name in EXPERT_LINEARS
    }
    lists = {path: block.get_submodule(path) for path in starved}
    for path, mod in lists.items():
        mod.dense = frozenset(starved[path])
    hooks = _BlockHessians(linears)
    try:
        run(hooks)
    finally:
        hessians = hooks.close()
        for mod in lists.values():
            mod.dense = frozenset()
    return hessians, dict(hooks.groups)


@torch.no_grad()
def stream_hessians(
    model: nn.Module,
    windows: torch.Tensor,
    on_block: Callable[[int, dict[str, Hessian], dict[str, str]], None],
    workdir: Path | None = None,
    min_expert_tokens: int | None = None,
) -> dict[str, int]:
    """Compute every block's Hessians from the float model, calling ``on_block`` per block.

    ``on_block(i, hessians_by_leader, linear_to_leader)`` receives the block's accumulated
    Hessians (keyed by the leader linear of each shared-input group) and the group map.
    Returns, for MoE experts whose Hessian fell back to all tokens (fewer than
    ``min_expert_tokens``, default :data:`MIN_EXPERT_TOKENS`, were routed to them), linear (full
    name) → the number of tokens that were routed to it.
    """
    min_tokens = MIN_EXPERT_TOKENS if min_expert_tokens is None else min_expert_tokens
    layout = find_decoder(model)
    device = next(model.parameters()).device
    n, ctx = windows.shape
    width = model.get_input_embeddings().embedding_dim
    calls = capture_block_calls(model, layout, windows[:1].to(device))
    with tempfile.TemporaryDirectory(prefix="q2lab-act-", dir=workdir) as tmp:
        cur = ActivationBuffer(Path(tmp), "a", n, ctx, width)
        nxt = ActivationBuffer(Path(tmp), "b", n, ctx, width)
        capture_block_inputs(model, layout, windows, cur)
        fallbacks: dict[str, int] = {}
        for b in progress(range(len(layout)), "calibration", len(layout), unit="block"):
            with resident(model, b):  # an out-of-core model reads the block from disk here
                fallbacks.update(
                    _block_hessians(layout, b, calls[b], cur, nxt, n, device, min_tokens, on_block)
                )
            cur, nxt = nxt, cur
    return fallbacks


def _block_hessians(
    layout: DecoderLayout,
    b: int,
    call: BlockCall,
    cur: ActivationBuffer,
    nxt: ActivationBuffer,
    n: int,
    device: torch.device,
    min_tokens: int,
    on_block: Callable[[int, dict[str, Hessian], dict[str, str]], None],
) -> dict[str, int]:
    """One block of :func:`stream_hessians`: its Hessians (to ``on_block``), its outputs (to
    ``nxt``) and the MoE experts whose Hessian fell back to every token."""
    block = layout.layers[b]

    def run(hooks: _BlockHessians, write: bool) -> None:
        for i in range(n):
            hooks.start_window()
            out = block(cur.read(i, device), *call.args, **call.kwargs)
            if write:
                nxt.write(i, _block_output(out)[0])

    hooks = _BlockHessians(layout.block_linears(b))
    try:
        run(hooks, write=True)
    finally:
        hessians = hooks.close()
    groups = dict(hooks.groups)
    fallbacks: dict[str, int] = {}
    starved = _starved_experts(block, groups, hessians, min_tokens)
    if starved:
        dense_h, dense_g = _dense_pass(block, starved, lambda h: run(h, write=False))
        hessians.update(dense_h)
        groups.update(dense_g)
        for path, experts in starved.items():
            for e, routed in experts.items():
                for name in EXPERT_LINEARS:
                    fallbacks[layout.full_name(b, f"{path}.{e}.{name}")] = routed
    on_block(b, hessians, groups)
    return fallbacks
