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
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"finetune must be a mapping of options or null, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"unknown finetune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        vals = dict(value)
        for key in ("lr", "v_lr", "v_frac"):
            if isinstance(vals.get(key), str):  # YAML reads 1e-3 as a string
                try:
                    vals[key] = float(vals[key])
                except ValueError as e:
                    raise ConfigError(f"finetune.{key} must be a number, got {vals[key]!r}") from e
        return cls(**vals)

    @property
    def n_valid(self) -> int:
        return min(self.windows - 1, max(1, round(self.windows * self.valid)))


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
