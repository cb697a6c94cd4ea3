"""The ``finetune:`` option section shared by methods whose quantized layers keep continuous
parameters (QuIP#, QTIP, AQLM, VPTQ): validated once here, so every method spells it the same way.

Only the option lives with the methods; the training it asks for is :mod:`q2lab.finetune`, which
:func:`q2lab.quant.model.quantize_model` runs through its ``tuner`` hook (methods never import
training code: docs/DESIGN.md, "Import rules")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from q2lab.errors import ConfigError
from q2lab.quant.base import option


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of the two fine-tuning stages (see :mod:`q2lab.finetune`)."""

    block_epochs: int = 2  # stage 1: epochs of within-block tuning (0 = skip)
    e2e_epochs: int = 1  # stage 2: epochs of end-to-end KL tuning (0 = skip)
    lr: float = 1e-3  # Adam learning rate (both stages)
    windows: int = 32  # calibration windows used (the first N of the store's windows)
    ctx: int | None = None  # tokens per window (null = the calibration ctx)
    valid: float = 0.25  # held-out fraction of the windows, for early stopping
    gains: bool = True  # relax the sign vectors to fp16 gains (+16 bits per row and column, counted)
    topk: int = 64  # stage 2: teacher log-probs cached as top-k + the tail mass
    # "continuous": train the continuous parameters only; "pv": PV-tuning, each epoch of
    # continuous (P) steps followed by a V step that re-chooses codebook layers' codes
    mode: str = "continuous"
    v_frac: float = 0.01  # V step: at most this fraction of a layer's vectors change codes
    v_lr: float = 0.1  # V step: target W − v_lr·RMS(W)·ĝ/RMS(ĝ), ĝ the summed gradient of W

    def __post_init__(self) -> None:
        for name in ("block_epochs", "e2e_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"finetune.{name} must be a non-negative integer, got {v!r}")
        for name in ("windows", "topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"finetune.{name} must be a positive integer, got {v!r}")
        if self.windows < 2:
            raise ConfigError(f"finetune.windows must be at least 2 (train + held out), got {self.windows}")
        if self.ctx is not None and (not isinstance(self.ctx, int) or self.ctx < 2):
            raise ConfigError(f"finetune.ctx must be an integer ≥ 2 or null, got {self.ctx!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"finetune.lr must be positive, got {self.lr!r}")
        if not (isinstance(self.valid, (int, float)) and 0 < self.valid < 1):
            raise ConfigError(f"finetune.valid must be in (0, 1), got {self.valid!r}")
        if self.mode not in ("continuous", "pv"):
            raise ConfigError(f"finetune.mode must be 'continuous' or 'pv', got {self.mode!r}")
        if not (isinstance(self.v_frac, (int, float)) and 0 < self.v_frac <= 1):
            raise ConfigError(f"finetune.v_frac must be in (0, 1], got {self.v_frac!r}")
        if not (isinstance(self.v_lr, (int, float)) and self.v_lr > 0):
            raise ConfigError(f"finetune.v_lr must be positive, got {self.v_lr!r}")
        if not isinstance(self.gains, bool):
            raise ConfigError(f"finetune.gains must be true or false, got {self.gains!r}")

    @classmethod
    def parse(cls, value: Any) -> FinetuneConfig | None:
        """``None``/``false``/``{}``-less spellings → off; a mapping → validated options."""
        return parse_section(cls, "finetune", value, ("lr", "v_lr", "v_frac"))

    @property
    def n_valid(self) -> int:
        return held_out_count(self.windows, self.valid)


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` training units to hold out: ``fraction`` of them, at least 1 and leaving
    at least 1 to train on."""
    return min(n - 1, max(1, round(n * fraction)))


def parse_section(cls: Any, section: str, value: Any, float_keys: tuple[str, ...]) -> Any:
    """A training section of a method config (``finetune:``, ``qat:``): ``None``/``false`` → off,
    ``true`` → defaults, a mapping → ``cls`` validated, unknown keys named with the known ones."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{section} must be a mapping of options or null, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            f"unknown {section} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    vals = dict(value)
    for key in float_keys:
        if isinstance(vals.get(key), str):  # YAML reads 1e-3 as a string
            try:
                vals[key] = float(vals[key])
            except ValueError as e:
                raise ConfigError(f"{section}.{key} must be a number, got {vals[key]!r}") from e
    return cls(**vals)


@dataclass(frozen=True)
class QATConfig:
    """Options of UPQ's stage 2 (``qat:``): quantization-aware training of the INT2 weights by
    distillation from the float model (:mod:`q2lab.finetune.qat`)."""

    steps: int = 200  # optimizer steps (one micro-batch of sequences each)
    micro_batch: int = 4  # sequences per step
    lr: float = 5e-5  # Adam learning rate of the latent weights and the group scales
    beta: float = 0.5  # generalized JSD weight: 0 = KL(teacher ‖ student), 1 = KL(student ‖ teacher)
    data: str = "self"  # "self": the float model answers seed prompts; "text": calibration-corpus windows
    sequences: int = 256  # distillation sequences (answered prompts, or text windows)
    lang: str | None = None  # "self": seed prompts in one language ("en"/"pl"); null = both
    max_new_tokens: int = 192  # "self": the teacher's answer length cap
    temperature: float | None = 0.7  # "self": teacher sampling temperature; null = greedy
    ctx: int = 256  # "text": tokens per window
    topk: int = 64  # teacher distributions cached as top-k log-probs + the tail mass
    valid: float = 0.1  # held-out fraction of the sequences (loss before/after)
    seed: int = 0  # prompt draw, teacher sampling, batch order
    save_every: int = 50  # steps between resumable checkpoints
    checkpointing: bool = True  # gradient checkpointing (activation memory ∝ one block)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "sequences", "max_new_tokens", "ctx", "topk", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"qat.{name} must be a positive integer, got {v!r}")
        if self.sequences < 2:
            raise ConfigError(f"qat.sequences must be at least 2 (train + held out), got {self.sequences}")
        if not (
            isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and 0 <= self.beta <= 1
        ):
            raise ConfigError(
                f"qat.beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta!r}"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"qat.lr must be positive, got {self.lr!r}")
        if self.data not in ("self", "text"):
            raise ConfigError(
                f"qat.data must be 'self' (teacher-generated answers) or 'text', got {self.data!r}"
            )
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float)) and self.temperature > 0
        ):
            raise ConfigError(f"qat.temperature must be > 0 or null (greedy), got {self.temperature!r}")
        if not (isinstance(self.valid, (int, float)) and 0 < self.valid < 1):
            raise ConfigError(f"qat.valid must be in (0, 1), got {self.valid!r}")
        if self.lang not in (None, "en", "pl"):
            raise ConfigError(f"qat.lang must be 'en', 'pl' or null (both), got {self.lang!r}")
        if not isinstance(self.checkpointing, bool):
            raise ConfigError(f"qat.checkpointing must be true or false, got {self.checkpointing!r}")

    @classmethod
    def parse(cls, value: Any) -> QATConfig | None:
        return parse_section(cls, "qat", value, ("lr", "beta", "temperature", "valid"))

    def n_valid(self, n: int) -> int:
        """Held-out sequences of a set of ``n`` (answers can be fewer than ``sequences``)."""
        return held_out_count(n, self.valid)


def qat_of(cfg: Any) -> QATConfig | None:
    """The parsed ``qat`` section of a method config (``None`` when absent or off)."""
    return QATConfig.parse(getattr(cfg, "qat", None))


def needs_tuner(cfg: Any) -> bool:
    """Whether quantizing with ``cfg`` runs training through ``quantize_model``'s tuner hook."""
    return finetune_of(cfg) is not None or qat_of(cfg) is not None


def finetune_of(cfg: Any) -> FinetuneConfig | None:
    """The parsed ``finetune`` section of a method config (``None`` when absent or off)."""
    return FinetuneConfig.parse(getattr(cfg, "finetune", None))


def drop_off_finetune(options: dict[str, Any]) -> dict[str, Any]:
    """A method config's dict without ``finetune`` when it is off, so configs (and the study
    cell ids hashed from them) of runs without fine-tuning are what they were before the
    option existed."""
    if options.get("finetune") is None:
        options.pop("finetune", None)
    return options


def finetune_option() -> Any:
    """The ``finetune`` field of a method config: off by default."""
    return option(
        None, "fine-tuning after rounding: {block_epochs, e2e_epochs, lr, windows, ...}; null = off"
    )


class FinetuneOption:
    """Mixin for method configs with a ``finetune`` field (declared with :func:`finetune_option`):
    validates the section with the rest of the config and leaves it out of ``to_dict`` when off,
    so every such method treats the option the same way."""

    finetune: Mapping | None

    def to_dict(self) -> dict[str, Any]:
        return drop_off_finetune(super().to_dict())  # type: ignore[misc]

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        FinetuneConfig.parse(self.finetune)
