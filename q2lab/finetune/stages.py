"""The two fine-tuning stages, driven by :func:`q2lab.quant.model.quantize_model`.

Stage 1 (within-block, as QuIP#): before block b is rounded, the float block is run on its
inputs *from the quantized prefix* (blocks 0..b−1 already quantized and tuned) and its outputs
are kept as targets; after rounding, the block's continuous parameters (:mod:`.relax`: norm
weights, per-matrix scale, sign vectors relaxed to gains) are tuned by Adam to match them on the
training windows, early-stopped on the held-out ones; then the tuned block's outputs become the
next block's inputs.  Inputs and targets live in on-disk buffers read one window at a time, and
only one block is ever relaxed, so memory is one block's work plus the model.

Stage 2 (end-to-end): KL(float ‖ quantized) of the next-token distributions over the same
windows and the same parameters, all blocks at once.  The float model's log-probs are computed
*before* any block is rounded (the model is quantized in place, so the two models never coexist)
and cached on disk as fp16 top-k values + int32 ids (:func:`.train.topk_kl`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from q2lab.calib.capture import (
    ActivationBuffer,
    _block_output,
    capture_block_calls,
    capture_block_inputs,
)
from q2lab.finetune.pv import pv_fit
from q2lab.finetune.relax import relaxed
from q2lab.finetune.train import fit, topk_kl
from q2lab.models.arch import find_decoder
from q2lab.quant.finetune_option import FinetuneConfig
from q2lab.utils.progress import progress


class TeacherCache:
    """The float model's top-k next-token log-probs per window, on disk (fp16 + int32)."""

    def __init__(self, directory: Path, model: nn.Module, windows: torch.Tensor, k: int) -> None:
        n, ctx = windows.shape
        self.logp = np.lib.format.open_memmap(directory / "t_logp.npy", "w+", np.float16, (n, ctx, k))
        self.idx = np.lib.format.open_memmap(directory / "t_idx.npy", "w+", np.int32, (n, ctx, k))
        with torch.no_grad():
            for i in progress(range(n), "finetune: teacher log-probs", n, unit="window"):
                logits = model(input_ids=windows[i : i + 1], use_cache=False).logits[0].float()
                lp, ix = torch.log_softmax(logits, -1).topk(k, dim=-1)
                self.logp[i] = lp.half().cpu().numpy()
                self.idx[i] = ix.int().cpu().numpy()

    def get(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.logp[i])).to(device), torch.from_numpy(
            np.array(self.idx[i])
        ).to(device)


class FinetuneRun:
    """State of one model's fine-tuning across :func:`quantize_model`'s block loop."""

    def __init__(self, model: nn.Module, ft: FinetuneConfig, windows: torch.Tensor) -> None:
        self.model, self.ft = model, ft
        self.layout = find_decoder(model)
        self.device = next(model.parameters()).device
        ctx = ft.ctx or windows.shape[1]
        self.windows = windows[: ft.windows, :ctx].to(self.device)
        n = self.windows.shape[0]
        self.valid_ids = list(range(n - ft.n_valid, n))
        self.train_ids = list(range(n - ft.n_valid))
        self._tmp = tempfile.TemporaryDirectory(prefix="q2lab-ft-")
        tmp = Path(self._tmp.name)
        self.stats: dict[str, Any] = {"config": vars(ft).copy(), "windows": n, "ctx": ctx, "blocks": []}
        self.teacher = TeacherCache(tmp, model, self.windows, ft.topk) if ft.e2e_epochs else None
        if ft.block_epochs:
            width = model.get_input_embeddings().embedding_dim
            self.calls = capture_block_calls(model, self.layout, self.windows[:1])
            self.inputs = ActivationBuffer(tmp, "x", n, ctx, width)
            self.targets = ActivationBuffer(tmp, "y", n, ctx, width)
            capture_block_inputs(model, self.layout, self.windows, self.inputs)

    # ------------------------------------------------------------------ stage 1
    def _run_block(self, b: int, x: torch.Tensor) -> torch.Tensor:
        call = self.calls[b]
        return _block_output(self.layout.layers[b](x, *call.args, **call.kwargs))

    @torch.no_grad()
    def before_block(self, b: int) -> None:
        """Record the float block's outputs on the quantized prefix's inputs (the targets)."""
        if not self.ft.block_epochs:
            return
        for i in range(self.inputs.n):
            self.targets.write(i, self._run_block(b, self.inputs.read(i, self.device))[0])

    def after_block(self, b: int) -> None:
        """Tune block ``b``'s continuous parameters, write them back, advance the inputs."""
        if not self.ft.block_epochs:
            return
        block = self.layout.layers[b]

        def loss_of(i: int) -> torch.Tensor:
            y = self.targets.read(i, self.device)
            err = self._run_block(b, self.inputs.read(i, self.device)) - y
            return err.square().mean() / y.square().mean()

        with relaxed(block, self.ft.gains) as params:
            before, after, rounds = self._fit(block, params, loss_of, self.ft.block_epochs, b, f"block {b}")
        entry = {"block": b, "valid_rel_mse_before": before, "valid_rel_mse_after": after}
        self.stats["blocks"].append({**entry, "pv_rounds": rounds} if rounds else entry)
        with torch.no_grad():
            for i in range(self.inputs.n):
                self.inputs.write(i, self._run_block(b, self.inputs.read(i, self.device))[0])

    # ------------------------------------------------------------------ stage 2
    def finish(self) -> dict[str, Any]:
        """Stage 2 (end-to-end KL), then clean up; returns the statistics for the report."""
        try:
            if self.teacher is not None:
                self._end_to_end()
        finally:
            self._tmp.cleanup()
        return self.stats

    def _end_to_end(self) -> None:
        assert self.teacher is not None
        teacher = self.teacher

        def loss_of(i: int) -> torch.Tensor:
            logits = self.model(input_ids=self.windows[i : i + 1], use_cache=False).logits[0]
            return topk_kl(logits, *teacher.get(i, self.device))

        with relaxed(self.model, self.ft.gains) as params:
            before, after, rounds = self._fit(
                self.model, params, loss_of, self.ft.e2e_epochs, 10_000, "end-to-end"
            )
        self.stats["e2e"] = {"valid_kl_before": before, "valid_kl_after": after}
        if rounds:
            self.stats["e2e"]["pv_rounds"] = rounds

    def _fit(
        self, root: nn.Module, params: list, loss_of: Any, epochs: int, seed: int, what: str
    ) -> tuple[float, float, list[dict[str, float]]]:
        """Continuous tuning (:func:`fit`), or with ``mode: pv`` P epochs alternating with V
        steps on the codebook layers (:func:`q2lab.finetune.pv.pv_fit`)."""
        ft = self.ft
        if ft.mode == "pv":
            return pv_fit(
                root,
                params,
                loss_of,
                self.train_ids,
                self.valid_ids,
                epochs,
                ft.lr,
                ft.v_frac,
                ft.v_lr,
                seed=seed,
                desc=f"pv-tune {what}",
            )
        before, after = fit(
            params, loss_of, self.train_ids, self.valid_ids, epochs, ft.lr, seed=seed, desc=f"finetune {what}"
        )
        return before, after, []
