"""UPQ's stage 2: INT4 → INT2 quantization-aware training by distillation (arXiv 2506.09104).

The student is the quantized model itself.  Once every block holds its stage-1 INT4 weight,
each UPQ linear becomes a :class:`SEQTrainLinear`: a latent float weight (initialised from the
INT4 one) seen through the SEQ INT2 grid of learnable group steps (initialised by an MSE fit),
straight-through for the weight, LSQ-style for the steps (:func:`q2lab.quant.uniform.fake_quant_seq`).
Adam trains the latents and steps — nothing else — to minimise the generalized Jensen–Shannon
divergence (:func:`q2lab.finetune.train.topk_jsd`) between the float teacher's next-token
distributions and the student's, on a :class:`DistillSet`: answers the teacher wrote to seed
prompts (``data: self``, built by :mod:`q2lab.eval.distill`) or calibration-corpus windows
(``data: text``, the ablation).

Bounded memory: the teacher's distributions are computed before any block is rounded (the model
is quantized in place, so teacher and student never coexist) and kept on disk as top-k fp16
log-probs + int32 ids of the trained positions only; gradient checkpointing keeps one block's
activations; micro-batches are a few sequences.  Training is resumable: every ``save_every``
steps the latents, steps, Adam state and step count go to ``workdir/state.pt`` (atomically), and a
run that finds a state with the same key continues from it — with a larger ``steps`` it extends a
finished run whose state was kept (an explicit ``workdir``; in the default cache folder the state,
three float copies of the linears, is deleted once the run finishes).  The batch schedule is a
pure function of (seed, step), so a resumed run takes the same batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from q2lab.errors import DataError
from q2lab.finetune.train import topk_jsd
from q2lab.quant import uniform
from q2lab.quant.base import get_quantizer
from q2lab.quant.finetune_option import QATConfig
from q2lab.quant.upq import UPQConfig, seq_init, seq_tensor, stage1_layers
from q2lab.utils.io import atomic_path
from q2lab.utils.progress import progress, progress_bar


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DistillSet:
    """Token sequences to distil on.  ``starts[i]`` is the first position of sequence i whose
    next-token distribution is trained on (the last prompt token for teacher answers, 0 for
    text windows); every later position but the last is trained on too."""

    sequences: tuple[torch.Tensor, ...]
    starts: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sequences:
            raise DataError("the distillation set is empty: no sequences to train on")
        if len(self.starts) != len(self.sequences):
            raise DataError(
                f"{len(self.starts)} start positions for {len(self.sequences)} distillation sequences"
            )
        for i, (s, t) in enumerate(zip(self.sequences, self.starts)):
            if s.ndim != 1 or not 0 <= t < len(s) - 1:
                raise DataError(
                    f"distillation sequence {i}: {tuple(s.shape)} tokens with training from position {t}; "
                    "a sequence needs at least one position after its start"
                )

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for s, t in zip(self.sequences, self.starts):
            h.update(np.asarray(s, dtype=np.int64).tobytes())
            h.update(int(t).to_bytes(8, "little"))
        return h.hexdigest()

    def positions(self, i: int) -> int:
        return len(self.sequences[i]) - 1 - self.starts[i]

    @classmethod
    def from_windows(cls, windows: torch.Tensor, info: dict[str, Any]) -> DistillSet:
        return cls(tuple(w.long().clone() for w in windows), (0,) * len(windows), info)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(
                {"sequences": list(self.sequences), "starts": list(self.starts), "info": self.info}, tmp
            )

    @classmethod
    def load(cls, path: Path) -> DistillSet:
        try:
            d = torch.load(path, weights_only=True)
            return cls(tuple(d["sequences"]), tuple(int(t) for t in d["starts"]), dict(d["info"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.PickleError) as e:
            raise DataError(f"{path}: not a q2lab distillation set ({e})") from e


class TeacherTopK:
    """The teacher's top-k next-token log-probs at every trained position, on disk."""

    def __init__(self, directory: Path, model: nn.Module, data: DistillSet, k: int) -> None:
        counts = [data.positions(i) for i in range(len(data.sequences))]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self.offsets[-1])
        self.logp = np.lib.format.open_memmap(directory / "t_logp.npy", "w+", np.float16, (total, k))
        self.idx = np.lib.format.open_memmap(directory / "t_idx.npy", "w+", np.int32, (total, k))
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in progress(range(len(counts)), "qat: teacher top-k", len(counts), unit="seq"):
                seq, s = data.sequences[i].to(device), data.starts[i]
                logits = model(input_ids=seq[None], use_cache=False).logits[0, s:-1].float()
                lp, ix = torch.log_softmax(logits, -1).topk(k, dim=-1)
                a, b = self.offsets[i], self.offsets[i + 1]
                self.logp[a:b], self.idx[a:b] = lp.half().cpu().numpy(), ix.int().cpu().numpy()

    def get(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return (
            torch.from_numpy(np.array(self.logp[a:b])).to(device),
            torch.from_numpy(np.array(self.idx[a:b])).to(device),
        )


# --------------------------------------------------------------------------- student layers
class SEQTrainLinear(nn.Module):
    """A UPQ linear during QAT: latent weight → SEQ grid of learnable steps → ``F.linear``."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None, bias
    ) -> None:
        super().__init__()
        self.latent = nn.Parameter(weight.detach().float().clone())
        self.scales = nn.Parameter(scales.detach().float().clone())
        self.bits = bits
        self.layout = uniform.GroupLayout.make(weight.shape[1], group_size)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight_q(self) -> torch.Tensor:
        return uniform.fake_quant_seq(self.latent, self.scales.abs().clamp_min(1e-8), self.bits, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_q().to(x.dtype), bias)


def schedule(n_train: int, step: int, micro_batch: int, seed: int) -> list[int]:
    """Training indices of ``step``: consecutive slices of seeded permutations (one per epoch),
    a pure function of its arguments so a resumed run sees the same batches."""
    start = step * micro_batch
    out: list[int] = []
    while len(out) < micro_batch:
        epoch, offset = divmod(start + len(out), n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend(perm[offset : offset + micro_batch - len(out)])
    return out


# --------------------------------------------------------------------------- the run
class QATRun:
    """The ``tuner`` of a UPQ model with a ``qat:`` section (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: UPQConfig,
        qat: QATConfig,
        data: DistillSet,
        workdir: Path | None = None,
        key: str = "",
        keep_state: bool = True,
    ) -> None:
        if len(data.sequences) < 2:
            raise DataError(
                f"the distillation set has {len(data.sequences)} sequence(s); QAT needs at least 2"
            )
        self.model, self.cfg, self.qat, self.data = model, cfg, qat, data
        self.device = next(model.parameters()).device
        n = len(data.sequences)
        n_valid = qat.n_valid(n)
        self.train_ids, self.valid_ids = list(range(n - n_valid)), list(range(n - n_valid, n))
        self._tmp = tempfile.TemporaryDirectory(prefix="q2lab-qat-")
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)
        self.keep_state = keep_state
        self.key = key or data.sha256
        t0 = time.time()
        self.teacher = TeacherTopK(Path(self._tmp.name), model, data, qat.topk)
        self.stats: dict[str, Any] = {
            "config": vars(qat).copy(),
            "data": {**data.info, "sequences": n, "sha256": data.sha256, "valid": n_valid},
            "trained_positions": int(self.teacher.offsets[-1]),
            "teacher_s": round(time.time() - t0, 2),
        }

    def before_block(self, b: int) -> None:  # stage 2 runs once every block is at INT4
        pass

    def after_block(self, b: int) -> None:
        pass

    # ------------------------------------------------------------------ training
    def _loss(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        seqs = [self.data.sequences[i] for i in ids]
        width = max(len(s) for s in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            batch[r, : len(s)] = s
        logits = self.model(input_ids=batch.to(self.device), use_cache=False).logits
        rows = [logits[r, self.data.starts[i] : len(seqs[r]) - 1] for r, i in enumerate(ids)]
        teacher = [self.teacher.get(i, self.device) for i in ids]
        loss = topk_jsd(
            torch.cat(rows),
            torch.cat([t[0] for t in teacher]),
            torch.cat([t[1] for t in teacher]),
            self.qat.beta,
        )
        return loss, sum(len(s) for s in seqs)

    @torch.no_grad()
    def _held_out(self) -> float:
        vals = []
        for s in range(0, len(self.valid_ids), self.qat.micro_batch):
            ids = self.valid_ids[s : s + self.qat.micro_batch]
            vals.append((float(self._loss(ids)[0]), sum(self.data.positions(i) for i in ids)))
        return sum(v * w for v, w in vals) / max(sum(w for _, w in vals), 1)

    def _student(self) -> dict[str, SEQTrainLinear]:
        layers = {}
        for name, m in stage1_layers(self.model).items():
            w = m.qtensor.dequantize(torch.float32)
            layers[name] = SEQTrainLinear(
                w, seq_init(w, self.cfg), self.cfg.bits, self.cfg.group_size, m.bias
            )
            self.model.set_submodule(name, layers[name].to(self.device))
        return layers

    def _state_path(self) -> Path:
        return self.workdir / "state.pt"

    def _save(self, layers: dict[str, SEQTrainLinear], opt: torch.optim.Optimizer, step: int) -> None:
        state = {
            "key": self.key,
            "step": step,
            "latent": {n: m.latent.detach().cpu() for n, m in layers.items()},
            "scales": {n: m.scales.detach().cpu() for n, m in layers.items()},
            "opt": opt.state_dict(),
            "valid_before": self.stats.get("valid_jsd_before"),
        }
        with atomic_path(self._state_path()) as tmp:
            torch.save(state, tmp)

    def _resume(self, layers: dict[str, SEQTrainLinear], opt: torch.optim.Optimizer) -> int:
        path = self._state_path()
        if not path.exists():
            return 0
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: unreadable QAT checkpoint ({e}); delete it to start over") from e
        if state.get("key") != self.key or set(state["latent"]) != set(layers):
            return 0  # another run's state: start afresh (it is overwritten at the next save)
        with torch.no_grad():
            for n, m in layers.items():
                m.latent.copy_(state["latent"][n])
                m.scales.copy_(state["scales"][n])
        opt.load_state_dict(state["opt"])
        if state.get("valid_before") is not None:
            self.stats["valid_jsd_before"] = state["valid_before"]
        return int(state["step"])

    def finish(self) -> dict[str, Any]:
        """Train, then store every layer as its INT2 SEQ tensor; returns the statistics."""
        try:
            layers = self._student()
            self._train(layers)
            self._harden(layers)
            if not self.keep_state:  # the latents + Adam moments are 3 float copies of the linears
                self._state_path().unlink(missing_ok=True)
        finally:
            self._tmp.cleanup()
        return self.stats

    def _train(self, layers: dict[str, SEQTrainLinear]) -> None:
        qat, model = self.qat, self.model
        params = [p for m in layers.values() for p in (m.latent, m.scales)]
        frozen = {id(p) for p in params}
        was_grad = {p: p.requires_grad for p in model.parameters() if id(p) not in frozen}
        for p in was_grad:
            p.requires_grad_(False)
        opt = torch.optim.Adam(params, lr=qat.lr)
        start = self._resume(layers, opt)
        if "valid_jsd_before" not in self.stats:
            self.stats["valid_jsd_before"] = self._held_out()
        on, off = _checkpointing_switches(model) if qat.checkpointing else (None, None)
        if on is not None:
            on()
        model.train()
        bar = progress_bar(f"upq qat (β={qat.beta})", qat.steps, unit="step", initial=start)
        tokens, t0, losses = 0, time.time(), []
        try:
            for step in range(start, qat.steps):
                ids = schedule(len(self.train_ids), step, qat.micro_batch, qat.seed)
                with torch.enable_grad():
                    loss, n_tok = self._loss([self.train_ids[i] for i in ids])
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += n_tok
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix_str(f"jsd {losses[-1]:.4f}, {tokens / max(time.time() - t0, 1e-9):.0f} tok/s")
                if (step + 1) % qat.save_every == 0 or step + 1 == qat.steps:
                    self._save(layers, opt, step + 1)
        finally:
            bar.close()
            model.eval()
            if off is not None:
                off()
            for p, g in was_grad.items():
                p.requires_grad_(g)
        seconds = time.time() - t0
        self.stats.update(
            {
                "resumed_at": start,
                "steps_run": qat.steps - start,
                "train_tokens": tokens,
                "train_s": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
                "train_jsd_first": losses[0] if losses else None,
                "train_jsd_last": losses[-1] if losses else None,
                "valid_jsd_after": self._held_out(),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.stats["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def _harden(self, layers: dict[str, SEQTrainLinear]) -> None:
        upq = get_quantizer("upq")
        for name, m in layers.items():
            qt = seq_tensor(m.latent.detach(), m.scales.detach().abs(), self.cfg)
            self.model.set_submodule(name, upq.make_linear(qt, m.bias))


def _checkpointing_switches(model: nn.Module) -> tuple[Any, Any]:
    """The model's activation-checkpointing on/off calls, non-reentrant (transformers renamed
    them in 5.x, keyword included), or (None, None) for a model without them."""
    names = (
        (
            "activation_checkpointing_enable",
            "activation_checkpointing_disable",
            "activation_checkpointing_kwargs",
        ),
        ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "gradient_checkpointing_kwargs"),
    )
    for on, off, kw in names:
        if hasattr(model, on) and hasattr(model, off):
            return functools.partial(getattr(model, on), **{kw: {"use_reentrant": False}}), getattr(
                model, off
            )
    return None, None


def qat_key(fingerprint: str, cfg: UPQConfig, data: DistillSet, store_key: str = "") -> str:
    """What a resumable state must match: model, stage-1 options, data and every QAT option that
    changes the trajectory (not ``steps`` or ``save_every``: a longer run extends a shorter one)."""
    opts = cfg.to_dict()
    qat = dict(opts.pop("qat", None) or {})
    qat.pop("steps", None)
    qat.pop("save_every", None)
    blob = json.dumps([fingerprint, store_key, opts, qat, data.sha256], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
