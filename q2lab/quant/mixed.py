"""Mixed precision: a different method (or bit width) for the linears a rule picks, ``mixed``.

The practical advice for 2-bit models is to check generation first and to spend bits where the
model is most sensitive: ``down_proj``, attention V, the first and last blocks.  ``mixed`` makes
that a study cell on the one shared calibration::

    - method: mixed
      base: {method: qtip, bits: 2}
      rules:
        - {match: "mlp\\.down_proj", method: quip, bits: 4}
        - {match: "layers\\.(0|29)\\.", method: q8_0}
        - {match: "self_attn\\.v_proj", method: fp}      # keep float

Each linear takes the first rule whose ``match`` (a regular expression, searched in the module
name such as ``model.layers.3.mlp.down_proj``) hits, else ``base``; ``method: fp`` keeps it
float.  Every layer is stored by its own method, so checkpoints, export and bpw need nothing
special, and the report's ``formats`` shows the mix.  Fine-tuning sections are not accepted
inside rules (one stage-1/stage-2 run cannot serve several methods).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, get_quantizer, make_config, register

FLOAT = "fp"


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern | None  # None: the base
    method: str
    config: MethodConfig | None  # None: keep float


def parse_entry(spec: Any, where: str, with_match: bool, who: str = "mixed") -> Rule:
    """One method entry of a mix (``who``: the method reading it), validated: its config built,
    its ``match`` compiled; ``method: fp`` keeps float."""
    if not isinstance(spec, dict) or "method" not in spec:
        raise ConfigError(f"{who}: {where} must be a mapping with a 'method' key, got {spec!r}")
    opts = dict(spec)
    method = str(opts.pop("method")).lower()
    pattern = None
    if with_match:
        if "match" not in opts:
            raise ConfigError(f"{who}: {where} needs 'match', a regular expression on module names")
        try:
            pattern = re.compile(str(opts.pop("match")))
        except re.error as e:
            raise ConfigError(f"{who}: {where} has a bad 'match' pattern ({e})") from e
    if method == FLOAT:
        if opts:
            raise ConfigError(f"{who}: {where} keeps layers float and takes no options, got {sorted(opts)}")
        return Rule(pattern, method, None)
    if method in ("mixed", "auto"):
        raise ConfigError(f"{who}: {where} cannot be {method} itself")
    if opts.get("finetune") is not None:
        raise ConfigError(f"{who}: {where} cannot fine-tune (one run cannot serve several methods)")
    cfg = make_config(method, opts)
    quantizer = get_quantizer(method)
    if type(quantizer).prepare_model is not Quantizer.prepare_model:
        raise ConfigError(
            f"{who}: {where} uses {quantizer.name}, which transforms the whole model (rotations) "
            "before rounding; it cannot be one rule or the base of a mix"
        )
    return Rule(pattern, quantizer.name, cfg)


@dataclass
class MixedConfig(MethodConfig):
    """``base`` (a method entry) for every linear no rule picks; ``rules`` in order of priority."""

    base: dict = field(
        default_factory=dict,
        metadata={"help": "method entry for the other linears, e.g. {method: qtip, bits: 2}"},
    )
    rules: list = field(
        default_factory=list,
        metadata={
            "help": "[{match: REGEX, method: NAME, ...options}], first match wins; method fp keeps float"
        },
    )
    bits: int = field(default=0, metadata={"help": "the base method's bits (set, not chosen)"})

    def validate(self) -> None:
        # parsed once here (sub-configs validated, patterns compiled); configs are not mutated
        self._parsed = self._parse_entries()
        base = self._parsed[-1]
        if base.config is None:
            raise ConfigError("mixed: base cannot be fp (use the study's fp reference)")
        if self.bits not in (0, base.config.bits):
            raise ConfigError(f"mixed: bits follow the base method ({base.config.bits}), got {self.bits}")
        self.bits = base.config.bits
        super().validate()

    def parsed(self) -> list[Rule]:
        """The rules, then the base (pattern None)."""
        return self._parsed

    def _parse_entries(self) -> list[Rule]:
        if not isinstance(self.rules, list):
            raise ConfigError(f"mixed: rules must be a list, got {self.rules!r}")
        rules = [parse_entry(r, f"rule {i + 1}", True) for i, r in enumerate(self.rules)]
        return [*rules, parse_entry(self.base, "base", False)]


@register()
class MixedQuantizer(Quantizer):
    """Per-linear methods by name pattern, through :meth:`Quantizer.layer_methods`."""

    name = "mixed"
    config_cls = MixedConfig
    summary = "mixed precision: a method per linear by name pattern (rules), the base for the rest"

    def uses_hessian(self, cfg: MixedConfig) -> bool:
        return any(
            r.config is not None and get_quantizer(r.method).uses_hessian(r.config) for r in cfg.parsed()
        )

    def layer_methods(
        self, model: nn.Module, cfg: MixedConfig
    ) -> dict[str, tuple[Quantizer, MethodConfig] | None]:
        from q2lab.models.arch import find_decoder

        rules = cfg.parsed()
        layout = find_decoder(model)
        out: dict[str, tuple[Quantizer, MethodConfig] | None] = {}
        for b in range(len(layout)):
            for n in layout.block_linears(b):
                full = layout.full_name(b, n)
                rule = next(r for r in rules if r.pattern is None or r.pattern.search(full))
                out[full] = None if rule.config is None else (get_quantizer(rule.method), rule.config)
        return out

    def quantize(self, weight: torch.Tensor, hessian, cfg: MixedConfig) -> QuantizedTensor:
        """A lone tensor has no name for the rules to match: the base method quantizes it."""
        base = cfg.parsed()[-1]
        assert base.config is not None
        return get_quantizer(base.method).quantize(weight, hessian, base.config)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return get_quantizer(qt.method).dequantize(qt)
