"""Core quantization interfaces: method configs, :class:`QuantizedTensor`, the method registry.

A method is a :class:`Quantizer` subclass registered by name.  It turns one linear layer's
weight (and, when it needs one, the layer's input Hessian from the shared store) into a
:class:`QuantizedTensor`: the exact tensors it would store, plus the metadata needed to decode
them.  Bits per weight are counted from what is stored, never estimated.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from q2lab.errors import ConfigError, ShapeError

if typing.TYPE_CHECKING:
    from q2lab.calib.hessian import Hessian


# --------------------------------------------------------------------------- configs
@dataclass
class MethodConfig:
    """Base of every method's options.  Subclasses add fields with ``help`` metadata.

    Configs are validated when built (``__post_init__`` → :meth:`validate`), so a bad YAML or
    CLI value fails at the edge with a message naming the option, not inside a kernel.
    """

    bits: int = 4

    BITS_RANGE: ClassVar[tuple[int, int]] = (1, 8)
    # Named option sets (``preset: NAME``): a published configuration in one word.  Explicit
    # options override the preset's; a config class with presets declares a ``preset`` field.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        lo, hi = self.BITS_RANGE
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not lo <= self.bits <= hi:
            raise ConfigError(f"bits must be an integer in [{lo}, {hi}] for this method, got {self.bits!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], method: str = "") -> MethodConfig:
        """Build from a YAML/CLI dict, rejecting unknown keys with the list of known ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for method {method or cls.__name__}; "
                f"known options: {', '.join(sorted(known))}"
            )
        if values.get("preset") is not None:
            values = {**cls._preset(values["preset"], method), **values}
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, hints.get(k, Any), v, method) for k, v in values.items()}
        return cls(**coerced)

    @classmethod
    def _preset(cls, name: Any, method: str) -> dict[str, Any]:
        if name not in cls.PRESETS:
            raise ConfigError(
                f"unknown preset {name!r} for method {method or cls.__name__}; "
                f"known presets: {', '.join(cls.PRESETS) or 'none'}"
            )
        return dict(cls.PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("preset", 0) is None:  # no preset: the dict (and cell ids hashed from it) as before presets
            d.pop("preset")
        for f in dataclasses.fields(self):
            # An option added after records existed leaves the dict (and the cell ids hashed from
            # it) as it was while it holds its default.
            if f.metadata.get("added_later") and d.get(f.name) == f.default:
                d.pop(f.name)
        return d

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, help) for each option, for ``q2lab methods``."""
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            rows.append((f.name, default, f.metadata.get("help", "")))
        return rows


def require_ints(cfg: Any, names: tuple[str, ...], minimum: int) -> None:
    """Each named option must be an integer ≥ ``minimum`` (one clear line naming it otherwise)."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer ≥ {minimum}")
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{name} must be {what}, got {v!r}")


def option(default: Any, help: str, added_later: bool = False, **kw: Any) -> Any:
    """A config field with help text shown by ``q2lab methods``.  ``added_later``: the option joined
    a method that already has recorded results; at its default it is left out of ``to_dict``, so
    those records' cell ids still match."""
    return field(default=default, metadata={"help": help, "added_later": added_later}, **kw)


def _coerce(name: str, hint: Any, value: Any, method: str) -> Any:
    """Accept YAML/CLI spellings (``"4"``, ``"true"``, ``null``) for typed fields."""
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is bool and isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        if typ is int and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                continue
        if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
    if any(_is_instance(value, typ) for typ in allowed):
        return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"option {name} of method {method or '?'} must be {names}, got {value!r}")


def _is_instance(value: Any, typ: Any) -> bool:
    if typ is Any:
        return True
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, typ) and not (typ is int and isinstance(value, bool))


def _allowed_types(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(typing.get_args(hint))
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    if origin is not None:
        return (origin,)
    return (hint,)


# --------------------------------------------------------------------------- tensors
@dataclass
class QuantizedTensor:
    """One linear layer's weight in a method's own storage format.

    ``tensors`` holds exactly what would be written to disk (packed codes, scales, sign
    vectors, per-layer codebooks, ...).  ``meta`` is JSON-serialisable and holds everything
    else needed to decode them.  ``bit_counts`` names the storage bits per component, so
    ``bits()`` and ``bpw()`` are exact and reports can break them down.
    """

    method: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    bit_counts: dict[str, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this tensor stands for, shape ``shape``."""
        w = get_quantizer(self.method).dequantize(self)
        if tuple(w.shape) != tuple(self.shape):
            raise ShapeError(f"{self.method} decoded a {tuple(w.shape)} weight, expected {self.shape}")
        return w.to(dtype)

    def bits(self) -> int:
        """Exact storage bits (codes + scales + zeros + per-layer codebooks + ...)."""
        return int(sum(self.bit_counts.values()))

    def numel(self) -> int:
        return int(self.shape[0] * self.shape[1])

    def bpw(self) -> float:
        return self.bits() / self.numel()

    def nbytes(self) -> int:
        """Bytes actually held in ``tensors`` (≥ bits()/8 by per-tensor padding)."""
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return dataclasses.replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})


# --------------------------------------------------------------------------- registry
class Quantizer(ABC):
    """A quantization method.  Subclasses set ``name`` and ``config_cls`` and register."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_hessian: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, hessian: Hessian | None, cfg: MethodConfig) -> QuantizedTensor:
        """Quantize ``weight`` (out_features × in_features, float)."""

    @abstractmethod
    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """Decode ``qt`` back to a float matrix of shape ``qt.shape``."""

    def uses_hessian(self, cfg: MethodConfig) -> bool:
        """Whether quantizing with ``cfg`` reads calibration Hessians (calibration is scheduled
        for it).  Methods whose Hessian use is an option (GGML types' importance matrix)
        override this; by default it is ``needs_hessian``."""
        return self.needs_hessian

    def layer_methods(
        self, model: torch.nn.Module, cfg: MethodConfig
    ) -> dict[str, tuple[Quantizer, MethodConfig] | None] | None:
        """Per-linear (method, config) by module name, for methods that mix types across layers
        (a llama.cpp file type bumps attention V and ``ffn_down``); ``None`` for a linear keeps
        it float.  The default, ``None``, quantizes every linear with this method and ``cfg``."""
        return None

    def prepare_model(
        self, model: torch.nn.Module, cfg: MethodConfig, store: Any, windows: Any = None
    ) -> tuple[Any, list[str]]:
        """A whole-model transform run once before any block is rounded (rotations fuse norms and
        rotate the float model in place, computing the same function).  ``windows()``, when given,
        returns calibration token windows (for transforms that are learned, e.g. SpinQuant).
        Returns the Hessian source to read from then on — the shared store, or a view that derives
        the transformed model's Hessians from it — and notes for the report.  The default changes
        nothing."""
        return store, []

    def finish_model(self, model: torch.nn.Module, cfg: MethodConfig) -> list[str]:
        """A whole-model step run once after every block is rounded and any tuner has finished
        (UPQ turns the INT4 layers its training left into INT2).  Returns notes for the report;
        the default changes nothing."""
        return []

    def plan(self, cfg: MethodConfig) -> dict[str, Any] | None:
        """What the method chose per linear, for the report (``auto``'s allocation as an editable
        ``mixed`` config, with its statistics); ``None`` for methods that choose nothing."""
        return None

    def pv_view(self, qt: QuantizedTensor) -> Any:
        """The layer opened for PV-tuning (:class:`q2lab.quant.vq.PVView`: continuous tensors,
        discrete codes, a differentiable decode and the write-back), or ``None`` when the
        method's codes cannot be re-chosen one vector at a time (the default)."""
        return None

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        """The module that replaces the float linear (``QuantLinear`` unless the method has its
        own inference path, e.g. QuIP#'s on-the-fly Hadamard + codebook decode)."""
        from q2lab.quant.linear import QuantLinear

        return QuantLinear(qt, bias, cache_weight=cache_weight)

    def quantize_many(
        self, weights: list[torch.Tensor], hessian: Hessian | None, cfg: MethodConfig
    ) -> list[QuantizedTensor]:
        """Quantize several weights that read the same input (q/k/v, gate/up).

        Methods whose rows are quantized independently given H (GPTQ) override this to run
        one stacked matrix, which is exact and amortises per-column work.
        """
        return [self.quantize(w, hessian, cfg) for w in weights]

    def check_inputs(self, weight: torch.Tensor, hessian: Hessian | None) -> None:
        """Shared validation: a 2-D float weight, and a Hessian that matches its columns."""
        if weight.ndim != 2:
            raise ShapeError(f"{self.name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not torch.is_floating_point(weight):
            raise ShapeError(f"{self.name}: expected a float weight, got {weight.dtype}")
        if hessian is None:
            if self.needs_hessian:
                raise ConfigError(
                    f"method {self.name} needs calibration Hessians; run `q2lab calibrate` or pass --calib"
                )
            return
        n = weight.shape[1]
        if tuple(hessian.xtx.shape) != (n, n):
            raise ShapeError(
                f"{self.name}: Hessian of shape {tuple(hessian.xtx.shape)} "
                f"does not fit a weight with {n} columns"
            )


class StackedQuantizer(Quantizer):
    """A Hessian method whose unit of work is a stack of linears reading one input (q/k/v,
    gate/up): rows are independent given H, so one stacked run is exact and shares the Hessian
    factorisation.  Subclasses implement :meth:`quantize_stack`; inputs are checked here once."""

    def quantize(self, weight: torch.Tensor, hessian: Hessian | None, cfg: MethodConfig) -> QuantizedTensor:
        return self.quantize_many([weight], hessian, cfg)[0]

    def quantize_many(
        self, weights: list[torch.Tensor], hessian: Hessian | None, cfg: MethodConfig
    ) -> list[QuantizedTensor]:
        for w in weights:
            self.check_inputs(w, hessian)
        assert hessian is not None  # check_inputs raised for a Hessian method without one
        return self.quantize_stack(weights, hessian, cfg)

    @abstractmethod
    def quantize_stack(
        self, weights: list[torch.Tensor], hessian: Hessian, cfg: MethodConfig
    ) -> list[QuantizedTensor]:
        """Quantize checked weights that share ``hessian``."""


_REGISTRY: dict[str, type[Quantizer]] = {}
_ALIASES: dict[str, str] = {}


def register(*aliases: str):
    """Class decorator: register a :class:`Quantizer` under its ``name`` (and aliases)."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        key = cls.name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise RuntimeError(f"quantizer name {key!r} registered twice")
        _REGISTRY[key] = cls
        for a in aliases:
            _ALIASES[a.lower()] = key
        return cls

    return deco


def _load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (cheap; no heavy deps)."""
    from q2lab.quant import methods  # noqa: F401


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_quantizer(name: str) -> Quantizer:
    """Instantiate a registered method, or fail naming the known ones."""
    _load_builtin_methods()
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[key]()


def make_config(method: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """Validated config for ``method`` from a plain dict (YAML/CLI)."""
    q = get_quantizer(method)
    return q.config_cls.from_dict(dict(values or {}), method=q.name)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def index_bits(n: int) -> int:
    """Bits to store an index in ``range(n)``."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0
